"""The roof beside the joule: each cell's decode bandwidth against its GPU's rated one, and what bounds it."""

from __future__ import annotations

import pandas as pd

from w2w.records import RankRecord

# At or above this share of the rated bandwidth a decode phase is memory-bound.
MEMORY_BOUND_PCT = 50.0
MEMORY_BOUND, COMPUTE_BOUND, LAUNCH_BOUND = "memory-bound", "compute-bound", "launch-bound"
COLUMNS = ("decode_gbs", "roof_pct", "decode_flop_per_byte", "bound_by", "roof_note")


def _gpu(record: RankRecord) -> dict:
    return (record.config or {}).get("gpu") or {}


def roof_columns(records: list[RankRecord]) -> dict:
    """decode_gbs: bytes the decode steps read on a GPU (weights + KV cache, estimated) / decode time,
    the slowest rank's; roof_pct: that over the GPU's rated bandwidth (gpu.hbm_gbs); bound_by:
    memory-bound at >= MEMORY_BOUND_PCT of it, else compute-bound where the steps' arithmetic
    intensity (2 FLOP per weight per row) reaches the GPU's ridge (peak_tflops / hbm_gbs), else
    launch-bound (neither memory nor arithmetic is the limit: kernel launches and synchronization)."""
    empty = dict.fromkeys(COLUMNS)
    rates, intensity = [], None
    for r in records:
        c, t = r.counts, r.times
        if c is None or t is None or c.decode_read_bytes is None or not t.decode_s or not c.decode_steps:
            return empty | {"roof_note": "no roof: decode bytes or time not recorded"}
        rates.append(c.decode_read_bytes / t.decode_s / 1e9)
        if r.rank == min(x.rank for x in records):
            # FLOP per weight byte read: each weight element does 2 FLOP per row of the batch.
            element_b = 4 if r.params.get("precision") == "fp32" else 2
            rows = c.responses / c.batches if c.batches else 0.0
            intensity = 2.0 * rows / element_b
    gbs = min(rates)  # ranks step together: the slowest one's pace is the cell's
    gpu = _gpu(records[0])
    rated, tflops = gpu.get("hbm_gbs"), gpu.get("peak_tflops")
    if not rated:
        return empty | {"decode_gbs": gbs, "decode_flop_per_byte": intensity,
                        "roof_note": f"no roof: gpu={gpu.get('name')} has no rated bandwidth (hbm_gbs)"}
    pct = 100.0 * gbs / rated
    if pct >= MEMORY_BOUND_PCT:
        bound = MEMORY_BOUND
    elif tflops and intensity is not None and intensity >= tflops * 1e3 / rated:
        bound = COMPUTE_BOUND
    elif tflops:
        bound = LAUNCH_BOUND
    else:
        bound = None
    note = "" if bound else f"below the roof; gpu={gpu.get('name')} has no peak_tflops to tell compute from launch"
    return {"decode_gbs": gbs, "roof_pct": pct, "decode_flop_per_byte": intensity, "bound_by": bound,
            "roof_note": note}


# What the DVFS section shows of each cell: the three knobs, speed, energy split, and the roof.
DVFS_COLUMNS = ("cell_id", "gpu_clock_mhz", "power_cap_w", "batch_size", "tokens_per_s", "energy_per_token_j",
                "static_energy_per_token_j", "dynamic_energy_per_token_j", "decode_gbs", "roof_pct", "bound_by")


def dvfs_section(cells: pd.DataFrame) -> list[str]:
    """The page's section: locked clock x power cap x batch, each cell's energy split and roof, and the
    cells on the energy/speed frontier among them (the DVFS frontier)."""
    from w2w.analysis import pareto, tables

    done = tables.ok(cells)
    lines = ["## Clocks, caps and the roof (DVFS frontier)", "",
             "Each cell's locked SM clock (gpu_clock_mhz; empty: the GPU's own), power cap and batch size; its "
             "energy split into static (the GPU loaded and waiting, measured after each warm-up, x the cell's "
             "time) and dynamic (the rest), per returned token; and its decode steps' bandwidth (bytes read per "
             "step: weights + KV cache, estimated) against the GPU's rated one (gpu.hbm_gbs): memory-bound at "
             f">= {MEMORY_BOUND_PCT:g}% of it, else compute-bound past the ridge (peak_tflops / hbm_gbs), else "
             "launch-bound. On the frontier: no other cell is both faster and cheaper per token.", ""]
    if done.empty or "energy_per_token_j" not in done or done["energy_per_token_j"].isna().all():
        return [*lines, "No ok cell has an energy reading.", ""]
    front = set(pareto.frontier(done, "energy_per_token_j", "tokens_per_s", True)["cell_id"])
    frame = done[[c for c in DVFS_COLUMNS if c in done]].copy()
    frame["on_frontier"] = frame["cell_id"].isin(front)
    notes = sorted({n for n in done.get("roof_note", pd.Series(dtype=str)).dropna() if n})
    return [*lines, tables.markdown(frame), "", *(f"- {n}" for n in notes), ""]
