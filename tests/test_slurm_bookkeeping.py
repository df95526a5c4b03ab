"""Issue 10 on the real two-node local SLURM: refused sbatch, new cells of a queued placement, Ctrl-C."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli, spawn

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("local_slurm")]

BASE = ["cluster=local_slurm", "gpu=cpu", "precision=fp32", "dist_timeout_s=60", "energy.idle_seconds=0", "shards=1"]
FAST = [*BASE, "max_gen_len=4", "dataset.num_prompts=2"]


def _submissions(sweep: Path) -> list[dict]:
    manifest = json.loads((sweep / "manifest.json").read_text())
    return [s for job in manifest["jobs"].values() for s in job["submissions"]]


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True)
    return out.stdout.strip()


def _queue_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip() or _sacct_state(job_id)


def _wait_for_state(job_id: str, state: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (now := _sacct_state(job_id)) != state:
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} is {now or 'unknown'}, not {state}, after {timeout} s")
        time.sleep(0.5)


def _read_until(proc: subprocess.Popen, prefix: str, timeout: float) -> None:
    """Read the process's stdout until a line starts with prefix; fail if it ends or the time is up.
    Reads the pipe's descriptor, not the file object: a buffered line would not wake select."""
    deadline, fd, seen = time.monotonic() + timeout, proc.stdout.fileno(), ""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                continue
            chunk = os.read(fd, 65536).decode()
            if not chunk:
                raise AssertionError(f"w2w-sweep ended (exit {proc.wait()}) before printing {prefix!r}:\n{seen}")
            seen += chunk
            if any(line.startswith(prefix) for line in seen.splitlines()):
                return
    raise AssertionError(f"w2w-sweep printed no line starting {prefix!r} within {timeout} s:\n{seen}")


def test_a_refused_sbatch_is_one_line_and_the_queued_job_stays_tracked(tmp_path):
    """10.2: the issue's reproduction (the v100 placement reaches sbatch once the profile's GRES flag
    is overridden): sbatch refuses it after the cpu job was queued. The cpu job is in the manifest,
    so re-running with gpu=cpu does not submit its cells a second time."""
    sweep = tmp_path / "sweep"
    grid = [*FAST, "seed=1,2,3", f"sweep_dir={sweep}"]
    result = cli("w2w.launch.sweep", *grid, "gpu=cpu,v100", "cluster.gres_gpu=true", check=False)
    print(result.stdout, result.stderr)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("w2w-sweep: error: submitting job ") and "gpu=v100" in errors[0]
    assert "sbatch: error:" in errors[0] and "gres" in errors[0].lower()
    (queued,) = _submissions(sweep)
    assert len(queued["cells"]) == 3
    again = cli("w2w.launch.sweep", "--wait", "--poll", "1", *grid).stdout
    assert "submitted " not in again and "3 cells: 3 done" in again
    assert _submissions(sweep) == [queued]


def test_new_cells_of_a_queued_placement_run_on_slurm(tmp_path, hold_at_barrier):
    """10.3: the second grid's cell used to be dropped as 'already queued or running'."""
    sweep = tmp_path / "sweep"
    barrier = hold_at_barrier("cells:1")  # the first job cannot end before the second grid is submitted
    cli("w2w.launch.sweep", *FAST, "batch_size=1", f"sweep_dir={sweep}")
    second = cli("w2w.launch.sweep", *FAST, "batch_size=2", f"sweep_dir={sweep}").stdout
    first, new = _submissions(sweep)
    assert _queue_state(first["job_id"]) in ("PENDING", "RUNNING")  # the first job had not ended: the race
    assert "already queued or running" not in second and "(1 cell(s) to run)" in second
    barrier.release(after_exit=False)
    cli("w2w.launch.sweep", "--wait", "--poll", "1", *FAST, "batch_size=2", f"sweep_dir={sweep}")
    _wait_for_state(first["job_id"], "COMPLETED", 300)  # --wait followed only its own cell
    status = cli("w2w.launch.status", str(sweep)).stdout
    print(status)
    assert status.startswith(f"sweep {sweep}: 2 cells: 2 done, 0 failed")
    assert f"[slurm {first['job_id']}: COMPLETED, {new['job_id']}: COMPLETED]" in status
    assert "batch_size=1" in status and "batch_size=2" in status


def test_ctrl_c_while_following_leaves_slurm_jobs_running(tmp_path, hold_at_barrier):
    """10.12 (SLURM): no traceback; the jobs keep running, and the message says how to follow them."""
    sweep = tmp_path / "sweep"
    hold_at_barrier("cells:1")  # the job is still running when Ctrl-C comes, however fast its cell was
    # spawn: SIGINT as at a terminal even when pytest runs in the background (nohup, `&`), where it is
    # ignored: a Python started with SIGINT ignored never raises KeyboardInterrupt.
    proc = spawn([sys.executable, "-m", "w2w.launch.sweep", "--wait", "--poll", "0.5", *FAST, f"sweep_dir={sweep}"],
                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _read_until(proc, "[", 300)  # the first progress line: it is following
    (submission,) = _submissions(sweep)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    print(err)
    try:
        assert proc.returncode == 130 and "Traceback" not in err, err
        assert "the SLURM jobs keep running; follow them with: w2w-status" in err
        assert f"scancel {submission['job_id']}" in err
        assert _queue_state(submission["job_id"]) in ("PENDING", "RUNNING")
    finally:
        subprocess.run(["scancel", submission["job_id"]], check=False)
