"""make gpu-check: the real NVML path on this GPU: counter vs integrated energy, idle power, sampler cost, engines."""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import torch

from w2w import distributed, engines
from w2w.energy.errors import EnergyError
from w2w.energy.monitor import EnergyMonitor
from w2w.engines.common import DECODE, Engine, PhaseClock, SamplingParams, synchronize
from w2w.model import ModelArgs, Transformer, build_model, parameter_shapes

# LLaMA-7B's layer shape; the layer count is cut to what a quarter of the GPU's memory holds.
LLAMA_7B = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-6)


LOADED_OVER_IDLE = 1.1
ENGINES_CHECK = " vs ".join(engines.ENGINES)  # "fast vs llama1 vs llama2"
# The long-window and sampler checks decode as a default cell does: with w2w-run's default engine.
DECODE_ENGINE = "fast"


@dataclass(frozen=True)
class Workload:
    args: ModelArgs
    batch: int
    prompt_len: int
    gen_len: int
    dtype: torch.dtype


@dataclass(frozen=True)
class Settings:
    idle_s: float = 5.0  # idle baseline
    long_window_s: float = 60.0  # counter vs integrated: long enough that the edges do not matter
    rounds: int = 6  # sampler on/off pairs, interleaved so clock and thermal drift hit both alike
    interval_s: float = 0.1
    agree_pct: float = 5.0
    cost_pct: float = 1.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: information, or nothing to check on this GPU
    detail: str


def size_workload(memory_bytes: int) -> Workload:
    """7B layers in fp16 on about a quarter of the memory (at most 32 layers), the KV cache on another quarter."""
    args = LLAMA_7B
    per_layer = 2 * (4 * args.dim * args.dim + 3 * args.dim * args.ffn_hidden)
    embeddings = 2 * 2 * args.vocab_size * args.dim
    layers = max(1, min(32, int((memory_bytes / 4 - embeddings) / per_layer)))
    prompt_len, gen_len = 128, 256
    per_row = 2 * layers * (prompt_len + gen_len) * args.dim * 2  # K and V, fp16
    batch = max(1, min(64, int(memory_bytes / 4 / per_row)))
    sized = replace(args, n_layers=layers, max_seq_len=prompt_len + gen_len)
    return Workload(sized, batch, prompt_len, gen_len, torch.float16)


def build_random_model(workload: Workload, device: torch.device) -> Transformer:
    """Random weights drawn on the device itself: seconds, where drawing 7B values on the host takes minutes."""
    gen = torch.Generator(device=device).manual_seed(0)
    state = {}
    for name, shape in parameter_shapes(workload.args).items():
        if len(shape) == 1:
            state[name] = torch.ones(shape, device=device, dtype=workload.dtype)
        else:
            weight = torch.randn(shape, generator=gen, device=device, dtype=workload.dtype)
            state[name] = weight.div_(math.sqrt(shape[-1]))
    model = build_model(workload.args, state, device, workload.dtype)
    del state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def _prompts(workload: Workload) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(1, workload.args.vocab_size, (workload.batch, workload.prompt_len), generator=gen).tolist()


def decode_run(engine: Engine, workload: Workload, monitor: EnergyMonitor,
               gen_len: int | None = None) -> tuple[int, float]:
    """One batch as the runner measures a cell (phase windows included): decode tokens and decode seconds.
    gen_len: fewer new tokens (a warm-up) in the workload's own cache, so its shapes are the measured ones."""
    from w2w.energy.phases import PhaseEnergy

    phases = PhaseEnergy(monitor)
    clock = PhaseClock(engine.model.device, phases.on_boundary)
    params = SamplingParams(max_gen_len=gen_len or workload.gen_len, greedy=True, force_max_gen_len=True)
    clock.enter(None)
    monitor.begin_window("cell")
    gen = engine.generate(_prompts(workload), params, eos_id=-1, pad_id=0,
                          cache_len=workload.prompt_len + workload.gen_len, clock=clock)
    monitor.end_window("cell")
    return gen.decode_steps * workload.batch, clock.seconds[DECODE]


def check_idle(monitor: EnergyMonitor, settings: Settings) -> tuple[Check, float | None]:
    idle = monitor.measure_idle(settings.idle_s)
    limit = monitor.meter.enforced_limit_w()
    if idle.idle_power_w is None:
        return Check("idle power", False, f"no idle figure: {idle.idle_reason}"), None
    ceiling = 0.6 * limit if limit else 1000.0
    ok = 5.0 <= idle.idle_power_w <= ceiling
    detail = f"{idle.idle_power_w:.1f} W over {idle.idle_s:.1f} s ({idle.idle_source}); plausible: 5 W to {ceiling:.0f} W"
    return Check("idle power", ok, detail), idle.idle_power_w


def warm_up(engine: Engine, workload: Workload, monitor: EnergyMonitor) -> None:
    """A short decode in the measured batch's cache (allocation, kernel selection, fast's capture),
    so none of it happens inside the long window."""
    decode_run(engine, workload, monitor, gen_len=4)


def check_long_window(engine: Engine, workload: Workload, monitor: EnergyMonitor, settings: Settings,
                      idle_w: float | None) -> Check:
    """Counter and integrated energy over one long window of real decoding."""
    monitor.begin_window("long")
    start = time.perf_counter()
    while time.perf_counter() - start < settings.long_window_s:
        decode_run(engine, workload, monitor)
    window = monitor.end_window("long")
    counter, integrated = window.counter_gpu_j, window.integrated_gpu_j
    if integrated is None:
        return Check("counter vs integrated", False, f"no power samples: {window.reason}")
    mean_w = integrated / window.duration_s
    above = f"; {mean_w / idle_w:.1f}x idle" if idle_w else ""
    if counter is None:
        return Check("counter vs integrated", None,
                     f"no energy counter on this GPU: integrated only, {integrated:.0f} J over {window.duration_s:.0f} s")
    diff = 100.0 * (integrated - counter) / counter
    detail = (f"counter {counter:.0f} J, integrated {integrated:.0f} J ({monitor.power_reading} power, "
              f"{len(window.samples)} samples) over {window.duration_s:.0f} s: {diff:+.2f}% (limit ±{settings.agree_pct:g}%)"
              f"; mean {mean_w:.0f} W{above}")
    # A loaded GPU draws clearly more than at rest; "above idle" by a margin, not by rounding noise.
    loaded = mean_w > LOADED_OVER_IDLE * (idle_w or 0.0)
    return Check("counter vs integrated", abs(diff) <= settings.agree_pct and loaded, detail)


def check_sampler_cost(engine: Engine, workload: Workload, on: EnergyMonitor, off: EnergyMonitor,
                       settings: Settings) -> Check:
    """Decode throughput with the sampler on and off, interleaved, medians compared."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    for index in range(settings.rounds):
        for sampling in ((True, False) if index % 2 == 0 else (False, True)):
            tokens, seconds = decode_run(engine, workload, on if sampling else off)
            rates[sampling].append(tokens / seconds)
    with_sampler, without = statistics.median(rates[True]), statistics.median(rates[False])
    cost = 100.0 * (without - with_sampler) / without
    spread = 100.0 * (max(rates[False]) - min(rates[False])) / without
    detail = (f"decode {with_sampler:.0f} tokens/s sampling every {settings.interval_s * 1000:.0f} ms vs "
              f"{without:.0f} without: {cost:+.2f}% slower (target < {settings.cost_pct:g}%; "
              f"run-to-run spread without sampler {spread:.2f}%, {settings.rounds} rounds each)")
    return Check("sampler cost", cost < settings.cost_pct, detail)


def check_runner(device: torch.device, sweep: Path) -> Check:
    """One tiny cell through w2w-run's own code path on this GPU, then the reducer."""
    from w2w.analysis.reduce import reduce_sweep
    from w2w.config import compose_grid
    from w2w.runner import run_cells

    cells = compose_grid([
        "gpu.device=cuda", "gpu.name=gpu-check", "energy.backend=nvml", "energy.idle_seconds=1",
        "precision=fp16", "max_gen_len=64", "dataset.num_prompts=8", "batch_size=4", f"sweep_dir={sweep}",
    ])
    statuses = run_cells(cells)
    row = reduce_sweep(sweep).iloc[0]
    timelines = list((sweep / "cells").glob("*/rank-*.timeline.parquet"))
    ok = statuses == ["ok"] and row["energy_j"] is not None and row["energy_j"] > 0 and len(timelines) == 1
    detail = (f"status {statuses}, energy {row['energy_j']} J ({row['energy_source']}), idle {row['idle_power_w']} W, "
              f"SM util {row['sm_util_avg_pct']}%, enforced cap {row['power_cap_enforced_w']} W, "
              f"{len(timelines)} timeline file(s)")
    return Check("w2w-run cell", ok, detail)


def engine_run(engine: Engine, workload: Workload, monitor: EnergyMonitor,
               gen_len: int | None = None) -> tuple[int, float, float | None]:
    """One greedy batch with `engine` in an energy window: (new tokens, seconds, GPU joules or None)."""
    params = SamplingParams(max_gen_len=gen_len or workload.gen_len, greedy=True, force_max_gen_len=True)
    synchronize(engine.model.device)
    monitor.begin_window("engine")
    gen = engine.generate(_prompts(workload), params, eos_id=-1, pad_id=0,
                          cache_len=workload.prompt_len + workload.gen_len)
    synchronize(engine.model.device)
    window = monitor.end_window("engine")
    return sum(len(row) for row in gen.tokens), window.duration_s, window.gpu_j


def check_engines(by_name: dict[str, Engine], workload: Workload, monitor: EnergyMonitor) -> Check:
    """Every engine's decode at batch 1 and the workload's batch: tokens/s, mean W, J/token; the
    first engine's speed-up over each other one."""
    parts, speedups = [], []
    first, *others = by_name
    for batch in sorted({1, workload.batch}):
        sized = replace(workload, batch=batch)
        rates = {}
        for name, engine in by_name.items():
            engine_run(engine, sized, monitor, gen_len=4)  # warm-up; fast captures its graph here
            tokens, seconds, joules = engine_run(engine, sized, monitor)
            rates[name] = tokens / seconds
            energy = (f"{joules / seconds:.0f} W, {joules / tokens:.3g} J/token" if joules is not None
                      else "no energy figure")
            parts.append(f"batch {batch} {name} {rates[name]:.0f} tokens/s, {energy}, decode path: {engine.decode_path}")
        speedups += [f"{first}/{other} {rates[first] / rates[other]:.2f}x at batch {batch}" for other in others]
    return Check(ENGINES_CHECK, None, "; ".join(parts + speedups))


def _failed(name: str, exc: BaseException) -> Check:
    return Check(name, False, f"raised {type(exc).__name__}: {exc}")


def run_checks(device: torch.device, workload: Workload, settings: Settings, nvml: ModuleType | None = None,
               runner: bool = True, emit: Callable[[Check], None] | None = None) -> list[Check]:
    """Every check, in order, each passed to emit as soon as it finishes; nvml: a fake module in tests,
    None for the real one. A check that raises is a FAIL with its error, and the next checks still run."""
    on = EnergyMonitor("nvml", device, sample_interval_s=settings.interval_s, sampler=True, nvml=nvml)
    off = EnergyMonitor("auto", device, sampler=False, nvml=nvml)  # the same windows, no thread
    checks: list[Check] = []
    state: dict = {}

    def need(key: str):
        if key not in state:
            raise RuntimeError(f"no {key}: an earlier check failed")
        return state[key]

    def gpu() -> Check:
        info = on.gpu_record()
        return Check("GPU", None, (
            f"{info['gpu_name']} ({info['gpu_uuid']}), driver {info['driver']}, energy counter "
            f"{'yes' if info['energy_counter'] else 'NO'}, power reading {info['power_reading']}, "
            f"limit {info['power_limit_w']} W (enforced {info['enforced_power_limit_w']} W)"))

    def model() -> Check:
        state["model"] = build_random_model(workload, device)
        # One engine each for every check, so the fast engine's graphs are captured once.
        state["engines"] = {name: engines.create(name, state["model"]) for name in engines.ENGINES}
        args = workload.args
        synchronize(device)
        return Check("model", None, (
            f"{args.n_layers} layers of dim {args.dim} ({args.num_params() / 1e9:.2f} B params, {workload.dtype}), "
            f"batch {workload.batch}, prompt {workload.prompt_len}, {workload.gen_len} new tokens"))

    def idle() -> Check:
        check, state["idle_w"] = check_idle(on, settings)
        return check

    def long_window() -> Check:
        engine = need("engines")[DECODE_ENGINE]
        warm_up(engine, workload, off)
        return check_long_window(engine, workload, on, settings, state.get("idle_w"))

    def run(name: str, step: Callable[[], Check]) -> None:
        try:
            check = step()
        except Exception as exc:  # a check that raises is a FAIL, and the next checks still run
            check = _failed(name, exc)
        checks.append(check)
        if emit is not None:
            emit(check)

    try:
        run("GPU", gpu)
        run("model", model)
        run("idle power", idle)
        run("counter vs integrated", long_window)
        run("sampler cost", lambda: check_sampler_cost(need("engines")[DECODE_ENGINE], workload, on, off, settings))
        run(ENGINES_CHECK, lambda: check_engines(need("engines"), workload, on))
    finally:
        state.clear()
        on.close()
        off.close()
    if runner:
        run("w2w-run cell", lambda: _runner_check(device))
    return checks


def _runner_check(device: torch.device) -> Check:
    with tempfile.TemporaryDirectory(prefix="w2w-gpu-check-") as sweep:
        return check_runner(device, Path(sweep))


def line(check: Check) -> str:
    marks = {True: "PASS", False: "FAIL", None: "INFO"}
    return f"{marks[check.ok]}  {check.name}: {check.detail}"


def summary(checks: list[Check], seconds: float) -> str:
    failed = sum(c.ok is False for c in checks)
    return f"gpu-check: {'all checks passed' if not failed else f'{failed} check(s) failed'} in {seconds:.0f} s"


def report(checks: list[Check], seconds: float) -> str:
    return "\n".join([*(line(c) for c in checks), summary(checks, seconds)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m w2w.gpu_check", description=__doc__)
    parser.add_argument("--long-window-s", type=float, default=Settings.long_window_s)
    parser.add_argument("--rounds", type=int, default=Settings.rounds)
    parser.add_argument("--idle-s", type=float, default=Settings.idle_s)
    parser.add_argument("--interval-s", type=float, default=Settings.interval_s)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: error: no NVIDIA GPU visible (torch.cuda.is_available() is False): run "
              "`make gpu-check` on a machine with an NVIDIA GPU and a CUDA build of torch", file=sys.stderr)
        return 2
    start = time.perf_counter()
    settings = Settings(idle_s=args.idle_s, long_window_s=args.long_window_s, rounds=args.rounds,
                        interval_s=args.interval_s)
    try:
        info = distributed.init("cuda", timeout_s=600)
        distributed.init_model_parallel(1, info.world_size)
        workload = size_workload(torch.cuda.get_device_properties(info.device).total_memory)
        checks = run_checks(info.device, workload, settings, emit=lambda c: print(line(c), flush=True))
    except EnergyError as exc:
        print(f"gpu-check: error: {exc}", file=sys.stderr)
        return 2
    print(summary(checks, time.perf_counter() - start))
    return 1 if any(c.ok is False for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
