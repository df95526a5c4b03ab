"""Node energy as SLURM accounted it (sacct ConsumedEnergyRaw per job step), apportioned to cells by their time."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

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
    """The numbered steps of one attempt of a SLURM job (a requeued job has one per run of it): their
    node energy in J (None: not accounted), wall time in s, and the attempt's start and end (s since the
    epoch; None where sacct gave none, or the attempt still runs)."""

    energy_j: float | None
    elapsed_s: float
    start_unix_s: float | None = None
    end_unix_s: float | None = None

    def holds(self, unix_s: float) -> bool:
        """Whether a batch that started at unix_s ran in this attempt."""
        return (self.start_unix_s is not None and self.start_unix_s <= unix_s
                and (self.end_unix_s is None or unix_s <= self.end_unix_s))


def _energy(text: str) -> float | None:
    """ConsumedEnergyRaw in J; None where sacct has no figure ('' or NO_VAL) or it is 0 (no plugin counted)."""
    text = text.strip()
    if not text.isdigit():
        return None
    value = int(text)
    return float(value) if 0 < value < _NO_VALUE else None


def _unix_s(fields: list[str], index: int) -> float | None:
    """A Start or End field printed as seconds since the epoch (SLURM_TIME_FORMAT=%s); None otherwise."""
    text = fields[index].strip() if len(fields) > index else ""
    return float(text) if text.isdigit() else None


@dataclass
class _Attempt:
    """One attempt while sacct's lines are read: its span (every line of it: a step may end after the
    allocation line's End) and its numbered steps' (energy, elapsed)."""

    start_unix_s: float | None = None
    end_unix_s: float | None = None
    open_ended: bool = False  # a line without an End: the attempt still runs
    steps: list[tuple[float | None, float]] = field(default_factory=list)

    def span(self, fields: list[str]) -> None:
        start, end = _unix_s(fields, 3), _unix_s(fields, 4)
        if start is not None:
            self.start_unix_s = start if self.start_unix_s is None else min(self.start_unix_s, start)
        if end is None:
            self.open_ended = True
        else:
            self.end_unix_s = end if self.end_unix_s is None else max(self.end_unix_s, end)

    def energy(self) -> JobEnergy:
        steps = self.steps
        return JobEnergy(None if any(e is None for e, _ in steps) else sum(e for e, _ in steps), sum(s for _, s in steps),
                         self.start_unix_s, None if self.open_ended else self.end_unix_s)


def parse_sacct(text: str) -> dict[str, list[JobEnergy]]:
    """`sacct -n -P -D -o JobID,ConsumedEnergyRaw,ElapsedRaw,Start,End` output as each job's attempts
    (-D lists every one of a requeued job), each its numbered steps summed. sacct prints an attempt's
    allocation line before its steps: a step belongs to the last allocation line of its job."""
    attempts: dict[str, list[_Attempt]] = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 3:
            continue
        name = fields[0].strip()
        job = name.split(".", 1)[0]
        if "." not in name:  # the allocation line: a new attempt of the job
            attempts.setdefault(job, []).append(_Attempt())
        runs = attempts.setdefault(job, [])
        if not runs:
            runs.append(_Attempt())
        runs[-1].span(fields)
        match = _NUMBERED_STEP.fullmatch(name)
        if match is not None:  # not the allocation, batch or extern line: they overlap the numbered steps
            runs[-1].steps.append((_energy(fields[1]), float(fields[2]) if fields[2].strip().isdigit() else 0.0))
    return {job: [a.energy() for a in runs if a.steps] for job, runs in attempts.items() if any(a.steps for a in runs)}


def _run(argv: list[str], env: dict[str, str] | None = None) -> tuple[str | None, str | None]:
    """A SLURM command's stdout (env: variables set for it), or None and why it gave none."""
    if shutil.which(argv[0]) is None:
        return None, f"no `{argv[0]}` on PATH: this machine has no SLURM client"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=SACCT_TIMEOUT_S, check=False,
                              env={**os.environ, **(env or {})})
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


def read_jobs(job_ids: Iterable[str]) -> tuple[dict[str, list[JobEnergy]], str | None]:
    """Every attempt of every job, with its node energy, from sacct; an empty mapping and the reason where
    sacct cannot say. -D: a requeued job's earlier attempts too (without it sacct lists the last only)."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}, None
    out, reason = _run(["sacct", "-n", "-P", "-D", "-o", "JobID,ConsumedEnergyRaw,ElapsedRaw,Start,End",
                        "-j", ",".join(ids)], {"SLURM_TIME_FORMAT": "%s"})
    return (parse_sacct(out), None) if out is not None else ({}, reason)


def no_energy_reason(job: str, plugin: str | None) -> str:
    site = f"this site runs {plugin}" if plugin else "sacct has no figure"
    return f"SLURM accounted no energy for job {job} ({site}): {PLUGIN_HINT}"


# ElapsedRaw is whole seconds: a cell's batches may add up to a second more than the steps that ran them.
ELAPSED_RESOLUTION_S = 1.0


def cell_seconds_by_job(record: RankRecord) -> dict[str, list[tuple[float | None, float]]]:
    """The cell's batches in each job that ran them, as (start s since the epoch, wall time in s) each
    (older records without batches: the whole cell as one)."""
    jobs = {s.segment: s.job_id for s in record.segments}
    seconds: dict[str, list[tuple[float | None, float]]] = {}
    for batch in record.batches:
        job = jobs.get(batch.segment)
        if job is not None:
            seconds.setdefault(str(job), []).append((batch.times.start_unix_s, float(batch.times.total_s or 0.0)))
    if not seconds and record.job_id is not None and record.times is not None and record.times.total_s is not None:
        seconds[str(record.job_id)] = [(record.times.start_unix_s, record.times.total_s)]
    return seconds


def _attempt_seconds(job: str, batches: list[tuple[float | None, float]],
                     attempts: list[JobEnergy]) -> tuple[list[tuple[JobEnergy, float]] | None, str | None]:
    """The cell's seconds in each attempt of `job` (a batch in the attempt whose start..end holds its
    start), or None and why it cannot be told."""
    if len(attempts) == 1:
        return [(attempts[0], sum(s for _, s in batches))], None
    share: dict[int, float] = {}
    for start, seconds in batches:
        found = [i for i, a in enumerate(attempts) if start is not None and a.holds(start)]
        if len(found) != 1:
            return None, (f"sacct lists {len(attempts)} attempts of job {job} (requeued) and cannot tell which "
                          f"ran the batch that started at {start}")
        share[found[0]] = share.get(found[0], 0.0) + seconds
    return [(attempts[i], s) for i, s in sorted(share.items())], None


def apportion(seconds: dict[str, list[tuple[float | None, float]]], jobs: dict[str, list[JobEnergy]],
              plugin: str | None = None) -> tuple[float | None, str | None]:
    """The cell's share of its jobs' node energy, by its share of each attempt's wall time (a requeued
    job's attempts each at its own rate), and a flag where a share exceeds 1 (never capped: the figure
    stands, the flag says it is suspect); or None and why (plugin: the site's AcctGatherEnergyType)."""
    if not seconds:
        return None, "the records name no SLURM job"
    total, flags = 0.0, []
    for job, batches in sorted(seconds.items()):
        if not jobs.get(job):
            return None, f"sacct lists no step of job {job}"
        parts, reason = _attempt_seconds(job, batches, jobs[job])
        if parts is None:
            return None, reason
        for attempt, cell_s in parts:
            if attempt.energy_j is None:
                return None, no_energy_reason(job, plugin)
            if attempt.elapsed_s <= 0:
                return None, f"sacct gives job {job} no elapsed time"
            total += attempt.energy_j * cell_s / attempt.elapsed_s
            if cell_s > attempt.elapsed_s + ELAPSED_RESOLUTION_S:
                flags.append(f"share above 1: the cell's batches took {cell_s:.1f} s of job {job}'s "
                             f"{attempt.elapsed_s:.0f} s of steps (a step sacct lost, or records of another "
                             f"job): the node figure is {cell_s / attempt.elapsed_s:.2f} x the step's, not capped")
    return total, "; ".join(flags) or None
