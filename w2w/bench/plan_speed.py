"""Login-node speed: composition per cell (uncached vs cached by group choices) and planning imports, in one run."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from w2w.config import Composer, expand_overrides

EXPERIMENT = "+experiment=paper_all"
PLAN_TARGET_S = 3.0  # the bound for `w2w-sweep --plan +experiment=paper_all`
HELP_TARGET_S = 0.5  # and for `w2w-sweep --help` or a one-line error
PLAN_IMPORT = "import w2w.launch.sweep"
PAPER_ROWS = 4096  # the paper's prompts per dataset


def write_paper_datasets(folder: Path, rows: int = PAPER_ROWS) -> dict[str, str]:
    """Local Alpaca and GSM8K files of `rows` rows each (.jsonl, as the hub's fields), and the
    environment (W2W_ALPACA, W2W_GSM8K) that points the paper presets at them: they plan offline."""
    folder.mkdir(parents=True, exist_ok=True)
    alpaca, gsm8k = folder / "alpaca.jsonl", folder / "gsm8k.jsonl"
    with alpaca.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"instruction": f"Name {i % 7 + 1} uses of energy number {i}.",
                                "input": "" if i % 3 else f"Context {i}.", "output": "..."}) + "\n")
    with gsm8k.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"question": f"A node draws {i} W for {i % 9 + 1} s. How many joules?",
                                "answer": f"{i} * {i % 9 + 1} = {i * (i % 9 + 1)}\n#### {i * (i % 9 + 1)}"}) + "\n")
    return {"W2W_ALPACA": str(alpaca), "W2W_GSM8K": str(gsm8k)}


def _points() -> list[list[str]]:
    parts = Composer().subgrids([EXPERIMENT])
    return [point for part in parts for point in expand_overrides(part)]


def compose_per_cell_s(points: list[list[str]], cached: bool) -> tuple[float, float]:
    """(wall, CPU) seconds per cell; uncached, a fresh Composer per cell runs Hydra each time (the old path)."""
    composer = Composer()
    wall, cpu = time.perf_counter(), time.process_time()
    for point in points:
        (composer if cached else Composer()).cell(point)
    return (time.perf_counter() - wall) / len(points), (time.process_time() - cpu) / len(points)


def _seconds(code: str, repeats: int, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Median (wall, CPU) seconds of a fresh interpreter running `code`; CPU is steadier on a shared machine."""
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=env)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def _verdict(seconds: float, target: float) -> str:
    return f"target < {target:g} s: {'met' if seconds < target else 'NOT met'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sample", type=int, default=24, help="paper_all cells composed the old way")
    parser.add_argument("--repeats", type=int, default=3, help="fresh interpreters per timing")
    args = parser.parse_args(argv)
    points = _points()
    compose_per_cell_s(points[:2], cached=True)  # warm the file cache and lazy imports for both
    sample = points[:: max(1, len(points) // args.sample)]
    old_wall, old_cpu = compose_per_cell_s(sample, cached=False)
    new_wall, new_cpu = compose_per_cell_s(points, cached=True)
    print(f"composition per paper_all cell: {old_wall * 1e3:.1f} ms ({old_cpu * 1e3:.1f} ms CPU) with Hydra per "
          f"cell ({len(sample)} cells), {new_wall * 1e3:.1f} ms ({new_cpu * 1e3:.1f} ms CPU) cached by group "
          f"choices (all {len(points)} cells, first compositions included): {old_cpu / new_cpu:.1f}x less CPU")

    light = _seconds(PLAN_IMPORT, args.repeats)
    heavy = _seconds(f"{PLAN_IMPORT}; import torch, fairscale.nn.model_parallel.layers", args.repeats)
    print(f"planning imports: {light[0]:.2f} s ({light[1]:.2f} s CPU); with torch and FairScale as before: "
          f"{heavy[0]:.2f} s ({heavy[1]:.2f} s CPU): {heavy[1] / light[1]:.1f}x less CPU")

    with tempfile.TemporaryDirectory(prefix="w2w-bench-plan-") as tmp:  # --plan snapshots the prompts there
        env = os.environ | write_paper_datasets(Path(tmp) / "data")
        plan = _seconds(f"from w2w.launch.sweep import main; main(['--plan', '{EXPERIMENT}', 'sweep_dir={tmp}/sweep'])",
                        1, env)
    usage = _seconds("from w2w.launch.sweep import main; main(['--help'])", args.repeats)
    estimate = old_cpu * len(points) + heavy[1]
    print(f"w2w-sweep --plan {EXPERIMENT}: {plan[0]:.2f} s ({plan[1]:.2f} s CPU; {_verdict(plan[0], PLAN_TARGET_S)}); "
          f"the old path's CPU estimate (imports with torch + Hydra per cell): {estimate:.2f} s")
    print(f"w2w-sweep --help: {usage[0]:.2f} s ({usage[1]:.2f} s CPU; {_verdict(usage[0], HELP_TARGET_S)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
