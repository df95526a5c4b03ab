"""make gpu-accept: one short GPU acceptance run, each step a process with its own timeout, results as they come, a JSON summary."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from w2w import distributed, engines
from w2w.engines import fast
from w2w.engines.common import SamplingParams
from w2w.model import ModelArgs, build_model, random_state_dict

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=256)
TAIL_CHARS = 4000  # of each step's output, in the summary
# The steps' timeouts on a GPU sum under this: the whole run fits a short loan of an H100 (8 minutes).
BUDGET_S = 480
# The CPU dry run's timeouts are these times the GPU's: a shared 2-core CI box is not the GPU node.
CPU_SLACK = 4


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    timeout_s: float
    gpu_only: bool = False  # no CPU dry run (NVML): reported as skipped there


@dataclass
class Result:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float
    returncode: int | None
    tail: str


def steps(device: str, gpu: str, out: Path) -> list[Step]:
    """The acceptance steps; on the CPU each is its dry run (tiny model, short windows)."""
    py, cpu = [sys.executable, "-m"], device == "cpu"
    sweep = [*py, "w2w.launch.sweep", "--wait", "--poll", "2", f"sweep_dir={out / 'sweep'}", "model=tiny",
             "shards=1", f"engine={','.join(engines.ENGINES)}", "batch_size=1,8", "max_gen_len=32", "dataset.num_prompts=16",
             "greedy=true", f"gpu={'cpu' if cpu else gpu}", f"precision={'fp32' if cpu else 'fp16'}"]
    bench = ["--device", "cpu", "--tiny", "--batches", "1", "4", "--new-tokens", "8", "--repeats", "1"] if cpu else \
        ["--batches", "1", "64", "--repeats", "2"]
    check = ["--idle-s", "3", "--long-window-s", "20", "--rounds", "2"]
    slack = CPU_SLACK if cpu else 1
    return [
        Step("fallback", [*py, "w2w.gpu_accept", "--step", "fallback", "--device", device], 40 * slack),
        Step("launches", [*py, "w2w.bench.launches", "--dtype", "fp32"], 60 * slack),
        Step("gpu-check", [*py, "w2w.gpu_check", *check], 100 * slack, gpu_only=True),
        Step("bench-gpu", [*py, "w2w.bench.gpu_engines", *bench], 120 * slack),
        Step("sweep", sweep, 90 * slack),
        Step("reduce", [*py, "w2w.analysis.reduce", str(out / "sweep")], 30 * slack),
        Step("power-cap", [*py, "w2w.gpu_accept", "--step", "power-cap", "--device", device], 20 * slack),
    ]


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
        status = "ok" if proc.returncode == 0 else "failed"
    except TimeoutError:
        proc.kill()
        proc.wait()
        status = "timeout"
    seconds = time.monotonic() - start
    print(f"== {step.name}: {status} in {seconds:.1f} s", flush=True)
    return Result(step.name, status, round(seconds, 1), proc.returncode, "".join(lines)[-TAIL_CHARS:])


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


def check_fallback(device: torch.device) -> int:
    """A capture that fails falls back to eager and says so, with the tokens of the default path."""
    distributed.init(device.type, timeout_s=60)
    distributed.init_model_parallel(1, 1)
    model = build_model(TINY, random_state_dict(TINY, 3), device, torch.float32)
    prompts, params = [[1, 5, 9, 12], [1, 7]], SamplingParams(max_gen_len=16, greedy=True, force_max_gen_len=True)

    def failing(step):
        raise RuntimeError("injected capture failure")

    default = engines.create("fast", model)
    broken = fast.Engine(model, capture=failing)
    same = default.generate(prompts, params, 2, 0).tokens == broken.generate(prompts, params, 2, 0).tokens
    print(f"default engine: graph {default.graph!r}; failing capture: graph {broken.graph!r}; same tokens: {same}")
    expected = "cuda graph" if device.type == "cuda" else "eager"
    ok = same and default.graph == expected and broken.graph.startswith("eager, capture failed: RuntimeError")
    return 0 if ok else 1


def check_power_cap(device: torch.device) -> int:
    """Set a real cap 100 W under the current limit (within the GPU's range), read it back, restore."""
    if device.type != "cuda":
        print("skipped: no GPU (dry run)")
        return 0
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        before = pynvml.nvmlDeviceGetPowerManagementLimit(handle)
        low, _ = pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
        target = max(low, before - 100_000)
        try:
            pynvml.nvmlDeviceSetPowerManagementLimit(handle, target)
            enforced = pynvml.nvmlDeviceGetEnforcedPowerLimit(handle)
        finally:
            pynvml.nvmlDeviceSetPowerManagementLimit(handle, before)
        restored = pynvml.nvmlDeviceGetPowerManagementLimit(handle)
    finally:
        pynvml.nvmlShutdown()
    print(f"limit {before / 1000:.0f} W -> set {target / 1000:.0f} W, enforced {enforced / 1000:.0f} W -> "
          f"restored {restored / 1000:.0f} W")
    return 0 if enforced == target and restored == before else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m w2w.gpu_accept", description=__doc__)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of every step")
    parser.add_argument("--gpu", default="h200", help="the gpu= profile of the sweep step")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_accept"))
    parser.add_argument("--only", nargs="+", help="run only these steps")
    parser.add_argument("--step", choices=["fallback", "power-cap"], help=argparse.SUPPRESS)  # one step's body
    args = parser.parse_args(argv)
    if args.step:
        device = torch.device(args.device)
        return check_fallback(device) if args.step == "fallback" else check_power_cap(device)
    start, results = time.monotonic(), []
    args.out.mkdir(parents=True, exist_ok=True)
    for step in steps(args.device, args.gpu, args.out.resolve()):
        if args.only and step.name not in args.only:
            continue
        if step.gpu_only and args.device == "cpu":
            print(f"== {step.name}: skipped (needs a GPU and NVML)", flush=True)
            results.append(Result(step.name, "skipped", 0.0, None, ""))
            continue
        results.append(run_step(step))
    summary = {"device": args.device, "seconds": round(time.monotonic() - start, 1),
               "ok": all(r.status in ("ok", "skipped") for r in results), "steps": [asdict(r) for r in results]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    for r in results:
        print(f"{r.name:>10}: {r.status} ({r.seconds:.1f} s)")
    print(f"gpu-accept: {'ok' if summary['ok'] else 'FAILED'} in {summary['seconds']:.1f} s; "
          f"summary: {args.out / 'summary.json'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
