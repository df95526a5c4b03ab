"""The reducer at scale: 200 cells x 32 ranks with 10-minute 100 ms timelines, timed in one run."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from w2w.analysis.reduce import reduce_sweep
from w2w.config import compose_cell
from w2w.energy.nvml import TELEMETRY_COLUMNS
from w2w.energy.sampler import timeline_frame
from w2w.records import SCHEMA_VERSION, STATUS_OK, record_path, timeline_path

TARGET_S = 60.0  # the bound for the whole reduction on 2 cores
GPUS_PER_NODE = 2


def _config() -> dict:
    """A real resolved cell config: records carry it, and it is most of a record's bytes."""
    return compose_cell(["model=llama_65b", "gpu=v100", "cluster=supercloud", "shards=32", "batch_size=64"]).to_dict()


def _record(config: dict, cid: str, rank: int, world: int, samples: int, interval_s: float) -> dict:
    """What the runner writes for one (cell, rank), with plausible values."""
    total_s = samples * interval_s
    power = 180.0 + 2.0 * (rank % 7)
    return {
        "schema": SCHEMA_VERSION, "sweep_dir": "bench", "job_id": "1000", "cell_id": cid, "rank": rank,
        "local_rank": rank % GPUS_PER_NODE, "world_size": world, "host": f"n{rank // GPUS_PER_NODE}",
        "node": f"n{rank // GPUS_PER_NODE}", "device": f"cuda:{rank % GPUS_PER_NODE}",
        "params": {"model": "llama_65b", "gpu": "v100", "dataset": "gsm8k", "shards": world, "precision": "fp16",
                   "batch_size": 64, "max_gen_len": 256, "num_prompts": 4096, "power_cap_w": None,
                   "temperature": 0.8, "top_p": 0.95, "greedy": False, "force_max_gen_len": False, "seed": 1},
        "config": config, "status": STATUS_OK,
        "counts": {"prompts": 4096, "responses": 4096, "prompt_tokens": 300_000, "output_tokens": 700_000,
                   "output_words": 500_000},
        "times": {"start_unix_s": 1.7e9, "total_s": total_s, "prefill_s": 0.1 * total_s,
                  "decode_s": 0.9 * total_s, "warmup_s": 3.0},
        "energy": {"source": "nvml_counter", "gpu_j": power * total_s, "counter_gpu_j": power * total_s,
                   "integrated_gpu_j": power * total_s, "prefill_gpu_j": 0.1 * power * total_s,
                   "decode_gpu_j": 0.9 * power * total_s, "warmup_gpu_j": 500.0, "idle_power_w": 40.0,
                   "load_gpu_j": 9000.0, "cpu_j": 30_000.0 if rank % GPUS_PER_NODE == 0 else None,
                   "cpu_reason": None if rank % GPUS_PER_NODE == 0 else "read by local rank 0",
                   "sample_interval_s": interval_s, "reason": None},
        "telemetry": {"samples": samples, "power_avg_w": power, "sm_util_avg_pct": 95.0, "mem_util_max_pct": 24.0,
                      "mem_used_max_pct": 60.0},
        "timeline": timeline_path("", cid, rank).name,
        "gpu": {"gpu_name": "Tesla V100-SXM2-32GB", "gpu_uuid": f"GPU-{rank}"},
        "power_cap": {"requested_w": None, "enforced_w": 250.0},
    }


def _timeline(rank: int, samples: int, interval_s: float, noise: np.ndarray) -> pa.Table:
    """The runner's timeline for one rank, built by the runner's own timeline_frame from sampler rows.

    Rows follow TELEMETRY_COLUMNS, so a column the sampler gains appears here too: plausible values
    for the columns named below, None (what a GPU does not offer) for any other.
    """
    t = np.arange(samples, dtype="float64") * interval_s
    base = np.roll(noise[:samples], rank)
    values = {"power_w": 180.0 + 30.0 * base, "sm_util_pct": np.round(95 + 4 * base),
              "mem_util_pct": np.round(24 + 3 * base), "mem_used_mib": np.full(samples, 19_660.0),
              "temp_c": np.round(60 + 5 * base), "sm_clock_mhz": np.full(samples, 1380.0),
              "throttle_reasons": np.zeros(samples)}
    none = [None] * samples
    columns = [values.get(name, none) for name in TELEMETRY_COLUMNS]
    rows = list(zip(t, *columns, strict=True))
    return pa.Table.from_pandas(timeline_frame(rows, 0.0, 1.7e9, rank), preserve_index=False)


def synthesize(sweep: Path, cells: int, ranks: int, samples: int, interval_s: float) -> int:
    """Write the sweep; returns its size in bytes."""
    config = _config()
    noise = np.random.default_rng(0).standard_normal(samples + ranks)
    # A rank's timeline is the same in every cell: built once per rank, written per cell.
    timelines = [_timeline(rank, samples, interval_s, noise) for rank in range(ranks)]
    size = 0
    for index in range(cells):
        cid = f"{index:012x}"
        for rank in range(ranks):
            path = record_path(sweep, cid, rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            # The runner's bytes (write_json's format) without its per-file fsync, which only slows synthesis.
            path.write_text(json.dumps(_record(config, cid, rank, ranks, samples, interval_s), indent=1,
                                       sort_keys=True, default=str) + "\n")
            timeline = timeline_path(sweep, cid, rank)
            pq.write_table(timelines[rank], timeline)
            size += path.stat().st_size + timeline.stat().st_size
    return size


def bare_read_s(sweep: Path) -> float:
    """Reading every file's bytes and nothing else: the floor the reducer is compared with."""
    start = time.perf_counter()
    for path in (sweep / "cells").rglob("rank-*"):
        path.read_bytes()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--ranks", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=10.0, help="timeline length per cell")
    parser.add_argument("--interval", type=float, default=0.1, help="timeline sample interval (s)")
    parser.add_argument("--keep", type=Path, default=None, help="write the sweep here and keep it")
    args = parser.parse_args(argv)
    samples = round(args.minutes * 60 / args.interval)
    records = args.cells * args.ranks
    with tempfile.TemporaryDirectory(prefix="w2w-reduce-bench-") as tmp:
        sweep = args.keep or Path(tmp) / "sweep"
        start = time.perf_counter()
        size = synthesize(sweep, args.cells, args.ranks, samples, args.interval)
        print(f"synthesized {args.cells} cells x {args.ranks} ranks: {records} records + {records} timelines of "
              f"{samples} samples ({records * samples / 1e6:.1f}M samples, {size / 1e9:.2f} GB) in "
              f"{time.perf_counter() - start:.1f} s (files are in the page cache: a warm read)")
        start = time.perf_counter()
        table = reduce_sweep(sweep)
        reduce_s = time.perf_counter() - start
        bare_s = bare_read_s(sweep)
    ok = int((table["status"] == STATUS_OK).sum())
    print(f"reduce_sweep (records + timelines): {reduce_s:.1f} s -> {records / reduce_s:,.0f} records/s, "
          f"{records * samples / reduce_s / 1e6:.2f}M samples/s; {ok}/{len(table)} cells ok")
    print(f"bare read of the same files: {bare_s:.1f} s; reducer / bare read: {reduce_s / bare_s:.1f}x")
    verdict = "met" if reduce_s < TARGET_S else "NOT met"
    print(f"target: the whole reduction under {TARGET_S:.0f} s: {verdict} ({reduce_s:.1f} s)")
    return 0 if ok == args.cells else 1


if __name__ == "__main__":
    raise SystemExit(main())
