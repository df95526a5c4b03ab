"""A cell's windows as its record's typed sections on this rank: identity, energy, GPU state, segment, failure, files."""

from __future__ import annotations

import dataclasses
import os
import socket
import traceback
from pathlib import Path

import torch

from w2w import distributed
from w2w.cell import Cell
from w2w.cell_lock import job_attempt
from w2w.energy import gpustate
from w2w.energy.bounds import disagreement
from w2w.energy.monitor import EnergyMonitor, Window
from w2w.energy.phases import PhaseEnergy
from w2w.energy.sampler import timeline_frame
from w2w.engines.common import DECODE, PREFILL
from w2w.files import write_atomic
from w2w.records import (
    SCHEMA_VERSION,
    STATUS_OK,
    Batch,
    BatchEnergy,
    Energy,
    GpuState,
    RankRecord,
    Segment,
    WindowState,
)
from w2w.responses import join_response_parts, no_score_reason


def responses_block(cell: Cell, num_batches: int, rank: int) -> dict:
    """The record's responses block; joins the batches' parts into the responses file (rank 0,
    save_responses=true), also those of batches that an earlier segment of the cell ran."""
    saved = cell.save_responses and rank == 0
    file = join_response_parts(cell.sweep_dir, cell.id, num_batches, cell.repeat) if saved else None
    # saved: this rank wrote the file (rank 0 only); requested: save_responses was set.
    return {"requested": cell.save_responses, "saved": saved, "file": file,
            "score_reason": no_score_reason(cell.dataset.name)}


def write_timeline(path: Path | None, window: Window, rank: int) -> str | None:
    """The cell's sampler rows as Parquet (atomically); returns the file name for the record."""
    if path is None or not window.samples:
        return None
    frame = timeline_frame(window.samples, window.t0_monotonic_s, window.start_unix_s, rank)
    write_atomic(path, frame.to_parquet(index=False))
    return path.name


def cell_energy(cell: Window, phases: PhaseEnergy, warmup: Window | None, monitor: EnergyMonitor) -> Energy:
    """The record's energy block for one cell (J; None where there is no figure, with the reason)."""
    return Energy(
        source=cell.source,
        gpu_j=cell.gpu_j,
        counter_gpu_j=cell.counter_gpu_j,
        integrated_gpu_j=cell.integrated_gpu_j,
        prefill_gpu_j=phases.joules.get(PREFILL),
        decode_gpu_j=phases.joules.get(DECODE),
        short_phase_windows=phases.short_windows,
        warmup_gpu_j=warmup.gpu_j if warmup else None,
        power_reading=monitor.power_reading,
        sample_interval_s=monitor.sampler.interval_s if monitor.sampler else None,
        cpu_j=cell.cpu_j,
        cpu_zones_j=cell.cpu_zones_j,
        cpu_reason=monitor.cpu_reason if cell.cpu_j is None else None,
        reason=cell.reason,
    )


def checked_energy(energy: Energy, missing: dict[str, str] | None, active: Window | None,
                   cell_s: float | None) -> Energy:
    """The cell's energy with issue 27's checks: its three readings compared (the readings where they
    disagree by more than their bound), each missing reading and why, and the split into static
    (the loaded, waiting GPU's power x the cell's time) and dynamic energy."""
    flag = disagreement(energy.counter_gpu_j, energy.instant_gpu_j, energy.average_gpu_j, energy.agreement_bound_j,
                        energy.average_bound_j)
    active_w = active.gpu_j / active.duration_s if active is not None and active.gpu_j is not None \
        and active.duration_s > 0 else None
    static = active_w * cell_s if active_w is not None and cell_s is not None and energy.gpu_j is not None else None
    return dataclasses.replace(
        energy, readings_flag=flag, missing_readings=missing, active_power_w=active_w,
        active_s=active.duration_s if active is not None else None, static_gpu_j=static,
        dynamic_gpu_j=energy.gpu_j - static if static is not None else None)


def batch_energy(window: Window, prefill_gpu_j: float | None, decode_gpu_j: float | None) -> BatchEnergy:
    """A batch window's energy section: every field of BatchEnergy that the Window has, under the same
    name (its figures, bounds, RAPL domains and length in update periods), and the phases' joules."""
    same = {f.name: getattr(window, f.name) for f in dataclasses.fields(BatchEnergy) if hasattr(window, f.name)}
    return BatchEnergy(**same, prefill_gpu_j=prefill_gpu_j, decode_gpu_j=decode_gpu_j)


def window_state(window: Window) -> WindowState:
    """A window's GPU at its edges, and the clock event reasons seen in it (None: no GPU meter)."""
    start, end = window.state_start, window.state_end
    return WindowState(temp_start_c=start.temp_c if start else None, temp_end_c=end.temp_c if end else None,
                       sm_clock_start_mhz=start.sm_clock_mhz if start else None,
                       sm_clock_end_mhz=end.sm_clock_mhz if end else None, clock_events=window.clock_events)


def window_flags(batches: list[Batch], min_periods: float) -> dict:
    """Energy's fields on the length of the cell's batch windows: how many ran under min_periods
    update periods of their energy source (None where no window had a period: no energy figure)."""
    known = [b.energy.window_periods for b in batches if b.energy.window_periods is not None]
    steps = [b.energy.period_s for b in batches if b.energy.period_s is not None]
    return {"min_window_periods": min_periods,
            "short_windows": sum(p < min_periods for p in known) if known else None,
            "shortest_window_periods": min(known, default=None),
            "window_period_s": max(steps, default=None)}


def gpu_state(cell: Window, batches: list[Batch], settled: gpustate.Settled | None) -> GpuState | None:
    """The record's gpu_state: the cell window's edges, every reason any window of it saw, the settle."""
    if cell.state_start is None and cell.state_end is None:
        return None  # no GPU meter
    edges = window_state(cell)
    events = gpustate.merge_masks([edges.clock_events, *(b.gpu_state.clock_events for b in batches if b.gpu_state)])
    return GpuState(
        temp_start_c=edges.temp_start_c, temp_end_c=edges.temp_end_c, sm_clock_start_mhz=edges.sm_clock_start_mhz,
        sm_clock_end_mhz=edges.sm_clock_end_mhz, clock_events=events, clock_event_names=gpustate.reason_names(events),
        throttled=gpustate.throttled(events), settle_s=settled.waited_s if settled else None,
        settle_temp_c=settled.temp_c if settled else None, settled=settled.stable if settled else None,
    )


def identity(cell: Cell, info: distributed.DistInfo) -> RankRecord:
    """The cell's record on this rank before it runs: who, where, with which parameters (status ok until told)."""
    return RankRecord(
        schema=SCHEMA_VERSION,
        sweep_dir=cell.sweep_dir,
        job_id=job_attempt()[0],
        cell_id=cell.id,
        repeat=cell.repeat,
        rank=info.rank,
        local_rank=info.local_rank,
        world_size=info.world_size,
        status=STATUS_OK,
        host=info.host,
        node=info.node,
        device=str(info.device),
        params=cell.params(),
        config=cell.to_dict(),
    )


def failed(record: RankRecord, exc: BaseException) -> RankRecord:
    """The record of a cell that raised: its status (oom or error), the error and where it was raised."""
    # torch.cuda.OutOfMemoryError: torch.OutOfMemoryError's name before torch 2.5 (the floor is 2.1).
    status = "oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error"
    return dataclasses.replace(record, status=status, error=f"{type(exc).__name__}: {exc}",
                               traceback=traceback.format_exc(limit=8))


def job_segment(job_energy: dict) -> Segment:
    """This job attempt: the idle baseline it measured after its (re)start (numbered by CellProgress)."""
    job_id, attempt = job_attempt()
    return Segment(segment=0, job_id=job_id, restart_count=attempt, pid=os.getpid(), host=socket.gethostname(),
                   idle_power_w=job_energy.get("idle_power_w"), idle_s=job_energy.get("idle_s"))
