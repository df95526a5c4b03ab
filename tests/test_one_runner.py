"""Issue 18.1: one process per cell (an fcntl lock), batches that say who ran them, no result made worse.

The runners are real `w2w-run` processes on the tiny model; a test holds one at tests/fake_site's barrier
(after a cell's N-th batch) and waits on what the other prints, never on the clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from w2w.launch.sweep import _children  # the processes a local job controller started (from /proc)

from tests.conftest import FAKE_SITE, ROOT, spawn
from w2w.cell_lock import CellLock
from w2w.progress import progress_path
from w2w.records import (
    RankRecord,
    read_record,
    record_path,
    write_record,
    write_record_unless_worse,
)
from w2w.responses import (
    first_missing_part,
    join_response_parts,
    response_part_path,
    responses_path,
)

ONE_CELL = ["shards=1", "precision=fp32", "energy.idle_seconds=0", "max_gen_len=4", "dataset.num_prompts=4",
            "batch_size=1", "save_responses=true"]
COUNTS = ("prompts", "responses", "prompt_tokens", "output_tokens", "positions", "output_words", "batches",
          "scored", "correct")


class Runner:
    """One `w2w-run` process; with hold_after=N it waits at its own barrier after a cell's N-th batch."""

    def __init__(self, tmp: Path, name: str, args: list[str], hold_after: int | None = None, ranks: int = 1):
        self.name, self.barrier, self.err = name, tmp / f"barrier-{name}", tmp / f"{name}.err"
        env = os.environ | {"SLURM_JOB_ID": name, "PYTHONPATH": os.pathsep.join([str(FAKE_SITE), str(ROOT)]),
                            "OMP_NUM_THREADS": "1"}
        if hold_after is not None:  # the barrier holds only processes with SLURM_JOB_ID, as in a job
            env |= {"W2W_TEST_BARRIER": str(self.barrier), "W2W_TEST_BARRIER_AFTER": f"batches:{hold_after}"}
        with self.err.open("w") as err:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                      "-m"] if ranks > 1 else [sys.executable, "-m"]
            # spawn: SIGINT obeyed however pytest was started; the test's end kills whatever is left.
            self.proc = spawn([*launch, "w2w.run_cli", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=err)

    def held(self) -> bool:
        return bool(list(self.barrier.parent.glob(f"{self.barrier.name}.held.*")))

    def says(self, text: str) -> bool:
        return text in self.err.read_text()

    def lines(self, text: str) -> list[str]:
        return [line for line in self.err.read_text().splitlines() if text in line]

    def ended(self) -> bool:
        return self.proc.poll() is not None

    def release(self) -> None:
        self.barrier.touch()

    def wait(self) -> int:
        self.release()  # a runner never stays behind its barrier once the test is done with it
        return self.proc.wait(timeout=300)


def _wait_for(predicate, what: str, *runners: Runner, timeout: float = 300) -> None:
    """Until predicate() holds: an event the runners cause (a barrier file, a line), checked every 50 ms."""
    deadline = time.monotonic() + timeout
    while not predicate():
        for runner in runners:
            if runner.ended() and not predicate():
                raise AssertionError(f"{runner.name} ended ({runner.proc.returncode}) before {what}:\n"
                                     f"{runner.err.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _cell_ids(sweep: Path) -> list[str]:
    return sorted(p.name for p in (sweep / "cells").iterdir() if p.is_dir())


def _second_behind_first(tmp: Path, args: list[str]) -> tuple[Runner, Runner]:
    """A first runner held after 2 batches of its cell, and a second on the same cell waiting for it."""
    first = Runner(tmp, "first", args, hold_after=2)
    _wait_for(first.held, "the first runner to hold after 2 batches", first)
    second = Runner(tmp, "second", args)
    _wait_for(lambda: second.says("held by"), "the second runner to name the holder", second)
    return first, second


def test_second_runner_on_same_cell_waits_naming_holder(tmp_path):
    """The data-loss reproduction: the same w2w-run twice on one cell. The second used to resume the
    first's progress file, fail on its missing response parts and replace its ok record with an error."""
    sweep = tmp_path / "sweep"
    first, second = _second_behind_first(tmp_path, [*ONE_CELL, f"sweep_dir={sweep}"])
    (line,) = second.lines("held by")
    print(line)
    assert f"held by pid {first.proc.pid} on " in line and "(job first, attempt 0, since " in line
    assert "runs after this job's other cells, once it ends" in line
    first.release()
    assert first.wait() == 0 and second.wait() == 0
    (cid,) = _cell_ids(sweep)
    assert second.says(f"cell 1/1 {cid}: done already, skipped") and not second.says(": started")
    record = read_record(record_path(sweep, cid, 0))
    assert record.ok and [s.job_id for s in record.segments] == ["first"]
    assert {b.job_id for b in record.batches} == {"first"} and record.counts.batches == 4
    assert len(responses_path(sweep, cid).read_text().splitlines()) == 4


def test_killed_runner_is_resumed_by_the_waiting_one_and_each_batch_names_its_job(tmp_path):
    sweep = tmp_path / "sweep"
    first, second = _second_behind_first(tmp_path, [*ONE_CELL, f"sweep_dir={sweep}"])
    first.proc.kill()  # kill -9: the kernel drops its lock
    assert first.proc.wait(timeout=60) == -signal.SIGKILL
    assert second.wait() == 0
    (cid,) = _cell_ids(sweep)
    assert second.says(f"cell {cid}: resumed at batch 3/4 after 1 segment(s)")
    record = read_record(record_path(sweep, cid, 0))
    assert [(b.index, b.job_id, b.attempt) for b in record.batches] == [
        (0, "first", 0), (1, "first", 0), (2, "second", 0), (3, "second", 0)]
    assert [(s.segment, s.job_id, s.first_batch) for s in record.segments] == [
        (0, "first", 0), (1, "second", 2)]
    assert {s.pid for s in record.segments} == {first.proc.pid, second.proc.pid}
    assert not progress_path(sweep, cid, 0).exists()


def test_the_ranks_of_a_second_runner_agree_to_wait_for_a_held_cell(tmp_path):
    """Model parallel: rank 0 takes the lock for its cell's ranks and they follow its decision (a rank
    that ran alone would hang in the model's collectives)."""
    sweep = tmp_path / "sweep"
    args = [*ONE_CELL, "shards=2", "dist_timeout_s=60", f"sweep_dir={sweep}"]
    first = Runner(tmp_path, "first", args, hold_after=2, ranks=2)
    _wait_for(lambda: len(list(tmp_path.glob("barrier-first.held.*"))) == 2, "both ranks at the barrier", first)
    second = Runner(tmp_path, "second", args, ranks=2)
    _wait_for(lambda: second.says("held by"), "the second runner to name the holder", second)
    assert len(second.lines("held by")) == 1  # rank 0 says it once
    first.release()
    assert first.wait() == 0 and second.wait() == 0
    (cid,) = _cell_ids(sweep)
    assert len(second.lines(f"cell 1/1 {cid}: done already, skipped")) == 2  # both ranks
    for rank in (0, 1):
        assert {b.job_id for b in read_record(record_path(sweep, cid, rank)).batches} == {"first"}


def _record(status: str, **more) -> RankRecord:
    return RankRecord.from_dict({"cell_id": "c0ffee", "rank": 0, "world_size": 2, "status": status, "node": "n1",
                                 "counts": {"responses": 1, "output_tokens": 2, "output_words": 2},
                                 "times": {"total_s": 1.0}} | more)


def test_error_never_replaces_ok_record(tmp_path):
    path = write_record(tmp_path, _record("ok"))
    before = path.read_bytes()
    assert write_record_unless_worse(tmp_path, _record("error", error="ValueError: late")) is None
    assert path.read_bytes() == before
    assert write_record_unless_worse(tmp_path, _record("ok", end_unix_s=2.0)) == path  # as good: written
    assert read_record(path).end_unix_s == 2.0
    other = record_path(tmp_path, "c0ffee", 1)
    assert write_record_unless_worse(tmp_path, _record("error", rank=1, error="x")) == other  # nothing to keep
    path.write_text("{torn")
    assert write_record_unless_worse(tmp_path, _record("oom", error="OOM")) == path  # no result to keep


def test_missing_response_part_resumes_before_it_and_advice_deletes_nothing(tmp_path):
    for batch in (0, 2):
        response_part_path(tmp_path, "c0ffee", batch).parent.mkdir(parents=True, exist_ok=True)
        response_part_path(tmp_path, "c0ffee", batch).write_text("{}\n")
    assert first_missing_part(tmp_path, "c0ffee", 3) == 1 and first_missing_part(tmp_path, "c0ffee", 1) == 1
    with pytest.raises(RuntimeError) as missing:
        join_response_parts(tmp_path, "c0ffee", 3)
    text = str(missing.value)
    assert "responses-batch-00001.part.jsonl" in text and "delete nothing" in text and "(delete " not in text


def test_lock_names_its_holder_and_is_free_once_released(tmp_path):
    mine = CellLock(tmp_path, "c0ffee")
    assert mine.try_acquire()
    other = subprocess.run([sys.executable, "-c", "import sys; from w2w.cell_lock import CellLock; "
                            "lock = CellLock(sys.argv[1], 'c0ffee'); print(lock.try_acquire(), lock.holder())",
                            str(tmp_path)], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert other.startswith(f"False pid {os.getpid()} on ")
    mine.release()
    assert not mine.held and CellLock(tmp_path, "c0ffee").try_acquire()


# -- issue 28.1: SIGTERM and SIGINT stop a runner after its batch, the progress kept, in one line --

STOP_CELL = ["shards=1", "precision=fp32", "energy.idle_seconds=0", "max_gen_len=16", "dataset.num_prompts=6",
             "batch_size=1", "save_responses=true"]


def _same_cell(sweep: Path, reference: Path) -> None:
    """The cell's record and responses are those of the uninterrupted run (sampled tokens included)."""
    (cid,) = _cell_ids(reference)
    assert _cell_ids(sweep) == [cid]
    record, whole = read_record(record_path(sweep, cid, 0)), read_record(record_path(reference, cid, 0))
    assert record.ok, record.error
    for key in COUNTS:
        assert getattr(record.counts, key) == getattr(whole.counts, key), key
    assert responses_path(sweep, cid).read_text() == responses_path(reference, cid).read_text()
    assert not progress_path(sweep, cid, 0).exists()


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "sampling"), [(signal.SIGTERM, "greedy=false"), (signal.SIGINT, "greedy=true")])
def test_a_stop_signal_ends_the_runner_after_its_batch_and_a_rerun_equals_an_uninterrupted_run(
        tmp_path, signum, sampling):
    """`kill PID` (or `timeout`, scancel) used to run all the cell's batches to the end, and Ctrl-C printed a
    25-line KeyboardInterrupt. The signal lands while the runner holds after its 2nd batch: it stops there."""
    args = [*STOP_CELL, sampling]
    reference = tmp_path / "reference"
    whole = Runner(tmp_path, "reference", [*args, f"sweep_dir={reference}"])
    assert whole.wait() == 0, whole.err.read_text()[-3000:]
    sweep = tmp_path / "sweep"
    stopped = Runner(tmp_path, "stopped", [*args, f"sweep_dir={sweep}"], hold_after=2)
    _wait_for(stopped.held, "the runner to hold after 2 batches", stopped)
    stopped.proc.send_signal(signum)
    assert stopped.wait() == 128 + signum
    err = stopped.err.read_text()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.splitlines()[-1] == (f"w2w-run: stopped by {signal.Signals(signum).name}: every finished batch is "
                                    "kept; run the same command again to resume")
    (cid,) = _cell_ids(sweep)
    saved = json.loads(progress_path(sweep, cid, 0).read_text())
    assert len(saved["batches"]) == 2 and not record_path(sweep, cid, 0).exists()  # stopped within one batch
    lock = CellLock(sweep, cid)
    assert lock.try_acquire()  # released on the way out
    lock.release()
    again = Runner(tmp_path, "again", [*args, f"sweep_dir={sweep}"])
    assert again.wait() == 0, again.err.read_text()[-3000:]
    assert again.says(f"cell {cid}: resumed at batch 3/6 after 1 segment(s)")
    _same_cell(sweep, reference)


@pytest.mark.slow
def test_a_cell_killed_after_its_last_batch_says_so_when_rerun(tmp_path):
    """Issue 28.10: its re-run said "resumed at batch 5/4"; it writes the record of the batches it has."""
    sweep = tmp_path / "sweep"
    first = Runner(tmp_path, "first", [*ONE_CELL, f"sweep_dir={sweep}"], hold_after=4)
    _wait_for(first.held, "the runner to hold after its last batch", first)
    first.proc.kill()
    first.proc.wait(timeout=60)
    again = Runner(tmp_path, "again", [*ONE_CELL, f"sweep_dir={sweep}"])
    assert again.wait() == 0, again.err.read_text()[-3000:]
    (cid,) = _cell_ids(sweep)
    assert again.says(f"cell {cid}: all 4 batches done in 1 earlier segment(s): its record is written now")
    assert not again.says("resumed at batch")
    record = read_record(record_path(sweep, cid, 0))
    assert record.ok and [b.job_id for b in record.batches] == ["first"] * 4


# -- the property: any interleaving of two runners, Ctrl-C and kill -9 loses, doubles and mixes nothing --

GRID = ["shards=1", "precision=fp32", "energy.idle_seconds=0", "max_gen_len=4", "dataset.num_prompts=4",
        "batch_size=1,2", "save_responses=true", "dataset=gsm8k"]
FATES = ("release", "sigint", "sigterm", "kill")
# Seeded: the same scenarios in every run (about 30 s each on two cores); W2W_INTERLEAVINGS=N tries more.
INTERLEAVINGS = int(os.environ.get("W2W_INTERLEAVINGS", 4))


def _gsm8k(tmp: Path) -> Path:
    path = tmp / "gsm8k.jsonl"
    rows = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many now?", "answer": f"#### {2 * i + 2}"}
            for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class SweepJob(Runner):
    """A local job of `w2w-sweep` on the runners' cells (its controller and its task), which has returned
    by then; hold_after=N as a Runner's (the job's task inherits the barrier from w2w-sweep)."""

    def __init__(self, tmp: Path, name: str, args: list[str], hold_after: int | None = None):
        self.name, self.barrier = name, tmp / f"barrier-{name}"
        env = os.environ | {"SLURM_JOB_ID": name, "PYTHONPATH": os.pathsep.join([str(FAKE_SITE), str(ROOT)]),
                            "OMP_NUM_THREADS": "1"}
        if hold_after is not None:
            env |= {"W2W_TEST_BARRIER": str(self.barrier), "W2W_TEST_BARRIER_AFTER": f"batches:{hold_after}"}
        with (tmp / f"{name}.out").open("w") as out:
            sweep = spawn([sys.executable, "-m", "w2w.launch.sweep", *args], cwd=ROOT, env=env, stdout=out,
                          stderr=subprocess.STDOUT)
            assert sweep.wait(timeout=300) == 0, (tmp / f"{name}.out").read_text()
        sweep_dir = Path(next(a for a in args if a.startswith("sweep_dir=")).split("=", 1)[1])
        manifest = json.loads((sweep_dir / "manifest.json").read_text())
        submitted = [s["job_id"] for job in manifest["jobs"].values() for s in job["submissions"]]
        self.job_id = int(submitted[-1]) if submitted else 0  # none where the runners left no cell to do
        self.err = sweep_dir / "submitit" / str(self.job_id) / f"{self.job_id}_0_log.err"

    def says(self, text: str) -> bool:
        return self.err.is_file() and text in self.err.read_text()

    def ended(self) -> bool:
        return not self.job_id or not _running(self.job_id)

    def signal(self, signum: int) -> None:
        """SIGTERM to the controller, which forwards it to its task (as scancel signals each task); SIGINT
        to the task alone (as w2w-sweep's Ctrl-C stops its local jobs); SIGKILL to both."""
        targets = [self.job_id] if signum == signal.SIGTERM else _children(self.job_id)
        if signum == signal.SIGKILL:
            targets = [*targets, self.job_id]
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def wait(self) -> int:
        self.release()
        _wait_for(self.ended, f"{self.name}'s job to end")
        return 0


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _scenario(rng: random.Random) -> dict:
    return {"hold_a": rng.choice((1, 2)), "fate_a": rng.choice(FATES), "b_while_a_held": rng.random() < 0.6,
            "hold_b": rng.choice((None, 1)), "fate_b": rng.choice(FATES), "b_first": rng.random() < 0.5,
            "sweep": rng.random() < 0.6, "hold_s": rng.choice((None, 1)), "fate_s": rng.choice(FATES),
            "sweep_at": rng.choice((0, 1, 2))}


SIGNALS = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "kill": signal.SIGKILL}


def _meet(runner: Runner, fate: str) -> None:
    """The runner's fate where it stands (at its barrier, waiting on a held cell, or running): a stop
    signal is obeyed after the batch, so the barrier opens after it; kill -9 needs no barrier opened."""
    if fate == "release":
        runner.release()
        return
    at_barrier = runner.held()  # it waits there until released: the signal meets it between two batches
    if isinstance(runner, SweepJob):
        runner.signal(SIGNALS[fate])
    else:
        runner.proc.send_signal(SIGNALS[fate])
    if fate != "kill":
        runner.release()
    code = runner.wait()
    if at_barrier and fate != "kill" and not isinstance(runner, SweepJob):  # stopped there, in one line
        assert code == 128 + SIGNALS[fate], runner.err.read_text()[-3000:]
        assert runner.err.read_text().splitlines()[-1].startswith(f"w2w-run: stopped by {SIGNALS[fate].name}")


def _play(tmp: Path, args: list[str], plan: dict) -> None:
    """Run one interleaving: A held at its barrier, B started while A holds a cell or after A's fate, and
    a sweep's local job beside them."""
    a = Runner(tmp, "a", args, hold_after=plan["hold_a"])
    _wait_for(a.held, "A at its barrier", a)
    runners: list[Runner] = [a]
    if not plan["b_while_a_held"]:
        _meet(a, plan["fate_a"])
    b = Runner(tmp, "b", args, hold_after=plan["hold_b"])
    runners.append(b)
    # B holds at its own barrier, or waits on A's cell (it names A; its fate then meets it waiting, or
    # in the other cell it runs meanwhile), or has nothing left to do.
    _wait_for(lambda: b.held() or b.says("held by") or b.ended(), "B at its barrier or waiting")
    fates = [(b, plan["fate_b"])]
    if plan["b_while_a_held"]:
        fates.insert(1 if plan["b_first"] else 0, (a, plan["fate_a"]))
    if plan["sweep"]:
        job = SweepJob(tmp, "s", args, hold_after=plan["hold_s"])
        runners.append(job)
        _wait_for(lambda: job.held() or job.says("held by") or job.ended(), "the sweep's job at its barrier or waiting")
        fates.insert(min(plan["sweep_at"], len(fates)), (job, plan["fate_s"]))
    for runner, fate in fates:
        if not runner.ended():
            _meet(runner, fate)
    for runner in runners:
        runner.wait()
    final = Runner(tmp, "final", args)
    assert final.wait() == 0, final.err.read_text()[-3000:]


def _check_like_reference(sweep: Path, reference: Path) -> None:
    assert _cell_ids(sweep) == _cell_ids(reference)
    for cid in _cell_ids(reference):
        record, whole = read_record(record_path(sweep, cid, 0)), read_record(record_path(reference, cid, 0))
        assert record.ok, record.error
        for key in COUNTS:
            assert getattr(record.counts, key) == getattr(whole.counts, key), (cid, key)
        assert [b.index for b in record.batches] == list(range(whole.counts.batches))  # none lost or doubled
        by_segment = {s.segment: s for s in record.segments}
        for batch in record.batches:  # not mixed: each batch ran in its segment's job
            assert batch.job_id == by_segment[batch.segment].job_id
            assert batch.pid == by_segment[batch.segment].pid
        assert responses_path(sweep, cid).read_text() == responses_path(reference, cid).read_text()
        assert not progress_path(sweep, cid, 0).exists()
        assert not list((sweep / "cells" / cid).glob("*.part.jsonl"))


@pytest.mark.slow
def test_random_interleavings_of_two_runners_and_a_sweep_lose_double_and_mix_nothing(tmp_path):
    """Issue 28.1: SIGTERM, SIGINT and kill -9 at random points of two runners and a sweep's local job, with
    sampling on (the grid's default): every record and response file equals an uninterrupted run's."""
    data = _gsm8k(tmp_path)
    reference = tmp_path / "reference"
    whole = Runner(tmp_path, "reference", [*GRID, f"dataset.path={data}", f"sweep_dir={reference}"])
    assert whole.wait() == 0, whole.err.read_text()[-3000:]
    rng = random.Random(18)
    tried = []
    for number in range(INTERLEAVINGS):
        plan = _scenario(rng)
        tmp = tmp_path / f"play-{number}"
        tmp.mkdir()
        sweep = tmp / "sweep"
        _play(tmp, [*GRID, f"dataset.path={data}", f"sweep_dir={sweep}"], plan)
        _check_like_reference(sweep, reference)
        tried.append(plan)
    print(f"{len(tried)} interleavings tried, every record as an uninterrupted run's:")
    for plan in tried:
        print(f"  {plan}")


def test_a_deleted_lock_file_lets_no_second_runner_in(tmp_path):
    # Issue 28: deleting a leftover-looking cell.lock let a second runner share the cell.
    mine = CellLock(tmp_path, "c0ffee")
    assert mine.try_acquire()
    mine.path.unlink()
    other = subprocess.run([sys.executable, "-c", "import sys; from w2w.cell_lock import CellLock; "
                            "print(CellLock(sys.argv[1], 'c0ffee').try_acquire())",
                            str(tmp_path)], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert other.strip() == "False"
    mine.release()
    assert CellLock(tmp_path, "c0ffee").try_acquire()


def test_a_lock_is_taken_on_the_file_at_its_path_even_if_it_was_replaced_meanwhile(tmp_path, monkeypatch):
    import fcntl

    from w2w import cell_lock

    lock = CellLock(tmp_path, "c0ffee")
    real, replaced = fcntl.lockf, []

    def lockf(fd, how):  # another process deletes and recreates the file between our open and our lock
        if not replaced:
            lock.path.unlink()
            lock.path.write_text("")
            replaced.append(True)
        return real(fd, how)

    monkeypatch.setattr(cell_lock.fcntl, "lockf", lockf)
    assert lock.try_acquire()
    assert os.fstat(lock._fd).st_ino == os.stat(lock.path).st_ino  # the lock is on the file others will open
    lock.release()


def test_the_holders_own_read_of_its_lock_file_does_not_release_it(tmp_path):
    # POSIX locks go when their process closes any descriptor of the file: the folder's flock stays.
    mine = CellLock(tmp_path, "c0ffee")
    assert mine.try_acquire()
    mine.path.read_text()  # a second descriptor, opened and closed by the holder
    other = subprocess.run([sys.executable, "-c", "import sys; from w2w.cell_lock import CellLock; "
                            "print(CellLock(sys.argv[1], 'c0ffee').try_acquire())",
                            str(tmp_path)], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert other.strip() == "False"
    mine.release()
