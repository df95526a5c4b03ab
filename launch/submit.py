"""Submit planned jobs with submitit (SLURM or local) and keep the sweep manifest."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import submitit
from omegaconf import OmegaConf
from w2w.launch.job import CellsJob
from w2w.launch.plan import Cell, Job, Plan

from w2w.records import (
    MANIFEST,
    Manifest,
    ManifestCell,
    ManifestJob,
    Submission,
    read_manifest,
    write_json,
)


def slurm_parameters(job: Job) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one placement (one task per GPU)."""
    c = job.cfg.cluster
    uses_gpu = job.cfg.gpu.device == "cuda"
    params: dict[str, Any] = {
        "job_name": f"w2w-{job.cfg.model.name}-{job.cfg.gpu.name}-x{job.cfg.shards}",
        "nodes": job.nodes,
        "ntasks_per_node": job.tasks_per_node,
        "cpus_per_task": c.cpus_per_task,
        "time": c.timeout_min,
        "partition": c.partition,
        "account": c.account,
        "qos": c.qos,
        "constraint": c.constraint,
        "gres": c.gres if c.gres else (f"gpu:{job.tasks_per_node}" if uses_gpu else None),
        "mem": f"{c.mem_gb:g}GB" if c.mem_gb else None,
        "setup": list(c.setup),
        "additional_parameters": dict(c.additional_parameters),
        "array_parallelism": c.array_parallelism,
        "signal_delay_s": 120,  # time to finish the current batch and requeue before the kill
    }
    return {k: v for k, v in params.items() if v not in (None, [], {})}


def make_executor(job: Job, folder: Path) -> submitit.Executor:
    c = job.cfg.cluster
    if c.backend == "local":
        executor = submitit.LocalExecutor(folder=folder, python=c.python)
        executor.update_parameters(tasks_per_node=job.tasks_per_node, nodes=1, timeout_min=c.timeout_min)
        return executor
    executor = submitit.SlurmExecutor(folder=folder, python=c.python, max_num_timeout=3)
    executor.update_parameters(**slurm_parameters(job))
    return executor


def _executor_key(job: Job) -> str:
    params = slurm_parameters(job) if job.cfg.cluster.backend == "slurm" else {"tasks": job.tasks_per_node}
    return json.dumps([job.cfg.cluster.backend, params], sort_keys=True, default=str)


def submit_jobs(jobs_and_cells: list[tuple[Job, list[Cell]]], sweep_dir: Path) -> list[tuple[Job, submitit.Job]]:
    """Submit each job with its pending cells; jobs with identical SLURM parameters form one array."""
    folder = sweep_dir / "submitit" / "%j"
    groups: dict[str, list[tuple[Job, list[Cell]]]] = {}
    for item in jobs_and_cells:
        groups.setdefault(_executor_key(item[0]), []).append(item)
    submitted = []
    for group in groups.values():
        executor = make_executor(group[0][0], folder)
        with executor.batch():
            handles = [executor.submit(CellsJob([c.cfg for c in cells])) for _, cells in group]
        submitted.extend((job, handle) for (job, _), handle in zip(group, handles, strict=True))
    return submitted


def load_manifest(sweep_dir: Path) -> Manifest:
    return read_manifest(sweep_dir / MANIFEST)


def _cell_entry(cell: Cell, job: Job | None) -> ManifestCell:
    params = {k: OmegaConf.select(cell.cfg, k) for k in ("model.name", "gpu.name", "dataset.name", "shards",
                                                         "precision", "batch_size", "max_gen_len", "power_cap_w")}
    return ManifestCell(job=None if job is None else job.key, params=params, skip_reason=cell.skip_reason,
                        world_size=cell.cfg.shards)


def update_manifest(manifest: Manifest, plan: Plan, submitted: list[tuple[Job, submitit.Job]],
                    argv: list[str]) -> Manifest:
    manifest.command = ["w2w-sweep", *argv]
    manifest.updated_unix_s = time.time()
    for job in plan.jobs:
        entry = manifest.jobs.get(job.key)
        shape = {"nodes": job.nodes, "tasks_per_node": job.tasks_per_node, "backend": job.cfg.cluster.backend,
                 "describe": job.describe(), "cells": [c.id for c in job.cells]}
        manifest.jobs[job.key] = ManifestJob(**shape) if entry is None else entry.merged(shape)
        for cell in job.cells:
            manifest.cells[cell.id] = _cell_entry(cell, job)
    for cell in plan.skipped:
        manifest.cells[cell.id] = _cell_entry(cell, None)
    for job, handle in submitted:
        manifest.jobs[job.key].submissions.append(
            Submission(job_id=str(handle.job_id), folder=str(handle.paths.folder), submitted_unix_s=time.time())
        )
    return manifest


def save_manifest(manifest: Manifest, sweep_dir: Path) -> None:
    write_json(sweep_dir / MANIFEST, manifest)
