"""Operators per decode step per layer for each engine: a dispatcher trace of ATen calls on the CPU."""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from w2w import distributed, engines
from w2w.engines.common import SamplingParams
from w2w.engines.fused import fold_norm_gains
from w2w.model import ModelArgs, build_model, random_state_dict

PROMPTS = [[1, 5, 9, 12, 7, 30], [1, 44, 3, 8]]
SHORT, LONG = 4, 8  # new tokens of the two traced runs: their difference is decode steps only


def _is_view(func) -> bool:
    """A view or metadata call launches no kernel on a GPU: count only calls that compute or write."""
    if func.overloadpacket.__name__ == "_unsafe_view":  # a view whose schema does not say so
        return True
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators that reach the dispatcher (after composite ops decompose)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Under inference mode a composite op (linear, type_as, reshape) reaches the mode whole:
        # count what it runs, as a GPU would launch it, not the wrapper.
        with self:
            out = func.decompose(*args, **kwargs)
        if out is not NotImplemented:
            return out
        if not _is_view(func):
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **kwargs)


def generate_ops(engine, new_tokens: int) -> Counter[str]:
    params = SamplingParams(max_gen_len=new_tokens, greedy=True, force_max_gen_len=True)
    engine.generate(PROMPTS, params, eos_id=2, pad_id=0)  # warm: first calls build caches and decoders
    with OpCounter() as counter:
        engine.generate(PROMPTS, params, eos_id=2, pad_id=0)
    return counter.ops


# What is traced: (engine, norm gains folded into the GEMMs), as a job runs it. fast folds them
# where it alone serves the model (w2w.runner); a job shared with llama1/llama2 keeps Meta's weights.
VARIANTS = {name: (name, False) for name in engines.ENGINES} | {"fast": ("fast", True), "fast-unfolded": ("fast", False)}


def ops_per_step(name: str, args: ModelArgs, dtype: torch.dtype) -> Counter[str]:
    """Operators of one decode step of `name` (a VARIANTS key): (LONG run - SHORT run) / (LONG - SHORT)."""
    engine_name, fold = VARIANTS[name]
    model = build_model(args, random_state_dict(args, 1), torch.device("cpu"), dtype)
    if fold:
        fold_norm_gains(model)
    engine = engines.create(engine_name, model)
    diff = generate_ops(engine, LONG)
    diff.subtract(generate_ops(engine, SHORT))
    return Counter({op: n / (LONG - SHORT) for op, n in diff.items() if n})


def per_layer(name: str, args: ModelArgs, dtype: torch.dtype) -> tuple[float, float, Counter[str]]:
    """(operators per layer, operators outside the layers, per-layer breakdown) of one decode step:
    two depths, so the embedding, the output head and sampling do not count against the layers."""
    shallow = ops_per_step(name, args, dtype)
    deep = ops_per_step(name, replace(args, n_layers=2 * args.n_layers), dtype)
    layer = Counter({op: (deep[op] - shallow[op]) / args.n_layers for op in deep | shallow})
    layer = Counter({op: n for op, n in layer.items() if n})
    per = sum(layer.values())
    return per, sum(shallow.values()) - per * args.n_layers, layer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[4, 2], help="4: MHA, 2: GQA (4 heads)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--breakdown", action="store_true", help="print the operators of one layer")
    args = parser.parse_args(argv)
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(1, 1)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print(f"operators per decode step per layer (ATen calls that compute, world size 1, batch {len(PROMPTS)}; "
          "fast: norm gains folded, as a job that runs fast alone; fast-unfolded: a job shared with llama1/llama2):")
    for kv in args.kv_heads:
        shape = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=kv, vocab_size=64, multiple_of=16,
                          max_seq_len=128)
        for dtype in args.dtype:
            for name in VARIANTS:
                label = "MHA" if kv == shape.n_heads else f"GQA {shape.n_heads}/{kv}"
                try:
                    per, outside, layer = per_layer(name, shape, dtypes[dtype])
                except ValueError as exc:  # an engine that does not run this shape (llama1: no GQA)
                    print(f"  {name:>13} {label:>9} {dtype}: not run: {exc}", flush=True)
                    continue
                print(f"  {name:>13} {label:>9} {dtype}: {per:5.1f} per layer, {outside:5.1f} outside the layers",
                      flush=True)
                if args.breakdown:
                    print("             " + ", ".join(f"{op} {n:g}" for op, n in sorted(layer.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
