"""Energy that checks itself: each cell's GPU readings against each other, and the node's boundary against its parts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from w2w.records import STATUS_OK, RankRecord

COLUMNS = ("readings_flag", "missing_readings", "boundary_flag")


@dataclass(frozen=True)
class NodeParts:
    """What a node's own meters saw of one cell, in J: each GPU once, and its CPUs with DRAM once."""

    node: str
    gpu_j: float | None  # every distinct GPU of the node (by UUID), whatever the ranks on it
    gpus: int
    cpu_j: float | None  # RAPL packages + DRAM, read by the node's local rank 0
    bound_j: float  # the parts' worst-case bounds, summed

    @property
    def total_j(self) -> float | None:
        return None if self.gpu_j is None or self.cpu_j is None else self.gpu_j + self.cpu_j


def node_parts(records: list[RankRecord]) -> list[NodeParts]:
    """Per node: GPU + CPU + DRAM of the cell; a GPU that two ranks report is counted once."""
    out = []
    for node in sorted({r.node or "?" for r in records}):
        on = [r for r in records if (r.node or "?") == node]
        gpus: dict[str, RankRecord] = {}
        for r in on:
            gpus.setdefault(str(r.gpu.get("gpu_uuid") or f"rank {r.rank}"), r)
        gpu_values = [r.energy.gpu_j for r in gpus.values()]
        gpu_j = None if any(v is None for v in gpu_values) else math.fsum(gpu_values)
        reader = next((r for r in on if r.local_rank == 0), None)
        cpu_j = reader.energy.cpu_j if reader is not None else None
        bound = math.fsum(r.energy.gpu_bound_j or 0.0 for r in gpus.values())
        bound += (reader.energy.cpu_bound_j or 0.0) if reader is not None else 0.0
        out.append(NodeParts(node, gpu_j, len(gpus), cpu_j, bound))
    return out


def boundary_flag(parts: list[NodeParts], node_energy_j: float | None) -> str | None:
    """Where SLURM's node energy is below what the node's own meters saw (beyond their bounds): the figures.

    node_energy_j covers every node of the cell (sacct sums a step's nodes): with one node it is that
    node's; with several it is checked against their parts summed. Parts without a CPU figure are
    checked on their GPUs alone (a lower bound still)."""
    if node_energy_j is None or not parts:
        return None
    gpu = [p.gpu_j for p in parts]
    if any(v is None for v in gpu):
        return None
    cpu = [p.cpu_j for p in parts]
    with_cpu = all(v is not None for v in cpu)
    inside = math.fsum(gpu) + (math.fsum(cpu) if with_cpu else 0.0)
    slack = math.fsum(p.bound_j for p in parts)
    if node_energy_j >= inside - slack:
        return None
    what = "GPU + CPU + DRAM" if with_cpu else "GPU"
    where = parts[0].node if len(parts) == 1 else f"{len(parts)} nodes"
    gpus = sum(p.gpus for p in parts)
    return (f"node energy below its parts on {where}: SLURM {node_energy_j:.1f} J < {what} {inside:.1f} J "
            f"({gpus} GPU(s) counted once each, bound ±{slack:.1f} J)")


def add_flags(table: pd.DataFrame, records: dict[str, list[RankRecord]]) -> pd.DataFrame:
    """The cells table with COLUMNS: the readings' disagreements and gaps per rank, the boundary check."""
    table = table.copy()
    for column in COLUMNS:
        table[column] = ""
    for i in table.index:
        found = records.get(table.at[i, "cell_id"])
        if table.at[i, "status"] != STATUS_OK or not found:
            continue
        ranks = sorted(found, key=lambda r: r.rank)
        table.at[i, "readings_flag"] = "; ".join(f"rank {r.rank}: {r.energy.readings_flag}"
                                                  for r in ranks if r.energy.readings_flag)
        table.at[i, "missing_readings"] = "; ".join(
            f"rank {r.rank}: {name}: {why}" for r in ranks for name, why in (r.energy.missing_readings or {}).items())
        node = table.at[i, "node_energy_j"] if "node_energy_j" in table else None
        node = None if node is None or (isinstance(node, float) and math.isnan(node)) else float(node)
        table.at[i, "boundary_flag"] = boundary_flag(node_parts(ranks), node) or ""
    return table


def report_section(cells: pd.DataFrame) -> list[str]:
    """The page's section: cells whose readings disagree, readings a GPU lacks, boundaries violated."""
    done = cells[cells["status"] == STATUS_OK] if "status" in cells else cells
    lines = ["## Energy self-checks", "",
             "Each window is read three ways where the GPU offers them: NVML's energy counter, the integrated "
             "instant power (NVML_FI_DEV_POWER_INSTANT) and the integrated 1 s-average power. A cell whose "
             "readings lie further apart than their bound explains is flagged with them. SLURM's node energy "
             "must be at least the node's GPUs (each once) + CPU + DRAM.", ""]
    flagged = [(r["cell_id"], column, r[column]) for r in done.to_dict("records")
               for column in COLUMNS if r.get(column)]
    if not flagged:
        return [*lines, "No cell flagged: every cell's readings agree within their bounds, none is missing, "
                "and no node's energy is below its parts.", ""]
    return [*lines, *(f"- cell {cid}: {column}: {text}" for cid, column, text in flagged), ""]
