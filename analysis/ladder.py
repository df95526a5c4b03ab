"""The energy boundary ladder of each cell (GPU, CPU packages, DRAM, node, facility), its bounds and GPU state."""

from __future__ import annotations

import math

import pandas as pd
from w2w.analysis import sacct, tables
from w2w.analysis.stats import CI95, STD, N, summarize

from w2w.records import STATUS_OK, RankRecord

# Each boundary its own column, never summed with another: the node holds the CPUs, DRAM and GPUs,
# and the facility holds the node. Raw beside above-idle where the boundary has an idle baseline.
BOUNDARY_COLUMNS = {
    "energy_j": "GPU (NVML), J",
    "energy_bound_j": "GPU bound ±J",
    "energy_j_above_idle": "GPU above idle, J",
    "cpu_package_energy_j": "CPU packages (RAPL), J",
    "dram_energy_j": "DRAM (RAPL), J",
    "cpu_energy_bound_j": "CPU+DRAM bound ±J",
    "cpu_energy_j_above_idle": "CPU+DRAM above idle, J",
    "node_energy_j": "node (SLURM), J",
    "facility_energy_j_est": "facility (estimate: node x PUE), J",
}
STATE_COLUMNS = ("temp_start_c", "temp_end_c", "sm_clock_start_mhz", "sm_clock_end_mhz", "throttled",
                 "throttle_reasons")
FLAG_COLUMNS = ("short_windows", "shortest_window_periods", "window_flag")
NOTE_COLUMNS = ("node_note", "facility_note", "cpu_idle_note")
COLUMNS = (*BOUNDARY_COLUMNS, *STATE_COLUMNS, *FLAG_COLUMNS, *NOTE_COLUMNS)
# What the cells table (cells.md) shows of them: a throttled or flagged cell says so in its row.
TABLE_FLAGS = ("energy_bound_j", "throttled", "short_windows")
NO_IDLE = "no idle baseline at this boundary"


def _total(values: list[float | None]) -> float | None:
    """A sum with no part missing (None where any is: never a partial sum)."""
    return None if not values or any(v is None for v in values) else float(math.fsum(values))


def _node_readers(records: list[RankRecord]) -> list[RankRecord] | None:
    """The record that read RAPL on each node (its local rank 0); None where a node has none."""
    readers = {r.node: r for r in records if r.local_rank == 0}
    return None if set(readers) != {r.node for r in records} else list(readers.values())


def _cpu_above_idle(readers: list[RankRecord] | None) -> tuple[float | None, str]:
    if readers is None:
        return None, "a node has no local rank 0 record"
    values = []
    for r in readers:
        e = r.energy
        if e.cpu_j is None or e.idle_cpu_power_w is None or r.times is None:
            return None, e.cpu_reason or e.idle_reason or "no CPU idle baseline (energy.idle_seconds=0?)"
        values.append(e.cpu_j - e.idle_cpu_power_w * r.times.total_s)
    return float(math.fsum(values)), ""


def _window_flag(records: list[RankRecord]) -> dict:
    """Batch windows under energy.min_window_periods update periods (every rank ran the same windows)."""
    counts = [r.energy.short_windows for r in records]
    shortest = [r.energy.shortest_window_periods for r in records if r.energy.shortest_window_periods is not None]
    short = None if any(c is None for c in counts) else max(counts)
    lowest = min(shortest, default=None)
    flag = ""
    if short:
        first = records[0].energy
        period = f" of {first.window_period_s * 1000:.0f} ms" if first.window_period_s is not None else ""
        flag = (f"{short} of {len(records[0].batches) or '?'} batch windows under {first.min_window_periods:g} update "
                f"periods{period} (shortest {lowest:.1f}): their energy is unreliable")
    return {"short_windows": short, "shortest_window_periods": lowest, "window_flag": flag}


def _state(records: list[RankRecord]) -> dict:
    """The GPUs' temperature and SM clock at the cell's edges (hottest, slowest rank), and any throttling."""
    states = [r.gpu_state for r in records if r.gpu_state is not None]

    def pick(key: str, how) -> float | None:
        values = [getattr(s, key) for s in states if getattr(s, key) is not None]
        return how(values) if values else None

    names = sorted({n for s in states for n in (s.clock_event_names or [])})
    throttled = [s.throttled for s in states if s.throttled is not None]
    return {"temp_start_c": pick("temp_start_c", max), "temp_end_c": pick("temp_end_c", max),
            "sm_clock_start_mhz": pick("sm_clock_start_mhz", min), "sm_clock_end_mhz": pick("sm_clock_end_mhz", min),
            "throttled": any(throttled) if throttled else None, "throttle_reasons": ", ".join(names)}


def cell_columns(records: list[RankRecord]) -> dict:
    """One ok cell's ladder columns but the node's and the facility's (add_node_columns)."""
    readers = _node_readers(records)

    def per_node(key: str) -> float | None:
        return None if readers is None else _total([getattr(r.energy, key) for r in readers])

    cpu_idle, cpu_idle_note = _cpu_above_idle(readers)
    return {
        "energy_bound_j": _total([r.energy.gpu_bound_j for r in records]),
        "cpu_package_energy_j": per_node("cpu_package_j"),
        "dram_energy_j": per_node("cpu_dram_j"),
        "cpu_energy_bound_j": per_node("cpu_bound_j"),
        "cpu_energy_j_above_idle": cpu_idle,
        "cpu_idle_note": cpu_idle_note,
        **_window_flag(records),
        **_state(records),
    }


def _slurm_seconds(records: list[RankRecord]) -> tuple[dict[str, float] | None, str]:
    """The cell's seconds in each SLURM job that ran it, or None and why SLURM has no figure for it."""
    first = min(records, key=lambda r: r.rank)
    backend = ((first.config or {}).get("cluster") or {}).get("backend")
    if backend != "slurm":
        return None, f"cluster.backend={backend}: the cell ran outside SLURM, which accounted no energy for it"
    return sacct.cell_seconds_by_job(first), ""


def _pue(records: list[RankRecord]) -> float | None:
    first = min(records, key=lambda r: r.rank)
    return ((first.config or {}).get("cluster") or {}).get("pue")


def _node_energy(records: list[RankRecord], jobs: dict[str, list[sacct.JobEnergy]], failed: str | None,
                 plugin: str | None) -> tuple[float | None, str]:
    """One run's node energy and its note (why it is empty, or its share-above-1 flag)."""
    found, reason = _slurm_seconds(records)
    if found is None:
        return None, f"no node energy: {reason}"
    node, note = (None, failed) if failed else sacct.apportion(found, jobs, plugin)
    return node, f"no node energy: {note}" if node is None else (note or "")


def add_node_columns(table: pd.DataFrame, runs: dict[str, dict[int, list[RankRecord]]]) -> pd.DataFrame:
    """The node (sacct, apportioned by wall time) and facility (node x cluster.pue) columns of every ok cell;
    empty with the reason where there is no figure. `runs`: each cell's runs (repeat -> its records): with
    repeats, the node figure is the mean over the runs that have one, with its spread, n and interval like
    every measured column. Every column of COLUMNS exists afterwards."""
    table = table.copy()
    for column in COLUMNS:
        if column not in table:
            table[column] = None
    ok = [i for i in table.index if table.at[i, "status"] == STATUS_OK and runs.get(table.at[i, "cell_id"])]
    done = {i: {k: rs for k, rs in sorted(runs[table.at[i, "cell_id"]].items()) if rs and all(r.ok for r in rs)}
            for i in ok}
    wanted = [job for i in ok for rs in done[i].values() if (found := _slurm_seconds(rs)[0]) for job in found]
    jobs, failed = sacct.read_jobs(wanted)
    plugin = sacct.energy_plugin() if any(a.energy_j is None for js in jobs.values() for a in js) else None
    for i in ok:
        figures = {k: _node_energy(rs, jobs, failed, plugin) for k, rs in done[i].items()}
        pue = _pue(next(iter(done[i].values()))) if done[i] else None
        node = summarize(n for n, _ in figures.values())
        facility = summarize(n * pue for n, _ in figures.values() if n is not None and pue is not None)
        notes = sorted({note for _, note in figures.values() if note})
        if len(figures) > 1:
            notes = [f"{note} (run(s) {[k for k, (_, n) in figures.items() if n == note]})" for note in notes]
        table.at[i, "node_energy_j"] = node.mean
        table.at[i, "node_note"] = "; ".join(notes)
        table.at[i, "facility_energy_j_est"] = facility.mean
        if len(figures) > 1:
            for column, summary in (("node_energy_j", node), ("facility_energy_j_est", facility)):
                for suffix, value in ((STD, summary.std), (N, summary.n), (CI95, summary.ci95)):
                    if column + suffix not in table:
                        table[column + suffix] = None
                    table.at[i, column + suffix] = value
        table.at[i, "facility_note"] = ("" if node.mean is not None and pue is not None else
                                        "no facility estimate: " + ("no node energy" if node.mean is None else
                                                                    "the cluster profile sets no PUE (cluster.pue)"))
    return table


def notes(table: pd.DataFrame) -> list[str]:
    """The reducer's notes: flagged and throttled cells, and why the node column is empty."""
    done = tables.ok(table)
    out = [f"cell {r['cell_id']}: short windows: {r['window_flag']}" for r in done.to_dict("records")
           if r["window_flag"]]
    out += [f"cell {r['cell_id']}: ran throttled ({r['throttle_reasons']})" for r in done.to_dict("records")
            if r["throttled"] is True]
    # a cell without a node note (a run-0 record of another cell under repeats) has None or NaN there, not text
    empty = done["node_energy_j"].map(tables.is_missing)
    out += [f"node_energy_j empty: {n.removeprefix('no node energy: ')}"
            for n in sorted({n for n in done[empty]["node_note"] if isinstance(n, str) and n})]
    out += [f"cell {r['cell_id']}: node_energy_j {r['node_note']}" for r in done[~empty].to_dict("records")
            if isinstance(r["node_note"], str) and r["node_note"]]  # a share of a job above 1: the figure stands, flagged
    return out


# -- the report's sections ---------------------------------------------------------------------------

_ID = ("cell_id", "model", "gpu", "batch_size", "max_gen_len")


def boundaries_frame(cells: pd.DataFrame) -> pd.DataFrame:
    done = tables.ok(cells)
    return done[[*_ID, *BOUNDARY_COLUMNS]].rename(columns=BOUNDARY_COLUMNS)


def _reasons(done: pd.DataFrame, column: str, note: str) -> list[str]:
    """Why a boundary's column is empty, once per distinct reason."""
    empty = done[done[column].map(tables.is_missing)]
    return sorted({f"{BOUNDARY_COLUMNS[column]} empty: {str(n).split(': ', 1)[-1]}" for n in empty[note] if n})


def report_sections(cells: pd.DataFrame) -> list[str]:
    """The page's sections on energy boundaries, measurement uncertainty and GPU state: their lines."""
    done = tables.ok(cells)
    if done.empty:
        return ["## Energy boundaries", "", "No ok cells.", ""]
    lines = ["## Energy boundaries", "",
             "Each boundary is its own column and none is the sum of others: the node holds the CPUs, DRAM and "
             "GPUs, and the facility holds the node. GPU: every GPU of the cell (NVML). CPU packages and DRAM: RAPL, "
             "each domain once (psys, core/uncore and MMIO duplicates are left out). Node: SLURM's "
             "ConsumedEnergyRaw of the job's steps, apportioned to each cell by its share of the job's wall time. "
             "Facility: the node figure times the cluster profile's PUE, an estimate. Above-idle beside raw where "
             "the boundary has an idle baseline (GPU, CPU+DRAM); the node and facility have none.", "",
             tables.markdown(boundaries_frame(cells)), ""]
    notes = {f"GPU (NVML), J empty: {n.removeprefix('no energy: ')}" for n in done["note"] if n}
    notes |= {f"CPU (RAPL) empty: {n.removeprefix('no CPU energy: ')}" for n in done["cpu_note"] if n}
    notes |= {f"CPU+DRAM above idle empty: {n}" for n in done["cpu_idle_note"] if n}
    for column, note in (("node_energy_j", "node_note"), ("facility_energy_j_est", "facility_note")):
        notes |= set(_reasons(done, column, note))
    notes |= {f"{BOUNDARY_COLUMNS['node_energy_j']} of cell {r['cell_id']}: {r['node_note']}"
              for r in done.to_dict("records") if r["node_note"] and not tables.is_missing(r["node_energy_j"])}
    lines += [f"- {n}" for n in sorted(notes)] + [""]
    return lines + _uncertainty(done) + _gpu_state(done)


def _uncertainty(done: pd.DataFrame) -> list[str]:
    lines = ["## Measurement uncertainty", "",
             "Each energy window carries a worst-case bound: the counter's resolution and one update period at "
             "the peak power at each edge, plus the gap between NVML's counter and the integrated power samples "
             "(GPU); each RAPL zone's resolution, its 1 ms update and the read timer at each edge (CPU+DRAM). A "
             "cell's bound is the sum of its windows' and ranks' bounds, added linearly, not in quadrature: "
             "adjacent windows share their edges and the counter-sample gap is a bias, so the errors are not "
             "independent and a quadrature sum would understate them.", ""]
    flagged = done[done["window_flag"].map(bool)]
    if done["short_windows"].map(tables.is_missing).all():
        lines += ["No window could be checked against energy.min_window_periods: no cell has an energy figure "
                  "with an update period (the energy notes above say why).", ""]
    elif flagged.empty:
        lines += ["No cell has a batch window shorter than energy.min_window_periods update periods.", ""]
    else:
        lines += ["Cells flagged for short windows:", ""]
        lines += [f"- {r['cell_id']} ({r['model']}, batch_size={r['batch_size']}): {r['window_flag']}"
                  for r in flagged.to_dict("records")] + [""]
    return lines


def _gpu_state(done: pd.DataFrame) -> list[str]:
    lines = ["## GPU state", "",
             "Temperature and SM clock at the cell window's edges (hottest and slowest GPU of the cell), and NVML's "
             "clock event reasons seen at any window edge or sampler read. Throttled: a power-cap, thermal or "
             "hardware-slowdown reason was seen.", ""]
    if done[list(STATE_COLUMNS[:4])].map(tables.is_missing).all().all():
        return [*lines, "No GPU state: no cell had an NVML meter (the energy notes above say why).", ""]
    lines += [tables.markdown(done[[*_ID, *STATE_COLUMNS]]), ""]
    throttled = done[done["throttled"] == True]  # noqa: E712 (None is neither)
    lines += [f"- throttled: {r['cell_id']} ({r['throttle_reasons']})" for r in throttled.to_dict("records")]
    return [*lines, ""]
