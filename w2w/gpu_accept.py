"""make gpu-accept: one short GPU acceptance run, each step a process with its own timeout, results as they come, a JSON summary."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch.overrides import TorchFunctionMode

from w2w import distributed, engines
from w2w.engines import fast
from w2w.engines.common import SamplingParams
from w2w.model import ModelArgs, build_model, random_state_dict

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=256)
TAIL_CHARS = 4000  # of each step's output, in the summary
# The whole command on a short loan (8 minutes): the install, then the steps' timeouts, sum under this.
BUDGET_S = 480
# The offline install of ../shared/GPU.md (pip from local wheels, editable w2w): a few seconds there; this much allowed.
INSTALL_S = 30
# Timeouts are at least this many times a step's expected duration on the GPU.
HEADROOM = 1.5
# The CPU dry run's timeouts are these times the GPU's: a shared 2-core CI box is not the GPU node.
CPU_SLACK = 4
# The three outcomes: ran and met every target; ran and missed (each miss named); could not run.
MET, MISSED, COULD_NOT_RUN = 0, 1, 2
SKIPPED = 3  # a --step body that did nothing (a dry run, no root): its step is "skipped"


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    timeout_s: float
    expected_s: float  # on the GPU: measured where `measured`, else an estimate (see steps())
    measured: bool = False
    gpu_only: bool = False  # no CPU dry run (NVML): reported as skipped there


@dataclass
class Result:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float
    returncode: int | None
    tail: str
    misses: list[str] = field(default_factory=list)  # the step's MISS/FAIL lines
    decode_paths: list[str] = field(default_factory=list)  # the step's "decode path" lines


@dataclass(frozen=True)
class Gpu:
    name: str  # as NVML says
    uuid: str
    profile: str | None  # the conf/gpu profile whose name the NVML name contains


def _step(name: str, argv: list[str], expected_s: float, measured: bool, slack: float, gpu_only: bool = False) -> Step:
    return Step(name, argv, round(HEADROOM * expected_s) * slack, expected_s, measured, gpu_only)


def steps(device: str, gpu: Gpu | None, out: Path, power_cap: bool = False, sweep: bool = False) -> list[Step]:
    """The acceptance steps; on the CPU each is its dry run (tiny model, short windows).

    Fitted to the budget from step times measured on an H100 (../shared/GPU.md's loan, 2026-11-27):
    gpu-check with these settings took about 125 s, bench-gpu with --batches 1 64 --repeats 2
    110-160 s. bench-gpu runs one repeat here (the median of one run): 2 x 4 decodes fewer, about
    130 s at most (an estimate). The CPU-only launch count (make bench-launches) is not repeated on
    the GPU node, and the tiny sweep is opt-in (--sweep; gpu-check's last check already runs one
    w2w-run cell and the reducer on the GPU): both would take the plan past 8 minutes.
    """
    py, cpu = [sys.executable, "-m"], device == "cpu"
    slack = CPU_SLACK if cpu else 1
    bench = ["--device", "cpu", "--tiny", "--batches", "1", "4", "--new-tokens", "8", "--repeats", "1"] if cpu else \
        ["--batches", "1", "64", "--repeats", "1"]
    check = ["--idle-s", "3", "--long-window-s", "20", "--rounds", "2"]
    plan = [
        # A tiny model, four short decodes: about 15 s with the CUDA start (an estimate).
        _step("fallback", [*py, "w2w.gpu_accept", "--step", "fallback", "--device", device], 20, False, slack),
        _step("gpu-check", [*py, "w2w.gpu_check", *check], 125, True, slack, gpu_only=True),
        _step("bench-gpu", [*py, "w2w.bench.gpu_engines", *bench], 130, False, slack),
    ]
    if power_cap:  # NVML calls after the torch import: a few seconds (an estimate)
        plan.append(_step("power-cap", [*py, "w2w.gpu_accept", "--step", "power-cap", "--device", device], 10, False,
                          slack))
    if sweep:
        profile = "cpu" if cpu else (gpu.profile if gpu and gpu.profile else "h100")
        name = [] if cpu or gpu is None else [f"gpu.name={gpu.name.replace(' ', '_')}"]
        argv = [*py, "w2w.launch.sweep", "--wait", "--poll", "2", f"sweep_dir={out / 'sweep'}", "model=tiny",
                "shards=1", f"engine={','.join(engines.ENGINES)}", "batch_size=8", "max_gen_len=32", "dataset.num_prompts=16",
                "greedy=true", f"gpu={profile}", *name, f"precision={'fp32' if cpu else 'fp16'}"]
        plan += [_step("sweep", argv, 60, False, slack), _step("reduce", [*py, "w2w.analysis.reduce", str(out / "sweep")],
                                                                 20, False, slack)]
    return plan


def planned_s(plan: list[Step]) -> float:
    """The whole command's worst case on the GPU: the install and every step's timeout."""
    return INSTALL_S + sum(step.timeout_s for step in plan)


def run_step(step: Step) -> Result:
    """Run one step, echoing its output line by line as it comes; killed at its timeout."""
    print(f"== {step.name}: {' '.join(step.argv)} (timeout {step.timeout_s:g} s)", flush=True)
    start, lines = time.monotonic(), []
    proc = subprocess.Popen(step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        deadline = start + step.timeout_s
        for text in _lines(proc, deadline):
            print(f"   {step.name}| {text}", end="" if text.endswith("\n") else "\n", flush=True)
            lines.append(text)
        status = {0: "ok", SKIPPED: "skipped"}.get(proc.returncode, "failed")
    except TimeoutError:
        proc.kill()
        proc.wait()
        status = "timeout"
    seconds = time.monotonic() - start
    print(f"== {step.name}: {status} in {seconds:.1f} s", flush=True)
    misses = [line.strip() for line in lines if line.startswith(("MISS", "FAIL"))]
    paths = [line.strip() for line in lines if "decode path" in line]
    return Result(step.name, status, round(seconds, 1), proc.returncode, "".join(lines)[-TAIL_CHARS:], misses, paths)


def _lines(proc: subprocess.Popen, deadline: float):
    """The process's output lines until it exits; TimeoutError past the deadline (a watchdog kills
    the process, so a silent hang ends too)."""
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), proc.kill)
    timer.start()
    try:
        yield from proc.stdout
        proc.wait()
    finally:
        timer.cancel()
    if time.monotonic() > deadline:
        raise TimeoutError


class SyncMidway(TorchFunctionMode):
    """Lets `after` torch calls of a step run, then synchronizes, as a step that syncs inside a CUDA
    capture does: on CUDA the real sync (which a capture refuses), on the CPU the error CUDA raises."""

    def __init__(self, after: int):
        super().__init__()
        self.left = after

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.left -= 1
        if self.left == 0:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                torch.cuda.synchronize()
            else:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing (simulated on the CPU)")
        return func(*args, **(kwargs or {}))


def failing_midway(capture: fast.Capture, calls: list) -> fast.Capture:
    """`capture` of a step that syncs after its first dozen operators: the capture fails midway."""
    def attempt(step: Callable[[], None]) -> Callable[[], None]:
        calls.append(step)

        def syncing() -> None:
            with SyncMidway(after=12):
                step()

        return capture(syncing)

    return attempt


def _run_once(step: Callable[[], None]) -> Callable[[], None]:
    """The CPU's stand-in for a capture: runs the step as a capture records it."""
    step()
    return step


def check_fallback(device: torch.device) -> int:
    """A capture that fails midway: the engine runs eagerly from then on, for every shape, with the
    tokens of the default path, and says why; a later engine's capture still works."""
    distributed.init(device.type, timeout_s=60)
    distributed.init_model_parallel(1, 1)
    model = build_model(TINY, random_state_dict(TINY, 3), device, torch.float32)
    params = SamplingParams(max_gen_len=16, greedy=True, force_max_gen_len=True)
    shapes = [[[1, 5, 9, 12], [1, 7]], [[1, 4, 4]]]  # two batch shapes: the second must not capture again
    default = engines.create("fast", model)
    expected = [default.generate(prompts, params, 2, 0).tokens for prompts in shapes]
    calls: list = []
    broken = fast.Engine(model, capture=failing_midway(fast.cuda_capture if device.type == "cuda" else _run_once, calls))
    got = [broken.generate(prompts, params, 2, 0).tokens for prompts in shapes]
    later = engines.create("fast", model)  # a capture after the failure, in the same process
    later_tokens = later.generate(shapes[0], params, 2, 0).tokens
    want = "cuda graph" if device.type == "cuda" else "eager"
    checks = [
        (default.graph == want, f"default engine: decode path {default.decode_path}"),
        (broken.graph.startswith("eager, capture failed: "), f"capture failing midway: decode path {broken.decode_path}"),
        (len(calls) == 1, f"captures tried by the failing engine over {len(shapes)} shapes: {len(calls)} (one)"),
        (got == expected, "its eager tokens equal the default path's, both shapes"),
        (later.graph == want and later_tokens == expected[0],
         f"a later engine: decode path {later.decode_path}, tokens {'equal' if later_tokens == expected[0] else 'DIFFER'}"),
    ]
    for ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}", flush=True)
    return MET if all(ok for ok, _ in checks) else MISSED


def check_power_cap(device: torch.device, nvml: ModuleType | None = None) -> int:
    """Opt-in: cap this GPU (found by UUID) 100 W under its limit, read it back, restore it; without
    root NVML refuses, and the step says so and changes nothing. nvml: a fake module in tests."""
    from w2w.energy.errors import GpuNoPermissionError, PowerCapError
    from w2w.energy.nvml import import_nvml, open_gpu_meter
    from w2w.energy.powercap import PowerCapper

    if nvml is None and device.type != "cuda":
        print("skipped: no GPU (dry run)")
        return SKIPPED
    meter = open_gpu_meter(nvml or import_nvml(), device, 0, instant_power=False)
    capper = PowerCapper(meter, None)
    limits = meter.power_limits()
    before, low = limits["power_limit_w"], limits["min_power_limit_w"]
    if before is None:
        print(f"skipped: {meter.located_by} reports no power limit to change")
        return SKIPPED
    target = max(low or 0.0, before - 100.0)
    try:
        capper.apply(target)
        enforced = meter.enforced_limit_w()
    except PowerCapError as exc:
        if isinstance(exc.__cause__, GpuNoPermissionError):
            print(f"skipped: needs root (NVML refused to set the power limit of {meter.located_by}; left at {before:g} W)")
            return SKIPPED
        print(f"FAIL  power cap on {meter.located_by}: {exc}")
        return MISSED
    finally:
        capper.restore()
    restored = meter.power_limits()["power_limit_w"]
    print(f"{meter.located_by}: limit {before:g} W -> set {target:g} W, enforced {enforced:g} W -> restored {restored:g} W")
    return MET if restored == before else MISSED


def find_gpu() -> Gpu:
    """The GPU the steps will use (CUDA device 0), named by NVML; RuntimeError where there is none."""
    from w2w.bench.gpu_engines import gpu_profile
    from w2w.energy.errors import EnergyError
    from w2w.energy.nvml import call, import_nvml, nvml_index

    if not torch.cuda.is_available():
        raise RuntimeError("no NVIDIA GPU visible (torch.cuda.is_available() is False): run on the GPU machine "
                           "with a CUDA build of torch, or dry-run with --device cpu")
    try:
        nvml = import_nvml()
        call(nvml, "nvmlInit")
        try:
            index = nvml_index(0)  # CUDA device 0 through CUDA_VISIBLE_DEVICES, as the steps see it
            how = "nvmlDeviceGetHandleByIndex" if isinstance(index, int) else "nvmlDeviceGetHandleByUUID"
            handle = call(nvml, how, index)
            name, uuid = (_text(call(nvml, fn, handle)) for fn in ("nvmlDeviceGetName", "nvmlDeviceGetUUID"))
        finally:
            call(nvml, "nvmlShutdown")
    except (EnergyError, ImportError) as exc:
        raise RuntimeError(f"NVML cannot name the GPU: {exc}") from exc
    return Gpu(name, uuid, gpu_profile(name))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)  # older pynvml answers bytes


def default_out() -> Path:
    """Under $OUT where it is set (what a lent GPU machine sends back), else runs/gpu_accept."""
    return Path(os.environ["OUT"]) / "gpu_accept" if os.environ.get("OUT") else Path("runs/gpu_accept")


def outcome(results: list[Result]) -> tuple[int, list[str]]:
    """MET, or MISSED with each miss named: a step that failed or timed out, and each MISS/FAIL line."""
    misses = []
    for r in results:
        if r.status in ("failed", "timeout"):
            misses.append(f"{r.name}: {r.status}" + (f" (exit {r.returncode})" if r.status == "failed" else ""))
        misses += [f"{r.name}: {line}" for line in r.misses]
    return (MISSED if misses else MET), misses


STATUS = {MET: "met", MISSED: "missed", COULD_NOT_RUN: "could not run"}


def write_summary(out: Path, summary: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m w2w.gpu_accept", description=__doc__)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of every step")
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT/gpu_accept where $OUT is set, "
                        "else runs/gpu_accept")
    parser.add_argument("--only", nargs="+", help="run only these steps")
    parser.add_argument("--power-cap", action="store_true", help="also set a power cap and restore it (changes the "
                        "GPU's setting for seconds; needs root)")
    parser.add_argument("--sweep", action="store_true", help="also a tiny sweep and its reduction (past the 8-minute plan)")
    parser.add_argument("--step", choices=["fallback", "power-cap"], help=argparse.SUPPRESS)  # one step's body
    args = parser.parse_args(argv)
    if args.step:
        device = torch.device(args.device)
        return check_fallback(device) if args.step == "fallback" else check_power_cap(device)
    out = (args.out or default_out()).resolve()
    start, results = time.monotonic(), []
    summary: dict = {"device": args.device, "dry_run": args.device == "cpu", "out": str(out)}
    gpu = None
    if args.device == "cuda":
        try:
            gpu = find_gpu()
        except RuntimeError as exc:
            summary |= {"status": STATUS[COULD_NOT_RUN], "exit_code": COULD_NOT_RUN, "reason": str(exc), "steps": []}
            path = write_summary(out, summary)
            print(f"gpu-accept: could not run: {exc}; summary: {path}", flush=True)
            return COULD_NOT_RUN
        print(f"GPU: {gpu.name} ({gpu.uuid}), conf/gpu profile {gpu.profile or 'none matches'}", flush=True)
        summary["gpu"] = asdict(gpu)
    plan = steps(args.device, gpu, out, power_cap=args.power_cap, sweep=args.sweep)
    gpu_plan_s = planned_s(steps("cuda", gpu, out, power_cap=args.power_cap, sweep=args.sweep))
    print(f"plan: {', '.join(s.name for s in plan)}; on the GPU at most {gpu_plan_s:g} s with the install "
          f"(budget {BUDGET_S} s{'; OVER IT: --sweep' if gpu_plan_s >= BUDGET_S else ''})", flush=True)
    for step in plan:
        if args.only and step.name not in args.only:
            continue
        if step.gpu_only and args.device == "cpu":
            print(f"== {step.name}: skipped (needs a GPU and NVML)", flush=True)
            results.append(Result(step.name, "skipped", 0.0, None, ""))
            continue
        results.append(run_step(step))
    code, misses = outcome(results)
    summary |= {"status": STATUS[code], "exit_code": code, "misses": misses,
                "decode_paths": [f"{r.name}: {p}" for r in results for p in r.decode_paths],
                "seconds": round(time.monotonic() - start, 1), "planned_gpu_s": gpu_plan_s, "budget_s": BUDGET_S,
                "steps": [asdict(r) for r in results]}
    path = write_summary(out, summary)
    for r in results:
        print(f"{r.name:>10}: {r.status} ({r.seconds:.1f} s)")
    for miss in misses:
        print(f"MISSED {miss}")
    dry = " (dry run on the CPU: the targets are judged on a GPU)" if args.device == "cpu" else ""
    print(f"gpu-accept: {STATUS[code]}{dry} in {summary['seconds']:.1f} s; summary: {path}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
