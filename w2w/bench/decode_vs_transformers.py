"""Decode throughput of w2w's fast engine vs transformers' generate, same weights, in one run."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from w2w import checkpoint, distributed, engines
from w2w.cell import ModelConfig
from w2w.engines.common import DECODE, PhaseClock, SamplingParams
from w2w.model import build_model


def hf_model(args: argparse.Namespace, directory: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def w2w_model(directory: Path, args: argparse.Namespace):
    cfg = ModelConfig(  # the schema's defaults for the rest
        name="bench", checkpoint_dir=str(directory), dim=args.dim, n_layers=args.layers, n_heads=args.heads,
        vocab_size=args.vocab, multiple_of=256, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=1024,
    )
    model_args = checkpoint.model_args(cfg)
    state = checkpoint.load_rank_state(cfg, model_args, 0, 1)
    return build_model(model_args, state, torch.device("cpu"), torch.float32)


def time_w2w(model, prompts: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(tokens/s over the whole generate call, seconds per decode step)."""
    params = SamplingParams(max_gen_len=new_tokens, greedy=True, force_max_gen_len=True)
    clock = PhaseClock(torch.device("cpu"))
    start = time.perf_counter()
    out = engines.create_serving(["fast"], model)["fast"].generate(prompts.tolist(), params, eos_id=2, pad_id=0, clock=clock)
    elapsed = time.perf_counter() - start
    return prompts.shape[0] * new_tokens / elapsed, clock.seconds[DECODE] / out.decode_steps


def time_hf(model, prompts: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, pad_token_id=0,
        )
    elapsed = time.perf_counter() - start
    if out.shape[1] - prompts.shape[1] != new_tokens:
        raise RuntimeError("transformers generated a different number of tokens")
    return prompts.shape[0] * new_tokens / elapsed


def copy_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes read + written per second by a large tensor copy: the decode step's memory roof."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copy-mb", type=int, default=512, help="size of the copy that measures bandwidth")
    args = parser.parse_args(argv)
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(1, 1)
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model(args, Path(tmp))
        ours = w2w_model(Path(tmp), args)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"model: dim {args.dim}, {args.layers} layers, {n_params / 1e6:.1f}M params fp32, "
          f"{torch.get_num_threads()} threads; greedy, {args.prompt_len} prompt + {args.new_tokens} new tokens")
    gen = torch.Generator().manual_seed(0)
    ratios = []
    for batch in args.batches:
        prompts = torch.randint(3, args.vocab, (batch, args.prompt_len), generator=gen)
        time_w2w(ours, prompts, 4), time_hf(hf, prompts, 4)  # warm-up, excluded
        ours_rates, hf_rates, step_s = [], [], []
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            rate, step = time_w2w(ours, prompts, args.new_tokens)
            ours_rates.append(rate)
            step_s.append(step)
            hf_rates.append(time_hf(hf, prompts, args.new_tokens))
        ours_rate, hf_rate = statistics.median(ours_rates), statistics.median(hf_rates)
        ratios.append(ours_rate / hf_rate)
        print(f"batch {batch}: w2w fast {ours_rate:.1f} tok/s, transformers {hf_rate:.1f} tok/s, "
              f"{ours_rate / hf_rate:.2f}x vs transformers", flush=True)
        if batch == 1:
            bandwidth = copy_bandwidth_gbs(args.copy_mb)
            roof = bandwidth * 1e9 / (n_params * 4)
            decode_rate = 1 / statistics.median(step_s)
            print(f"batch 1 decode: {decode_rate:.1f} steps/s = {decode_rate / roof:.0%} of the memory-bandwidth "
                  f"bound ({roof:.1f} steps/s: {n_params * 4 / 1e6:.0f} MB of weights per step at "
                  f"{bandwidth:.1f} GB/s measured copy bandwidth)")
    print(f"min ratio {min(ratios):.2f}x vs transformers (target >= 1.0x on 2 CPU cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
