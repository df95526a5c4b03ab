"""Node energy as SLURM accounted it (sacct ConsumedEnergyRaw per job step), apportioned to cells by their time."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from w2w.records import RankRecord

SACCT_TIMEOUT_S = 60
# sacct prints NO_VAL64 and its neighbours (>= 2^63) for a figure it does not have.
_NO_VALUE = 2**63
# The steps that ran w2w: srun's numbered steps. The batch and extern steps overlap them (the batch
# script's step spans the whole allocation on the first node), so they are never added to them.
_NUMBERED_STEP = re.compile(r"(?P<job>.+)\.(?P<step>\d+)")
PLUGIN_HINT = ("SLURM accounts node energy only with an acct_gather_energy plugin (AcctGatherEnergyType in "
               "slurm.conf: ipmi, rapl, xcc, gpu, pm_counters)")


@dataclass(frozen=True)
class JobEnergy:
    """The numbered steps of one SLURM job: their node energy in J (None: not accounted) and wall time in s."""

    energy_j: float | None
    elapsed_s: float


def _energy(text: str) -> float | None:
    """ConsumedEnergyRaw in J; None where sacct has no figure ('' or NO_VAL) or it is 0 (no plugin counted)."""
    text = text.strip()
    if not text.isdigit():
        return None
    value = int(text)
    return float(value) if 0 < value < _NO_VALUE else None


def parse_sacct(text: str) -> dict[str, JobEnergy]:
    """`sacct -n -P -o JobID,ConsumedEnergyRaw,ElapsedRaw` output as each job's numbered steps summed."""
    steps: dict[str, list[tuple[float | None, float]]] = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 3:
            continue
        match = _NUMBERED_STEP.fullmatch(fields[0].strip())
        if match is None:
            continue  # the allocation line, or its batch/extern step
        elapsed = float(fields[2]) if fields[2].strip().isdigit() else 0.0
        steps.setdefault(match["job"], []).append((_energy(fields[1]), elapsed))
    return {job: JobEnergy(None if any(e is None for e, _ in rows) else sum(e for e, _ in rows),
                           sum(s for _, s in rows)) for job, rows in steps.items()}


def _run(argv: list[str]) -> tuple[str | None, str | None]:
    """A SLURM command's stdout, or None and why it gave none."""
    if shutil.which(argv[0]) is None:
        return None, f"no `{argv[0]}` on PATH: this machine has no SLURM client"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=SACCT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"`{' '.join(argv[:2])} ...` failed: {exc}"
    if done.returncode != 0:
        return None, f"`{' '.join(argv[:2])} ...` failed: {(done.stderr or done.stdout).strip()[:200]}"
    return done.stdout, None


def energy_plugin() -> str | None:
    """The site's AcctGatherEnergyType (e.g. acct_gather_energy/none), where scontrol says."""
    out, _ = _run(["scontrol", "show", "config"])
    for line in (out or "").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "AcctGatherEnergyType":
            return value.strip()
    return None


def read_jobs(job_ids: Iterable[str]) -> tuple[dict[str, JobEnergy], str | None]:
    """Every job's node energy from sacct; an empty mapping and the reason where sacct cannot say."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}, None
    out, reason = _run(["sacct", "-n", "-P", "-o", "JobID,ConsumedEnergyRaw,ElapsedRaw", "-j", ",".join(ids)])
    return (parse_sacct(out), None) if out is not None else ({}, reason)


def no_energy_reason(job: str, plugin: str | None) -> str:
    site = f"this site runs {plugin}" if plugin else "sacct has no figure"
    return f"SLURM accounted no energy for job {job} ({site}): {PLUGIN_HINT}"


def cell_seconds_by_job(record: RankRecord) -> dict[str, float]:
    """The cell's wall time in each job that ran it (its batches of each segment; older records: the whole cell)."""
    jobs = {s.segment: s.job_id for s in record.segments}
    seconds: dict[str, float] = {}
    for batch in record.batches:
        job = jobs.get(batch.segment)
        if job is not None:
            seconds[str(job)] = seconds.get(str(job), 0.0) + float(batch.times.total_s or 0.0)
    if not seconds and record.job_id is not None and record.times is not None and record.times.total_s is not None:
        seconds[str(record.job_id)] = record.times.total_s
    return seconds


def apportion(seconds: dict[str, float], jobs: dict[str, JobEnergy],
              plugin: str | None = None) -> tuple[float | None, str | None]:
    """The cell's share of its jobs' node energy, by its share of each job's wall time; or None and why
    (plugin: the site's AcctGatherEnergyType, for the reason)."""
    if not seconds:
        return None, "the records name no SLURM job"
    total = 0.0
    for job, cell_s in sorted(seconds.items()):
        found = jobs.get(job)
        if found is None:
            return None, f"sacct lists no step of job {job}"
        if found.energy_j is None:
            return None, no_energy_reason(job, plugin)
        if found.elapsed_s <= 0:
            return None, f"sacct gives job {job} no elapsed time"
        total += found.energy_j * min(cell_s / found.elapsed_s, 1.0)
    return total, None
