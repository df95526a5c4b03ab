"""make bench-gpu: every w2w engine vs transformers eager, same LLaMA-7B-shaped weights, in one run, with CUDA kernels per decode step."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from w2w import distributed, engines
from w2w.energy.monitor import EnergyMonitor
from w2w.engines.common import DECODE, Engine, PhaseClock, SamplingParams, synchronize
from w2w.hf import hf_name, permute_rotary
from w2w.model import ModelArgs, build_model, parameter_shapes

SEVEN_B = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-6)
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, multiple_of=16)
ENGINES = tuple(engines.ENGINES)
# The targets of issue 9 on an H100, as ratios from one run.
FAST_ROOF_AT_BATCH_1 = 0.60
FAST_OVER_TRANSFORMERS = 2.0
REFERENCE_BAND = 0.20


@dataclass
class Run:
    tokens_per_s: float
    step_s: float | None  # decode step (w2w engines); None where the engine does not say
    joules: float | None  # GPU energy of the run from NVML; None without a meter
    seconds: float
    tokens: int
    rows: list[list[int]]

    @property
    def mean_w(self) -> float | None:
        return None if self.joules is None else self.joules / self.seconds

    @property
    def j_per_token(self) -> float | None:
        return None if self.joules is None else self.joules / self.tokens


def draw_state(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights in Meta's naming, drawn on the device (seconds; the host would take minutes)."""
    gen = torch.Generator(device=device).manual_seed(0)
    state = {}
    for name, shape in parameter_shapes(args).items():
        if len(shape) == 1:
            state[name] = torch.ones(shape, device=device, dtype=dtype)
        else:
            state[name] = torch.randn(shape, generator=gen, device=device, dtype=dtype).div_(math.sqrt(shape[-1]))
    return state


def transformers_model(args: ModelArgs, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                       attention: str):
    """The same weights in transformers' LlamaForCausalLM (rotary rows permuted to its layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
        tie_word_embeddings=False, attn_implementation=attention,
        # No EOS: min_new_tokens would mask its logit, and w2w's forced tokens do not.
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    converted = {}
    for name, weight in state.items():
        if name.endswith("attention.wq.weight"):
            weight = permute_rotary(weight, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            weight = permute_rotary(weight, args.kv_heads)
        converted[hf_name(name)] = weight
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if [m for m in missing if "rotary" not in m] or unexpected:
        raise RuntimeError(f"transformers model does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def copy_bandwidth_gbs(device: torch.device, megabytes: int, repeats: int = 5) -> float:
    """Bytes read + written per second by a device-to-device copy: the decode step's memory roof."""
    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def gpu_profile(name: str) -> str | None:
    """The conf/gpu profile whose name is in the GPU's (NVML's or torch's) name: "NVIDIA H100 80GB HBM3" -> h100."""
    from w2w.config import package_config_dir

    profiles = sorted(path.stem for path in (package_config_dir() / "gpu").glob("*.yaml") if path.stem != "cpu")
    return next((p for p in profiles if p in name.lower()), None)


def rated_gbs(profile: str | None) -> float | None:
    """The profile's rated memory bandwidth (GB/s, conf/gpu hbm_gbs); None where it has none."""
    if profile is None:
        return None
    from omegaconf import OmegaConf

    from w2w.config import package_config_dir

    value = OmegaConf.load(package_config_dir() / "gpu" / f"{profile}.yaml").get("hbm_gbs")
    return None if value is None else float(value)


def step_bytes(args: ModelArgs, batch: int, kv_len: float, width: int) -> float:
    """Bytes one decode step reads, as gpt-fast counts them: every weight but the embedding table
    (a step gathers `batch` rows of it), and the K and V cache over kv_len positions."""
    weights = (args.num_params() - args.vocab_size * args.dim) * width
    kv = 2 * args.n_layers * batch * kv_len * args.kv_heads * args.head_dim * width
    return weights + kv


def kv_read_len(engine: str, prompt_len: int, new_tokens: int, cache_len: int) -> float:
    """Cache positions a step attends: fast its whole static cache every step; Meta's loops
    (llama1, llama2) the filled part, on average the prompt and half the new tokens."""
    return float(cache_len) if engine == "fast" else prompt_len + new_tokens / 2


@dataclass(frozen=True)
class Roof:
    """A decode step's memory roof: its bytes over the rated bandwidth (conf/gpu), and over the measured copy's."""
    bytes_per_step: float
    rated_gbs: float | None
    copy_gbs: float

    @property
    def rated_s(self) -> float | None:
        return None if self.rated_gbs is None else self.bytes_per_step / (self.rated_gbs * 1e9)

    @property
    def copy_s(self) -> float:
        return self.bytes_per_step / (self.copy_gbs * 1e9)

    def share(self, step_s: float) -> float:
        """The step's share of the roof: rated where known, else the measured copy's."""
        return (self.rated_s if self.rated_s is not None else self.copy_s) / step_s

    def describe(self, step_s: float, profile: str | None) -> str:
        copy = f"copy roof {self.copy_s * 1e3:.3g} ms at the measured {self.copy_gbs:.0f} GB/s"
        if self.rated_s is None:
            return (f"{self.share(step_s):.0%} of the {copy} ({self.bytes_per_step / 1e9:.3g} GB read per step; "
                    f"no rated bandwidth for gpu profile {profile or 'none'})")
        return (f"{self.share(step_s):.0%} of the HBM roof {self.rated_s * 1e3:.3g} ms "
                f"({self.bytes_per_step / 1e9:.3g} GB read per step at {profile}'s rated {self.rated_gbs:.0f} GB/s; "
                f"{copy})")


def metered(monitor: EnergyMonitor, device: torch.device, work: Callable[[], tuple[int, float | None, list]]) -> Run:
    synchronize(device)
    monitor.begin_window("bench")
    tokens, step_s, rows = work()
    synchronize(device)
    window = monitor.end_window("bench")
    return Run(tokens / window.duration_s, step_s, window.gpu_j, window.duration_s, tokens, rows)


def w2w_run(engine: Engine, prompts: torch.Tensor, new_tokens: int, cache_len: int):
    def work() -> tuple[int, float | None, list]:
        params = SamplingParams(max_gen_len=new_tokens, greedy=True, force_max_gen_len=True)
        clock = PhaseClock(engine.model.device)
        gen = engine.generate(prompts.tolist(), params, eos_id=-1, pad_id=0, cache_len=cache_len, clock=clock)
        step = clock.seconds[DECODE] / gen.decode_steps if gen.decode_steps else None
        return sum(len(r) for r in gen.tokens), step, gen.tokens

    return work


def hf_run(model, prompts: torch.Tensor, new_tokens: int):
    def work() -> tuple[int, float | None, list]:
        with torch.inference_mode():
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                 max_new_tokens=new_tokens, pad_token_id=0)
        new = out[:, prompts.shape[1]:]
        if new.shape[1] != new_tokens:
            raise RuntimeError("transformers generated a different number of tokens")
        return new.numel(), None, new.tolist()

    return work


KERNEL_RUNS = (4, 12)  # new tokens of the two profiled runs: their difference is decode steps only


def kernels_per_step(device: torch.device, make: Callable[[int], Callable[[], tuple]]) -> float | None:
    """CUDA kernels (and memcpy/memset) per decode step from the profiler, graph replays included:
    (long run - short run) / the steps between them. None off CUDA (the CPU count: make bench-launches)."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    counts = []
    for tokens in KERNEL_RUNS:
        make(tokens)()  # warm: this length's shapes and graphs exist before the profiled run
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            make(tokens)()
            synchronize(device)
        counts.append(sum(1 for event in prof.events() if event.device_type == DeviceType.CUDA))
    return (counts[1] - counts[0]) / (KERNEL_RUNS[1] - KERNEL_RUNS[0])


def _kernels(count: float | None) -> str:
    return "" if count is None else f", {count:.0f} CUDA kernels per decode step"


def _energy(run: Run) -> str:
    if run.joules is None:
        return "no energy meter"
    return f"{run.mean_w:.0f} W, {run.j_per_token:.4g} J/token"


def _matching(rows: list[list[int]], reference: list[list[int]]) -> str:
    same = sum(a == b for ra, rb in zip(rows, reference, strict=True) for a, b in zip(ra, rb, strict=True))
    return f"{same}/{sum(len(r) for r in reference)}"


def bench_batch(batch: int, models: dict[str, Callable], settings: argparse.Namespace, monitor: EnergyMonitor,
                device: torch.device, roofs: dict[str, Roof], paths: dict[str, Callable[[], str]],
                profile: str | None) -> dict[str, Run]:
    """Warm each implementation up, then interleave the repeats; prints each line as it exists."""
    for make in models.values():
        metered(monitor, device, make(4))  # allocation, kernel selection, fast's graph capture
    runs: dict[str, list[Run]] = {name: [] for name in models}
    for _ in range(settings.repeats):
        for name, make in models.items():
            runs[name].append(metered(monitor, device, make(settings.new_tokens)))
    median = {name: sorted(r, key=lambda x: x.tokens_per_s)[len(r) // 2] for name, r in runs.items()}
    kernels = {name: kernels_per_step(device, make) for name, make in models.items()}
    hf = median["transformers"]
    print(f"batch {batch}: transformers {hf.tokens_per_s:.1f} tok/s{_kernels(kernels['transformers'])}, {_energy(hf)}; "
          f"decode path: {paths['transformers']()}", flush=True)
    for engine in ENGINES:
        run = median[engine]
        step = (f", decode step {run.step_s * 1e3:.3g} ms = {roofs[engine].describe(run.step_s, profile)}"
                if run.step_s else "")
        step += _kernels(kernels[engine])
        print(f"batch {batch}: w2w {engine} {run.tokens_per_s:.1f} tok/s, {run.tokens_per_s / hf.tokens_per_s:.2f}x "
              f"vs transformers{step}, {_energy(run)}; greedy tokens equal transformers' "
              f"{_matching(run.rows, hf.rows)}; decode path: {paths[engine]()}", flush=True)
    return median


def targets(results: dict[int, dict[str, Run]], roofs: dict[int, Roof], judged: bool) -> list[str]:
    """PASS or MISS per target; on a dry run (judged False) DRY, for the targets are an H100's."""
    def mark(ok: bool) -> str:
        return ("PASS" if ok else "MISS") if judged else "DRY "

    lines = []
    if 1 in results and results[1]["fast"].step_s:
        roof = roofs[1]
        share = roof.share(results[1]["fast"].step_s)
        which = "HBM roof" if roof.rated_s is not None else "copy roof (no rated bandwidth)"
        lines.append(f"{mark(share >= FAST_ROOF_AT_BATCH_1)} fast at batch 1: {share:.0%} of the "
                     f"{which} (target >= {FAST_ROOF_AT_BATCH_1:.0%})")
    for batch, runs in results.items():
        hf = runs["transformers"].tokens_per_s
        fast, ref = runs["fast"].tokens_per_s / hf, runs["llama2"].tokens_per_s / hf
        lines.append(f"{mark(fast >= FAST_OVER_TRANSFORMERS)} fast at batch {batch}: {fast:.2f}x "
                     f"transformers (target >= {FAST_OVER_TRANSFORMERS:g}x)")
        inside = abs(ref - 1) <= REFERENCE_BAND
        lines.append(f"{mark(inside)} llama2 at batch {batch}: {ref:.2f}x transformers "
                     f"(target within ±{REFERENCE_BAND:.0%})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m w2w.bench.gpu_engines", description=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the logic")
    parser.add_argument("--tiny", action="store_true", help="a tiny fp32 model instead of 7B fp16 (dry run)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention", default="eager", help="transformers attn_implementation")
    parser.add_argument("--copy-mb", type=int, default=1024)
    settings = parser.parse_args(argv)
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench-gpu: error: no NVIDIA GPU visible: run on a GPU machine, or dry-run with --device cpu --tiny",
              flush=True)
        return 2
    dtype = torch.float32 if settings.tiny else torch.float16
    cache_len = settings.prompt_len + settings.new_tokens
    args = replace(TINY if settings.tiny else SEVEN_B, max_seq_len=cache_len)
    info = distributed.init(device.type, timeout_s=600)
    distributed.init_model_parallel(1, info.world_size)
    device = info.device
    state = draw_state(args, device, dtype)
    ours = build_model(args, state, device, dtype)
    hf = transformers_model(args, state, device, dtype, settings.attention)
    del state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    gbs = copy_bandwidth_gbs(device, settings.copy_mb)
    monitor = EnergyMonitor("auto", device, sampler=False)
    width = torch.finfo(dtype).bits // 8
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    profile = gpu_profile(name) if device.type == "cuda" else None
    rated = rated_gbs(profile)
    if device.type != "cuda":
        print("CUDA kernels per decode step: not counted without a GPU (operators per step on the CPU: make bench-launches)")
    print(f"model: {args.num_params() / 1e9:.2f} B params {dtype} on {name}; "
          f"greedy, {settings.prompt_len} prompt + {settings.new_tokens} forced tokens; copy bandwidth {gbs:.0f} GB/s; "
          f"rated bandwidth {f'{rated:.0f} GB/s (conf/gpu/{profile}.yaml)' if rated else 'unknown (no conf/gpu profile)'}; "
          f"energy: {monitor.source if monitor.meter else monitor.reason}; median of {settings.repeats} interleaved runs",
          flush=True)
    gen = torch.Generator().manual_seed(1)
    results, roofs = {}, {}
    by_name = {name: engines.create(name, ours) for name in ENGINES}  # each keeps its graphs across runs
    try:
        for batch in settings.batches:
            prompts = torch.randint(3, args.vocab_size, (batch, settings.prompt_len), generator=gen).to(device)
            models = {
                "transformers": lambda n, p=prompts: hf_run(hf, p, n),
                **{e: (lambda n, p=prompts, e=e: w2w_run(by_name[e], p, n, cache_len)) for e in ENGINES},
            }
            by_engine = {e: Roof(step_bytes(args, batch, kv_read_len(e, settings.prompt_len, settings.new_tokens,
                                                                      cache_len), width), rated, gbs) for e in ENGINES}
            roofs[batch] = by_engine["fast"]
            paths = {"transformers": lambda: f"eager (transformers generate, attn_implementation={settings.attention})",
                     **{e: (lambda e=e: by_name[e].decode_path) for e in ENGINES}}
            results[batch] = bench_batch(batch, models, settings, monitor, device, by_engine, paths, profile)
    finally:
        monitor.close()
    judged = device.type == "cuda" and not settings.tiny
    lines = targets(results, roofs, judged)
    for line in lines:
        print(line)
    worst = min(r["fast"].tokens_per_s / r["transformers"].tokens_per_s for r in results.values())
    print(f"min ratio fast/transformers {worst:.2f}x"
          f" ({'one run' if judged else 'a dry run: the targets are for an H100, not judged here'})")
    return verdict(lines)


def verdict(lines: list[str]) -> int:
    """The exit status: 1 where a target was missed (each MISS line names it), else 0."""
    missed = sum(line.startswith("MISS") for line in lines)
    if missed:
        print(f"bench-gpu: {missed} target(s) missed")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
