"""Sweeps against the real two-node local SLURM: multi-node ranks, resume after scancel, failures."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import cli
from w2w.records import read_record

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("local_slurm")]

BASE = ["cluster=local_slurm", "gpu=cpu", "precision=fp32", "dist_timeout_s=60"]


def _records(sweep: Path) -> dict[str, list[dict]]:
    cells: dict[str, list[dict]] = {}
    for path in sorted(sweep.glob("cells/*/rank-*.json")):
        cells.setdefault(path.parent.name, []).append(read_record(path).to_dict())
    return cells


def test_sweep_crosses_both_nodes(tmp_path):
    sweep = tmp_path / "sweep"
    out = cli("w2w.launch.sweep", "--wait", "--poll", "1", *BASE, "shards=1,2", "batch_size=2", "max_gen_len=4",
              "dataset.num_prompts=4", f"sweep_dir={sweep}").stdout
    assert "2 done, 0 failed" in out
    by_shards = {recs[0]["params"]["shards"]: recs for recs in _records(sweep).values()}
    assert sorted(by_shards) == [1, 2]
    two = by_shards[2]
    assert sorted(r["rank"] for r in two) == [0, 1]
    assert {r["node"] for r in two} == {"n1", "n2"}
    assert all(r["status"] == "ok" and r["job_id"] for r in two)
    status = cli("w2w.launch.status", str(sweep)).stdout
    print(status)
    assert "2 cells: 2 done" in status and "COMPLETED" in status and "on n1,n2" in status


def test_placements_with_the_same_sbatch_parameters_form_one_job_array(tmp_path):
    sweep = tmp_path / "sweep"
    out = cli("w2w.launch.sweep", "--wait", "--poll", "1", *BASE, "shards=1", "precision=fp32,bf16", "batch_size=2",
              "max_gen_len=4", "dataset.num_prompts=2", f"sweep_dir={sweep}").stdout
    ids = [s["job_id"] for j in json.loads((sweep / "manifest.json").read_text())["jobs"].values()
           for s in j["submissions"]]
    assert len(ids) == 2 and {i.split("_")[0] for i in ids} == {ids[0].split("_")[0]}  # ARRAYID_0, ARRAYID_1
    assert "2 cells: 2 done" in out


def _wait_for(predicate, timeout: float, what: str, job_id: str | None = None) -> None:
    """Poll until predicate(); fail at once, with the job's log, if the job has ended."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if job_id and _sacct_state(job_id) in ("FAILED", "COMPLETED", "TIMEOUT", "NODE_FAIL"):
            if predicate():
                return
            raise AssertionError(f"job {job_id} ended {_sacct_state(job_id)} before {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _submit(sweep: Path, args: list[str]) -> str:
    cli("w2w.launch.sweep", *args)
    (job,) = json.loads((sweep / "manifest.json").read_text())["jobs"].values()
    return job["submissions"][-1]["job_id"]


def _records_now(sweep: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sweep.glob("cells/*/rank-*.json")}


def _unchanged(before: dict[Path, tuple[bytes, int]]) -> bool:
    return all(p.read_bytes() == data and p.stat().st_mtime_ns == mtime for p, (data, mtime) in before.items())


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True)
    return out.stdout.strip()


def _scontrol_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout


# Three cells in one job; the tests hold the job at a barrier after its first (hold_at_barrier), so a
# signal lands with exactly one cell done however loaded the machine is.
THREE_CELLS = [*BASE, "shards=1", "batch_size=4,2,1", "max_gen_len=8", "dataset.num_prompts=8"]


def test_resume_after_scancel_runs_only_missing_cells(tmp_path, hold_at_barrier):
    sweep = tmp_path / "sweep"
    args = [*THREE_CELLS, f"sweep_dir={sweep}"]
    barrier = hold_at_barrier("cells:1")
    job_id = _submit(sweep, args)
    _wait_for(lambda: len(barrier.holders()) == 1, 300, "the job to hold after its first cell", job_id)
    subprocess.run(["scancel", job_id], check=True)
    _wait_for(lambda: _sacct_state(job_id).startswith("CANCELLED"), 60, "the cancellation")
    barrier.release(after_exit=True)  # the cancelled job's process has ended: it wrote no second cell
    done = _records_now(sweep)
    assert len(done) == 1
    print(cli("w2w.launch.status", str(sweep)).stdout)

    out = cli("w2w.launch.sweep", "--wait", "--poll", "1", *args).stdout
    assert "(2 cell(s) to run)" in out
    assert "3 cells: 3 done" in out
    assert _unchanged(done)
    status = cli("w2w.launch.status", str(sweep)).stdout
    print(status)
    assert "3 done" in status
    again = cli("w2w.launch.sweep", *args).stdout
    assert "all cells done" in again and "submitted " not in again


def test_preempted_job_requeues_and_continues_at_the_first_unfinished_cell(tmp_path, hold_at_barrier):
    sweep = tmp_path / "sweep"
    barrier = hold_at_barrier("cells:1")
    job_id = _submit(sweep, [*THREE_CELLS, f"sweep_dir={sweep}"])
    _wait_for(lambda: len(barrier.holders()) == 1, 300, "the job to hold after its first cell", job_id)
    host = re.search(r"\bBatchHost=(\S+)", _scontrol_job(job_id)).group(1)
    # What SLURM sends before preemption or the time limit: submitit checkpoints and requeues.
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # the steps, as SLURM does
    _wait_for(lambda: "Reason=BeginTime" in _scontrol_job(job_id), 60, "the requeue")
    barrier.release(after_exit=True)  # the first attempt has ended; the requeued one passes the barrier
    done = _records_now(sweep)
    assert len(done) == 1
    # SLURM holds a requeued job for two minutes (cred_expire); an admin may release it at once. The node it
    # ran on keeps the job's credential revoked until then and refuses it ("Job credential revoked"): the
    # requeued attempt runs on the other node.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={host}", "StartTime=now"], check=True)
    # It may queue behind another suite's jobs on the shared local SLURM.
    _wait_for(lambda: _sacct_state(job_id) == "COMPLETED", 600, "the requeued job", job_id)
    assert len(list(sweep.glob("cells/*/rank-*.json"))) == 3
    assert _unchanged(done)
    log = next(sweep.glob(f"submitit/{job_id}/{job_id}_0_log.err")).read_text()
    assert "Requeued job" in log and "done already, skipped" in log
    assert "3 cells: 3 done" in cli("w2w.launch.status", str(sweep)).stdout


def test_failed_job_shows_its_reason_and_others_complete(tmp_path):
    """A node-side failure the login node cannot see: the site's setup line fails on the node."""
    sweep = tmp_path / "sweep"
    common = [*BASE, "batch_size=2", "max_gen_len=4", "dataset.num_prompts=2", f"sweep_dir={sweep}"]
    cli("w2w.launch.sweep", *common, "shards=2",
        'cluster.setup=["echo module llama-env not found >&2","exit 3"]')
    result = cli("w2w.launch.sweep", "--wait", "--poll", "1", *common, "shards=1", check=False)
    # Issue 10.4: the exit status is this command's cells'; the other command's failure is listed, and said.
    assert result.returncode == 0, result.stdout + result.stderr
    assert "this command's 1 cells: 1 done" in result.stdout and "1 other cell(s) of this sweep failed" in result.stdout
    assert len([line for line in result.stdout.splitlines() if line.startswith("  cell ") and " failed " in line]) == 1
    assert "module llama-env not found" in result.stdout
    status = cli("w2w.launch.status", str(sweep)).stdout
    print(status)
    assert "2 cells: 1 done, 1 failed" in status
    (failed,) = [line for line in status.splitlines() if " failed " in line and "cell" in line]
    assert "FAILED" in failed and "exit 3" in failed and "module llama-env not found" in failed



# One cell of twelve batches across both nodes; every response max_gen_len tokens long, so an
# uninterrupted run's counts are known without running it.
BATCHED_CELL = [*BASE, "shards=2", "batch_size=2", "max_gen_len=32", "force_max_gen_len=true",
                "dataset.num_prompts=24"]


def _uninterrupted_counts() -> dict[str, int]:
    from w2w.config import compose_cell
    from w2w.data import load_prompts
    from w2w.tokenizer import TINY_TOKENIZER, Tokenizer

    cfg = compose_cell(BATCHED_CELL)
    prompts = load_prompts(cfg.dataset)
    tokenizer = Tokenizer(TINY_TOKENIZER)  # prompts are kept whole by default
    return {"prompts": len(prompts), "responses": len(prompts), "batches": 12,
            "prompt_tokens": sum(len(tokenizer.encode(p)) for p in prompts),
            "output_tokens": len(prompts) * cfg.max_gen_len}


def _progress(sweep: Path) -> dict[int, int]:
    """Finished batches per rank, from the progress files of the sweep's only cell."""
    return {int(p.stem[-5:]): len(json.loads(p.read_text())["batches"])
            for p in sweep.glob("cells/*/progress-rank-*.json")}


def test_preempted_mid_cell_resumes_at_its_first_unfinished_batch(tmp_path, hold_at_barrier):
    sweep = tmp_path / "sweep"
    barrier = hold_at_barrier("batches:2")  # both ranks hold once they saved their second batch
    job_id = _submit(sweep, [*BATCHED_CELL, f"sweep_dir={sweep}"])
    _wait_for(lambda: len(barrier.holders()) == 2, 300, "both ranks to hold after two batches", job_id)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    _wait_for(lambda: "Reason=BeginTime" in _scontrol_job(job_id), 60, "the requeue")
    barrier.release(after_exit=True)  # the first attempt's ranks have ended
    assert _progress(sweep) == {0: 2, 1: 2}  # preempted mid-cell, after exactly two batches
    finished = 2
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    # The records decide; a rank that aborts in gloo's teardown after its cells marks the job FAILED.
    _wait_for(lambda: _sacct_state(job_id) in ("COMPLETED", "FAILED"), 600, "the requeued job")

    log = next(sweep.glob(f"submitit/{job_id}/{job_id}_0_log.err")).read_text()
    assert f"resumed at batch {finished + 1}/12" in log
    (records,) = _records(sweep).values()
    for record in records:
        assert record["status"] == "ok" and record["counts"]["batches"] == 12
        # Only the unfinished batches ran again, in a second segment that warmed up again.
        assert [b["segment"] for b in record["batches"]] == [0] * finished + [1] * (12 - finished)
        first, second = record["segments"]
        assert second["first_batch"] == finished and second["restart_count"] == first["restart_count"] + 1
        assert second["warmup_s"] > 0 and second["start_unix_s"] > first["start_unix_s"]
    assert not _progress(sweep)  # the records hold the batches now
    assert "1 cells (1 ok)" in cli("w2w.analysis.reduce", str(sweep)).stdout
    import pandas as pd

    row = pd.read_csv(sweep / "results" / "cells.csv").iloc[0]
    assert row["segments"] == 2 and row["responses"] == 24

    expected = _uninterrupted_counts()
    for record in records:
        assert {k: record["counts"][k] for k in expected} == expected
