"""Serving at rate=inf with max_slots=B against offline fast at batch B on the same prompts: tokens/s and their ratio.

Both run the same model, prompts and token count (force_max_gen_len: every request max_gen_len
tokens), one after the other in one process, each warmed up first; the ratio is serving's tokens/s
over offline's (the issue's target: >= 0.9 on a GPU). It also traces one decode step of each on
the ATen dispatcher and prints the operators that differ: only the ring's bookkeeping outside the
layers (the step column's wrap, the positions' clamp) against offline's output-column writes.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from w2w import distributed, engines
from w2w.engines.common import SamplingParams, new_generator
from w2w.engines.fast import StaticDecoder
from w2w.engines.serving import ContinuousBatch, Request, RingDecoder
from w2w.model import DTYPES, ModelArgs, build_model, random_state_dict


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def step_ops(engine, slots: int, cache_len: int, params: SamplingParams) -> tuple[Counter, Counter]:
    """ATen operators of one decode step of offline fast's decoder and of serving's ring decoder."""
    out = []
    for kind in (StaticDecoder, RingDecoder):
        decoder = engine.decoder(slots, cache_len, params, kind)
        with torch.inference_mode(), _Ops() as trace:
            decoder.step()
        out.append(trace.ops)
    return out[0], out[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> float:
    distributed.init(args.device, timeout_s=600)
    distributed.init_model_parallel(1, 1)
    device = torch.device(args.device if args.device == "cpu" else "cuda:0")
    shape = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                      vocab_size=args.vocab, multiple_of=32, max_seq_len=args.prompt_len + args.new_tokens + 64)
    model = build_model(shape, random_state_dict(shape, 0), device, DTYPES[args.dtype])
    engine = engines.create("fast", model)
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, args.vocab) for _ in range(rng.randrange(args.prompt_len // 2, args.prompt_len))]
               for _ in range(args.slots * args.batches)]
    params = SamplingParams(max_gen_len=args.new_tokens, greedy=True, force_max_gen_len=True)
    cache_len = engines.SPECS["fast"].cache_len(max(map(len, prompts)) + args.new_tokens, shape.max_seq_len)

    def offline() -> int:
        tokens = 0
        for i in range(0, len(prompts), args.slots):
            tokens += sum(map(len, engine.generate(prompts[i:i + args.slots], params, -1, 0, cache_len).tokens))
        return tokens

    def serving() -> int:
        batch = ContinuousBatch(engine, args.slots, cache_len, params, -1, new_generator(device, 1))
        with torch.inference_mode():
            served = batch.serve([Request(i, p, 0.0) for i, p in enumerate(prompts)], time.monotonic, time.sleep)
        return sum(len(s.tokens) for s in served.served)

    rates = {}
    for name, fn in (("offline", offline), ("serving", serving)):
        fn()  # warm-up: allocation, kernel choice, the graph capture
        best = 0.0
        for _ in range(args.repeats):
            _sync(device)
            start = time.perf_counter()
            tokens = fn()
            _sync(device)
            best = max(best, tokens / (time.perf_counter() - start))
        rates[name] = best
        print(f"{name:8s} B={args.slots}: {best:10.1f} tokens/s (best of {args.repeats})")
    ratio = rates["serving"] / rates["offline"]
    print(f"ratio serving/offline: {ratio:.3f} (target >= 0.9 on a GPU; {args.device}, {args.dtype})")
    static, ring = step_ops(engine, args.slots, cache_len, params)
    print(f"decode step operators: offline {sum(static.values())}, serving {sum(ring.values())}; "
          f"serving only: {dict(ring - static)}; offline only: {dict(static - ring)}")
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--slots", type=int, default=16, help="max_slots = the offline batch size B")
    parser.add_argument("--batches", type=int, default=4, help="prompts = slots x batches")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
