"""Shared fixtures: the local SLURM (provisioned by launch/slurm_local.sh), CLI runners, and the reaping of
every process a test starts."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from w2w.bench.plan_speed import write_paper_datasets

ROOT = Path(__file__).resolve().parents[1]
# No network in tests: hub dataset names (the paper presets') plan from the datasets cache, as a
# user without network would run them; tests of the unreachable-hub error unset this.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# ... and the cache holds them: --plan checks that an offline hub name has a copy (w2w.data.hub_cached).
# Folders only, laid out as datasets files a prepared copy: planning reads no rows of a hub dataset.
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="w2w-hf-cache-")
    for _prepared in ("openai___gsm8k/main", "tatsu-lab___alpaca/default"):
        (Path(os.environ["HF_DATASETS_CACHE"]) / _prepared / "0.0.0" / "stub").mkdir(parents=True)
# W2W_GSM8K/W2W_ALPACA make dataset=gsm8k/alpaca read local copies (conf/dataset). Out of the tests'
# environment, so that those names mean the hub unless a test points them at a file; the real GSM8K
# split that .ci/run puts in W2W_GSM8K is kept here for the test that runs it.
REAL_GSM8K = os.environ.pop("W2W_GSM8K", None)
os.environ.pop("W2W_ALPACA", None)
IN_CI = os.environ.get("CI") == "true"
FAKE_SITE = ROOT / "tests" / "fake_site"


# Every process started by spawn() (cli() included) during the current test: its group is ended at teardown.
_STARTED: list[subprocess.Popen] = []


def spawn(argv: list[str], sigint: signal.Handlers = signal.SIG_DFL, **kwargs) -> subprocess.Popen:
    """subprocess.Popen in a session of its own with SIGINT at its default; whatever it and its children
    (local jobs included) still run when the test ends is killed then, pass or fail.

    pytest started as a background job of a script (`make test &`, `nohup ... &`) runs with SIGINT
    ignored and every child inherits that; a test that interrupts a process must see it obey, as it
    does started from a terminal. sigint=signal.SIG_IGN starts it as such a background job instead."""
    proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=functools.partial(signal.signal, signal.SIGINT,
                                                                                       sigint), **kwargs)
    _STARTED.append(proc)
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group spawn() gave proc (it outlives proc while a child of proc runs), then reap proc."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(autouse=True)
def _reap_started() -> Iterator[None]:
    """No process a test started outlives it (a failed test used to leave runners resuming cells later)."""
    yield
    while _STARTED:
        kill_group(_STARTED.pop())


def cli(module: str, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a w2w command-line entry point as a user would, in a fresh interpreter."""
    proc = spawn([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                 cwd=ROOT)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}")
    return result




@pytest.fixture(scope="session")
def paper_datasets(tmp_path_factory) -> dict[str, str]:
    """W2W_ALPACA and W2W_GSM8K pointing at local files of 4,096 rows each: the presets plan offline."""
    return write_paper_datasets(tmp_path_factory.mktemp("paper-data"))


@pytest.fixture(scope="session")
def local_slurm() -> None:
    """A running two-node local SLURM; skipped without root, except in CI where it must run."""
    script = ROOT / "launch" / "slurm_local.sh"
    if subprocess.run(["bash", str(script), "status"], capture_output=True).returncode == 0:
        return
    if os.geteuid() != 0:
        reason = "the local SLURM needs root (make slurm-up as root)"
        if IN_CI:
            pytest.fail(f"CI=true requires the SLURM tests to run: {reason}")
        pytest.skip(reason)
    up = subprocess.run(["bash", str(script), "up"], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail(f"make slurm-up failed:\n{up.stdout}\n{up.stderr}")


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (the job's processes all run on this machine)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class Barrier:
    """The test's side of tests/fake_site's barrier: SLURM job processes wait there until released."""

    def __init__(self, path: Path):
        self.path = path

    def holders(self) -> list[int]:
        """The processes that reached the barrier (still waiting there or not)."""
        return [int(p.name.rpartition(".")[2]) for p in self.path.parent.glob(f"{self.path.name}.held.*")]

    def release(self, *, after_exit: bool) -> None:
        """Open the barrier; after_exit: first wait until every process that held there has ended, so
        that a cancelled or requeued job's processes, still alive for SLURM's KillWait, cannot go on."""
        if after_exit:
            deadline = time.monotonic() + 120
            while alive := [pid for pid in self.holders() if _running(pid)]:
                if time.monotonic() > deadline:
                    raise AssertionError(f"job processes {alive} still alive 120 s after their job ended")
                time.sleep(0.2)
        self.path.touch()


@pytest.fixture
def hold_at_barrier(tmp_path, monkeypatch) -> Iterator[Callable[[str], Barrier]]:
    """hold_at_barrier("cells:N" or "batches:N"): the SLURM jobs this test submits from then on hold
    after their N-th cell record or a cell's N-th batch, until the test releases the barrier."""
    barriers: list[Barrier] = []

    def hold(after: str) -> Barrier:
        barrier = Barrier(tmp_path / "barrier")
        monkeypatch.setenv("W2W_TEST_BARRIER", str(barrier.path))
        monkeypatch.setenv("W2W_TEST_BARRIER_AFTER", after)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE_SITE), str(ROOT)]))
        barriers.append(barrier)
        return barrier

    yield hold
    for barrier in barriers:  # a test that failed leaves no job waiting
        barrier.path.touch()
