"""Operators per decode step per layer for each engine, traced on the CPU, and the CUDA kernels they estimate.

Two counts of one dispatcher trace of ATen calls: the operators the CPU runs, and an estimate of
the kernels CUDA would launch for the same calls. The estimate counts once an operator that CUDA
runs as one fused kernel where the CPU decomposes it (F.rms_norm: `_fused_rms_norm` on CUDA), and
twice an addmm whose input is a 2-D residual (CUDA copies it into the output, then a GEMM adds onto
it). It is an estimate: a GEMM may launch more than one kernel, and only the profiler on a GPU
(`make bench-gpu`) counts what ran.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from w2w import distributed, engines
from w2w.engines.common import SamplingParams
from w2w.model import ModelArgs, build_model, random_state_dict

PROMPTS = [[1, 5, 9, 12, 7, 30], [1, 44, 3, 8]]
SHORT, LONG = 4, 8  # new tokens of the two traced runs: their difference is decode steps only
# Composite operators the CPU decomposes and CUDA runs as one fused kernel (the kernel's name).
FUSED_ON_CUDA = {"rms_norm": "_fused_rms_norm"}
ADDMM_COPY = "copy (addmm's input)"


def _is_view(func) -> bool:
    """A view or metadata call launches no kernel on a GPU: count only calls that compute or write."""
    if func.overloadpacket.__name__ == "_unsafe_view":  # a view whose schema does not say so
        return True
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def cuda_kernels(name: str, args: tuple) -> list[str]:
    """Kernels CUDA launches for one computing operator: an addmm onto a 2-D input copies it into the
    output, then runs the GEMM with beta 1 (a 1-D bias goes to cuBLASLt's epilogue); others, one."""
    return [ADDMM_COPY, name] if name == "addmm" and args[0].dim() == 2 else [name]


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators that reach the dispatcher (after composite ops decompose), and the
    CUDA kernels they estimate (`cuda`)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.cuda: Counter[str] = Counter()
        self._fused_depth = 0  # > 0 inside an operator CUDA fuses: its parts are not CUDA kernels

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__)
        fused = name in FUSED_ON_CUDA
        if fused and not self._fused_depth:
            self.cuda[FUSED_ON_CUDA[name]] += 1
        # Under inference mode a composite op (linear, type_as, reshape, rms_norm) reaches the mode
        # whole: count what it runs, as a GPU would launch it, not the wrapper.
        self._fused_depth += fused
        try:
            with self:
                out = func.decompose(*args, **kwargs)
        finally:
            self._fused_depth -= fused
        if out is not NotImplemented:
            return out
        if not _is_view(func):
            self.ops[name] += 1
            if not self._fused_depth:
                self.cuda.update(cuda_kernels(name, args))
        return func(*args, **kwargs)


@dataclass(frozen=True)
class Counts:
    """Per decode step of one trace: ATen operators on the CPU, and the CUDA kernels they estimate."""

    cpu: Counter[str]
    cuda: Counter[str]


def generate_ops(engine, new_tokens: int) -> Counts:
    params = SamplingParams(max_gen_len=new_tokens, greedy=True, force_max_gen_len=True)
    engine.generate(PROMPTS, params, eos_id=2, pad_id=0)  # warm: first calls build caches and decoders
    with OpCounter() as counter:
        engine.generate(PROMPTS, params, eos_id=2, pad_id=0)
    return Counts(counter.ops, counter.cuda)


def _per_step(long: Counter[str], short: Counter[str]) -> Counter[str]:
    diff = Counter(long)
    diff.subtract(short)
    return Counter({op: n / (LONG - SHORT) for op, n in diff.items() if n})


def ops_per_step(name: str, args: ModelArgs, dtype: torch.dtype) -> Counts:
    """Operators of one decode step of engine `name`: (LONG run - SHORT run) / (LONG - SHORT)."""
    model = build_model(args, random_state_dict(args, 1), torch.device("cpu"), dtype)
    engine = engines.create(name, model)
    long, short = generate_ops(engine, LONG), generate_ops(engine, SHORT)
    return Counts(_per_step(long.cpu, short.cpu), _per_step(long.cuda, short.cuda))


@dataclass(frozen=True)
class LayerCounts:
    """One decode step's counts per layer and outside the layers, with the per-layer breakdown."""

    per_layer: float
    outside: float
    layer: Counter[str]


def _layer(shallow: Counter[str], deep: Counter[str], n_layers: int) -> LayerCounts:
    layer = Counter({op: (deep[op] - shallow[op]) / n_layers for op in deep | shallow})
    layer = Counter({op: n for op, n in layer.items() if n})
    per = sum(layer.values())
    return LayerCounts(per, sum(shallow.values()) - per * n_layers, layer)


def per_layer(name: str, args: ModelArgs, dtype: torch.dtype) -> tuple[LayerCounts, LayerCounts]:
    """(CPU operators, CUDA kernels estimated) of one decode step of engine `name`, per layer: two
    depths, so the embedding, the output head and sampling do not count against the layers."""
    shallow = ops_per_step(name, args, dtype)
    deep = ops_per_step(name, replace(args, n_layers=2 * args.n_layers), dtype)
    return _layer(shallow.cpu, deep.cpu, args.n_layers), _layer(shallow.cuda, deep.cuda, args.n_layers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[4, 2], help="4: MHA, 2: GQA (4 heads)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--breakdown", action="store_true", help="print the operators of one layer")
    args = parser.parse_args(argv)
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(1, 1)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print(f"per decode step per layer (world size 1, batch {len(PROMPTS)}): CPU = ATen operators that compute, "
          "traced on the CPU; CUDA est. = an ESTIMATE of the kernels CUDA launches for the same calls (an operator "
          "CUDA runs as one fused kernel counts once, an addmm onto a residual counts a copy and a GEMM); "
          "make bench-gpu counts the real kernels on a GPU:")
    for kv in args.kv_heads:
        shape = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=kv, vocab_size=64, multiple_of=16,
                          max_seq_len=128)
        label = "MHA" if kv == shape.n_heads else f"GQA {shape.n_heads}/{kv}"
        for dtype in args.dtype:
            for name in engines.ENGINES:
                try:
                    cpu, cuda = per_layer(name, shape, dtypes[dtype])
                except ValueError as exc:  # an engine whose spec refuses this shape
                    print(f"  {name:>7} {label:>9} {dtype}: not run: {exc}", flush=True)
                    continue
                print(f"  {name:>7} {label:>9} {dtype}: CPU {cpu.per_layer:5.1f} per layer ({cpu.outside:5.1f} outside);"
                      f" CUDA est. {cuda.per_layer:5.1f} per layer ({cuda.outside:5.1f} outside)", flush=True)
                if args.breakdown:
                    for kind, counts in (("CPU", cpu), ("CUDA est.", cuda)):
                        print(f"            {kind}: " + ", ".join(f"{op} {n:g}" for op, n in sorted(counts.layer.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
