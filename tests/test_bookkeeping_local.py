"""Issue 10 on submitit's local executor: no planned cell is lost or run twice, and a partial sweep says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, cli, spawn

COMMON = ["shards=1", "precision=fp32", "energy.idle_seconds=0"]
FAST = [*COMMON, "max_gen_len=4", "dataset.num_prompts=2"]
# Long enough that the job is still running when the next command comes (tens of decode steps per batch).
SLOW = [*COMMON, "max_gen_len=32", "dataset.num_prompts=32", "batch_size=1"]
LONG = [*COMMON, "max_gen_len=64", "dataset.num_prompts=1024", "batch_size=1"]  # minutes: stopped by the test


def _sweep_returns(tmp_path: Path, *args: str) -> str:
    """w2w-sweep without --wait: its stdout once it returns (test_a_piped_sweep_... reads a pipe)."""
    log = tmp_path / f"sweep-{time.monotonic_ns()}.log"
    with log.open("w") as out:
        code = spawn([sys.executable, "-m", "w2w.launch.sweep", *args], cwd=ROOT, stdout=out,
                     stderr=subprocess.STDOUT).wait(timeout=600)
    assert code == 0, log.read_text()
    return log.read_text()


def _manifest(sweep: Path) -> dict:
    return json.loads((sweep / "manifest.json").read_text())


def _submissions(sweep: Path) -> list[dict]:
    return [s for job in _manifest(sweep)["jobs"].values() for s in job["submissions"]]


def _result_time(submission: dict) -> float:
    return (Path(submission["folder"]) / f"{submission['job_id']}_0_result.pkl").stat().st_mtime


def test_new_cells_of_a_running_placement_run_as_a_job_of_their_own(tmp_path):
    """10.3: a second grid into a placement whose job runs used to say 'already queued or running',
    and its new cell never ran; 10.4: the manifest keeps both commands and status counts what it lists."""
    sweep = tmp_path / "sweep"
    _sweep_returns(tmp_path, *LONG, f"sweep_dir={sweep}")
    second = _sweep_returns(tmp_path, *FAST, "batch_size=2", f"sweep_dir={sweep}")
    first, new = _submissions(sweep)
    running = int(first["job_id"])
    assert _alive(running)  # still running after the second command submitted: the race happened
    assert "already queued or running" not in second
    assert "submitted " in second and "(1 cell(s) to run)" in second
    assert first["cells"] != new["cells"] and len(new["cells"]) == 1
    assert [c["argv"][-1] for c in _manifest(sweep)["commands"]] == [f"sweep_dir={sweep}"] * 2
    assert first["command"] != new["command"] and "batch_size=2" in new["command"]
    mid = cli("w2w.launch.status", str(sweep)).stdout
    print(mid)
    assert f"[local {first['job_id']}: RUNNING, {new['job_id']}: " in mid
    os.kill(running, signal.SIGINT)  # the long cell has made its point
    _wait_for(lambda: not _alive(running), 60, "the long job to stop")
    cli("w2w.launch.sweep", "--wait", "--poll", "1", *FAST, "batch_size=2", f"sweep_dir={sweep}")
    status = cli("w2w.launch.status", str(sweep)).stdout
    print(status)
    assert status.startswith(f"sweep {sweep}: 2 cells: 1 done, 1 failed")
    assert len([line for line in status.splitlines() if line.startswith("  cell ")]) == 2
    (done,) = [line for line in status.splitlines() if " done " in line]
    assert new["cells"][0] in done and "batch_size=2" in done


def test_concurrent_sweeps_on_one_sweep_dir_lose_no_submission(tmp_path):
    """10.3: two w2w-sweep at once on one sweep_dir: the lock keeps both jobs in the manifest,
    so a later run neither forgets nor re-submits either cell."""
    sweep = tmp_path / "sweep"
    logs = [(tmp_path / f"sweep-{seed}.log").open("w") for seed in (1, 2)]
    procs = [spawn([sys.executable, "-m", "w2w.launch.sweep", *FAST, f"seed={seed}", f"sweep_dir={sweep}"],
                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
             for seed, log in zip((1, 2), logs, strict=True)]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=600) == 0, Path(log.name).read_text()
        log.close()
    followed = cli("w2w.launch.sweep", "--wait", "--poll", "1", *FAST, "seed=1,2", f"sweep_dir={sweep}").stdout
    submissions = _submissions(sweep)
    assert len(submissions) == 2, submissions
    assert sorted(len(s["cells"]) for s in submissions) == [1, 1]
    assert submissions[0]["cells"] != submissions[1]["cells"]
    assert "2 cells: 2 done" in followed and len(_manifest(sweep)["commands"]) == 3


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ignores_sigint(pid: int) -> bool:
    mask = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask.split()[1], 16) & (1 << (signal.SIGINT - 1)))


def test_a_piped_sweep_returns_while_its_job_runs_which_sigterm_stops_after_a_batch_naming_its_job(tmp_path):
    """Issue 28.1: `w2w-sweep ... | tee log` waited for its local job to end (105 s), the controller holding
    the pipe: the pipe now reaches its end while the job still runs. The job's task stops on the SIGTERM its
    controller forwards (as scancel's), after its batch, in one line; 28.8: the batches name the local job."""
    sweep = tmp_path / "sweep"
    proc = spawn([sys.executable, "-m", "w2w.launch.sweep", *LONG, f"sweep_dir={sweep}"], cwd=ROOT,
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=120)  # old code: no end of file until the job's minutes are over
    assert proc.returncode == 0 and "submitted " in out, out
    (submission,) = _submissions(sweep)
    controller = int(submission["job_id"])
    assert _alive(controller)
    _wait_for(lambda: list(sweep.glob("cells/*/progress-rank-00000.json")), 300, "the job's first batch")
    os.kill(controller, signal.SIGTERM)  # submitit's controller forwards it to the task, as SLURM signals each
    _wait_for(lambda: not _alive(controller), 120, "the job to stop")
    (log,) = sweep.glob(f"submitit/{controller}/*_0_log.err")
    assert log.read_text().splitlines()[-1] == ("w2w job: stopped by SIGTERM: every finished batch is kept; "
                                                "run the same command again to resume")
    (saved,) = sweep.glob("cells/*/progress-rank-00000.json")
    batches = json.loads(saved.read_text())["batches"]
    assert 1 <= len(batches) < 1024 and {b["job_id"] for b in batches} == {submission["job_id"]}


def test_local_jobs_obey_sigint_when_w2w_sweep_runs_in_the_background(tmp_path):
    """A background job of a script (`w2w-sweep ... &`, nohup) starts with SIGINT ignored; w2w-sweep keeps
    that for itself, but the local jobs it starts obey SIGINT: it stops them with SIGINT."""
    sweep, log = tmp_path / "sweep", (tmp_path / "sweep.log").open("w")
    proc = spawn([sys.executable, "-m", "w2w.launch.sweep", *LONG, f"sweep_dir={sweep}"], sigint=signal.SIG_IGN,
                 cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    assert proc.wait(timeout=600) == 0, (tmp_path / "sweep.log").read_text()
    (submission,) = _submissions(sweep)
    controller = int(submission["job_id"])
    assert _alive(controller) and not _ignores_sigint(controller)  # the test's end stops the job


def test_interrupted_local_sweep_then_partial_results_say_so(tmp_path):
    """10.12 (local): Ctrl-C during --wait: no traceback, the local job stops, how to resume is said.
    10.4: the failed cell it leaves does not fail a later --wait of other cells, and is listed.
    10.6: w2w-reduce and w2w-report say how many planned cells have no result.
    10.7: the cells table shows the seed axis, so rows differ in more than their metrics."""
    sweep = tmp_path / "sweep"
    args = [*SLOW, "seed=1", f"sweep_dir={sweep}"]
    out, err_log = (tmp_path / "wait.out").open("w"), tmp_path / "wait.err"
    # spawn: SIGINT at its default even when pytest runs in the background, where it is ignored.
    proc = spawn([sys.executable, "-m", "w2w.launch.sweep", "--wait", "--poll", "0.5", *args], cwd=ROOT,
                 stdout=out, stderr=err_log.open("w"))
    _wait_for(lambda: (sweep / "manifest.json").is_file() and _submissions(sweep), 300, "the submission")
    job_pid = int(_submissions(sweep)[0]["job_id"])
    # Once the cell runs (its task has a log), as a user would see it; only w2w-sweep gets the signal.
    _wait_for(lambda: list(sweep.glob("submitit/*/*_0_log.err")), 300, "the task to start")
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    err = err_log.read_text()
    print(err)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted: local jobs run under this process and stop with it" in err
    assert "resume the rest with: w2w-sweep --wait shards=1" in err and "seed=1" in err
    _wait_for(lambda: not _alive(job_pid), 60, "the local job to stop")
    assert not list(sweep.glob("cells/*/rank-*.json"))

    other = cli("w2w.launch.sweep", "--wait", "--poll", "1", *FAST, "seed=2", f"sweep_dir={sweep}")
    print(other.stdout)
    assert other.returncode == 0
    assert "2 cells: 1 done, 1 failed" in other.stdout  # the old failed cell is counted and listed
    (failed,) = [line for line in other.stdout.splitlines() if line.startswith("  cell ") and " failed " in line]
    assert "seed=1" in failed and "job ended" in failed
    assert "this command's 1 cells: 1 done, 0 failed" in other.stdout
    assert "1 other cell(s) of this sweep failed (listed above)" in other.stdout

    reduced = cli("w2w.analysis.reduce", str(sweep))
    print(reduced.stderr)
    assert "w2w-reduce: warning: incomplete sweep: 1 of 2 planned cell(s) have no result: 0 missing, 1 failed, " \
           "0 running or queued" in reduced.stderr
    assert cli("w2w.analysis.reduce", "--require-complete", str(sweep), check=False).returncode == 1
    report = cli("w2w.analysis.report", str(sweep))
    assert "w2w-report: warning: incomplete sweep: 1 of 2" in report.stderr
    page = (sweep / "results" / "paper" / "report.md").read_text().splitlines()
    assert page[2].startswith("**Warning: incomplete sweep: 1 of 2 planned cell(s) have no result"), page[:4]

    redo = cli("w2w.launch.sweep", "--wait", "--poll", "1", *args).stdout
    assert "(1 cell(s) to run)" in redo and "2 cells: 2 done" in redo
    final = cli("w2w.analysis.reduce", "--require-complete", str(sweep))
    assert "incomplete" not in final.stderr
    header, _, *rows = final.stdout.splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert {"seed", "dataset.num_prompts", "batch_size", "max_gen_len"} <= set(columns), columns
    rows = [[v.strip() for v in row.strip("|").split("|")] for row in rows if row.startswith("|")]
    assert sorted(row[columns.index("seed")] for row in rows) == ["1", "2"], final.stdout
