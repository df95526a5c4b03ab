"""Issue 28.1, 28.2 and 28.10: stop signals obeyed between batches, bounds on what sizes work, no tracebacks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
from w2w.launch.plan import make_plan

from tests.conftest import ROOT, cli
from tests.test_bookkeeping_errors import _one_line_error
from w2w import signals
from w2w.config import MAX_REPEATS, compose_cell
from w2w.errors import ConfigError

TINY_RUN = ["shards=1", "precision=fp32", "energy.idle_seconds=0", "max_gen_len=4", "dataset.num_prompts=2"]


# -- 28.1: the handler --------------------------------------------------------------------------------------------


def _signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    signal.sigtimedwait([], 0)  # let the handler run here


@pytest.fixture
def sigint_obeyed():
    """SIGINT at Python's default for this test: a suite started in the background of a script inherits
    it ignored, and on_signals keeps an ignored SIGINT ignored (as nohup'd commands expect)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_stop_signal_raises_at_once_outside_a_batch_and_only_between_batches_inside_one(sigint_obeyed):
    with signals.on_signals():
        with pytest.raises(signals.Stopped) as outside:
            _signal_self(signal.SIGTERM)
        assert outside.value.exit_status == 143
        with signals.deferred():
            _signal_self(signal.SIGINT)  # noted only: the batch runs on
            assert signals.requested() == signal.SIGINT
            with pytest.raises(signals.Stopped) as insisted:  # a second signal is the user insisting
                _signal_self(signal.SIGINT)
        assert insisted.value.exit_status == 130
        with signals.deferred():
            _signal_self(signal.SIGTERM)
            with pytest.raises(signals.Stopped):
                signals.check(signals.requested())  # what distributed.stop_if_asked does between batches
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handlers are back


# -- 28.2: bounds on the options that size work ---------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    (["repeats=1000000"], rf"repeats=1000000: at most {MAX_REPEATS} runs per cell"),
    (["dataset.num_prompts=100000000"], r"dataset.num_prompts=100000000: at most 100,000"),
    (["batch_size=range(1,20001)"], r"a grid of 20,000 cells; at most 10,000 per command"),
    (["batch_size=range(1,201)", "repeats=100"], r"200 cells x repeats = 20,000 runs; at most 10,000"),
])
def test_options_that_size_work_are_bounded_with_the_reason(overrides, message):
    """repeats=1000000 printed its plan and never returned; status and reduce then took minutes."""
    with pytest.raises(ConfigError, match=message):
        make_plan(overrides)


# -- 28.10: no tracebacks, small messages ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["w2w.launch.sweep", "--plan", "max_gen_len=8"], ["w2w.launch.status", "{tmp}"]])
def test_a_closed_stdout_ends_a_command_quietly(tmp_path, command):
    """`w2w-sweep --plan >&-` ended with AttributeError at w2w/exits.py (sys.stdout is None)."""
    args = [a.format(tmp=tmp_path) for a in command]
    (tmp_path / "manifest.json").write_text(json.dumps({"jobs": {}, "cells": {}}))
    result = subprocess.run(["bash", "-c", 'exec "$0" "$@" >&-', sys.executable, "-m", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr and "AttributeError" not in result.stderr, result.stderr


def test_overrides_may_follow_a_flag():
    result = cli("w2w.launch.sweep", "--poll", "1", "max_gen_len=8", "--plan", "dataset.num_prompts=2")
    assert "max_gen_len=8" in result.stdout


def test_w2w_run_refuses_two_placements_before_torch_loads():
    code = ("import sys; from w2w.run_cli import main; rc = main(['precision=fp32,fp16']); "
            "print(rc, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert result.stderr.startswith("w2w-run: error: w2w-run takes cells of one placement")


def test_a_lock_that_is_a_folder_is_one_line(tmp_path):
    sweep = tmp_path / "sweep"
    cid = compose_cell([*TINY_RUN, f"sweep_dir={sweep}"]).id
    (sweep / "cells" / cid / "cell.lock").mkdir(parents=True)
    result = cli("w2w.run_cli", *TINY_RUN, f"sweep_dir={sweep}", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr  # the log's lines, then one
    assert result.stderr.splitlines()[-1] == (f"w2w-run: error: {sweep / 'cells' / cid / 'cell.lock'} is a folder, "
                                              "not w2w's lock file: remove it and run again")


def test_reshard_to_a_destination_it_cannot_write_is_one_line(tmp_path):
    """An unwritable DST printed 18 lines of traceback; a file on the way is found before torch loads."""
    (tmp_path / "src").mkdir()
    (tmp_path / "file").write_text("")
    result = cli("w2w.reshard_cli", str(tmp_path / "src"), str(tmp_path / "file" / "dst"), "--shards", "1",
                 check=False)
    line = _one_line_error(result, "w2w-reshard")
    assert line.startswith(f"w2w-reshard: error: DST {tmp_path / 'file' / 'dst'}: {tmp_path / 'file'} is a file")


def test_node_notes_skip_cells_without_one():
    """A repeats cell whose run-0 record was copied from another cell has no node note: sorting None with
    the other cells' text was a TypeError in w2w-reduce and w2w-report."""
    from w2w.analysis.ladder import notes

    table = pd.DataFrame({"cell_id": ["a", "b", "c"], "status": ["ok"] * 3, "window_flag": [""] * 3,
                          "throttled": [False] * 3, "throttle_reasons": [""] * 3,
                          "node_note": ["no node energy: outside SLURM", None, float("nan")],
                          "node_energy_j": [None, None, None]})
    assert notes(table) == ["node_energy_j empty: outside SLURM"]


def test_a_json_fewshot_file_is_read_as_a_list_of_rows(tmp_path):
    """A .json few-shot file (a list of rows, as dataset.path takes) was read as JSONL: 'has 0 rows'."""
    from w2w.data import fewshot_prefix

    shots = tmp_path / "shots.json"
    shots.write_text(json.dumps([{"question": "1 + 1?", "answer": "2 #### 2"}]))
    cell = compose_cell(["dataset=gsm8k", f"dataset.fewshot_path={shots}", "dataset.fewshot_k=1"])
    assert "1 + 1?" in fewshot_prefix(cell.dataset) and "#### 2" in fewshot_prefix(cell.dataset)
