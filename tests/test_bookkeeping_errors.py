"""Issue 10: bad input at the sweep's edges is one clear line (no traceback), caught at plan time where it can be."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from w2w.launch.axes import cell_parameters, varying_axes
from w2w.launch.plan import make_plan

from tests.conftest import ROOT, cli
from w2w.config import compose_cell
from w2w.errors import ConfigError
from w2w.generate_cli import length_problem

FAST = ["shards=1", "precision=fp32", "max_gen_len=4", "dataset.num_prompts=2"]


def _one_line_error(result: subprocess.CompletedProcess, prog: str) -> str:
    """The command failed with exactly one line on stderr, naming itself, and no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    return lines[0]


def test_gpu_on_a_cluster_without_gres_is_refused_at_plan_time():
    """10.2: gpu=v100 on the local SLURM (no gres/gpu) used to reach sbatch, after other jobs were queued."""
    with pytest.raises(ConfigError, match=r"gpu=v100 needs GPUs but cluster=local_slurm schedules none "
                                          r"\(cluster.gres_gpu=false\): use gpu=cpu"):
        make_plan(["cluster=local_slurm", "gpu=cpu,v100", "seed=1,2"])
    line = _one_line_error(cli("w2w.launch.sweep", "--plan", "cluster=local_slurm", "gpu=cpu,v100", check=False),
                           "w2w-sweep")
    assert "gres_gpu" in line
    assert make_plan(["cluster=local_slurm", "gpu=cpu"]).jobs  # CPU cells still plan


def test_sweep_dir_that_is_a_file_is_refused_at_plan_time(tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    for sweep_dir in (target, target / "sub"):
        line = _one_line_error(cli("w2w.launch.sweep", "--plan", *FAST, f"sweep_dir={sweep_dir}", check=False),
                               "w2w-sweep")
        assert f"sweep_dir={sweep_dir}: {target} is a file, not a folder" in line
    assert target.read_text() == "not a folder"


def test_sweep_dir_that_is_not_writable_is_refused_at_plan_time(tmp_path):
    # Under /tmp itself: pytest's own folders are private to their owner, whom setpriv leaves.
    locked = Path(tempfile.mkdtemp(prefix="w2w-locked-"))
    locked.chmod(0o555)
    request_cleanup = locked.chmod  # restored below so that the folder can go
    command = [sys.executable, "-m", "w2w.launch.sweep", "--plan", *FAST, f"sweep_dir={locked / 'sweep'}"]
    if os.geteuid() == 0:  # root may write anywhere: ask as an ordinary user
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv to drop privileges")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env=os.environ | {"HOME": str(tmp_path)})
    try:
        line = _one_line_error(result, "w2w-sweep")
        assert f"{locked} is not writable by this user" in line
        assert not (locked / "sweep").exists()
    finally:
        request_cleanup(0o755)
        shutil.rmtree(locked)


def test_negative_poll_is_refused():
    result = cli("w2w.launch.sweep", "--wait", "--poll", "-1", *FAST, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --poll: -1: must be a number of seconds > 0" in result.stderr


def test_batch_size_abc_says_why():
    result = cli("w2w.launch.sweep", "--plan", "batch_size=abc", check=False)
    line = _one_line_error(result, "w2w-sweep")
    assert "batch_size=abc" in line and "abc" in line.split("batch_size=abc", 1)[1], line
    assert "Error merging override" not in line


@pytest.mark.parametrize(("override", "name"), [("gpu=glob(*)", "glob"), ("temperature=interval(0.1,0.9)", "interval")])
def test_hydra_sweeps_w2w_does_not_expand_are_refused_by_name(override, name):
    line = _one_line_error(cli("w2w.launch.sweep", "--plan", override, check=False), "w2w-sweep")
    assert f"{name}(...) sweeps are not supported by w2w" in line


def test_range_sweeps_still_expand():
    out = cli("w2w.launch.sweep", "--plan", "seed=range(1,4)").stdout
    assert "3 cell(s)" in out and "seed=3" in out


def _manifest_of(sweep: Path, text: str) -> Path:
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "manifest.json").write_text(text)
    return sweep


def test_corrupt_manifest_is_one_line_in_status_and_sweep(tmp_path):
    sweep = _manifest_of(tmp_path / "sweep", '{"version": 2, "jobs": {"ab')  # truncated by a full disk
    line = _one_line_error(cli("w2w.launch.status", str(sweep), check=False), "w2w-status")
    assert "manifest.json is unreadable" in line and "move it away" in line
    line = _one_line_error(cli("w2w.launch.sweep", *FAST, f"sweep_dir={sweep}", check=False), "w2w-sweep")
    assert "manifest.json is unreadable" in line
    assert (sweep / "manifest.json").read_text() == '{"version": 2, "jobs": {"ab'  # left as it was
    _manifest_of(sweep, "[1, 2]")
    assert "not a w2w-sweep manifest" in _one_line_error(cli("w2w.launch.status", str(sweep), check=False),
                                                         "w2w-status")


def test_status_without_sacct_is_one_line(tmp_path):
    manifest = {"version": 2, "commands": [], "cells": {"c1": {"job": "j1", "params": {}, "skip_reason": None,
                                                                "world_size": 1}},
                "jobs": {"j1": {"backend": "slurm", "nodes": 1, "tasks_per_node": 1, "cells": ["c1"], "shape": "x",
                                "submissions": [{"job_id": "17", "folder": str(tmp_path), "cells": ["c1"]}]}}}
    sweep = _manifest_of(tmp_path / "sweep", json.dumps(manifest))
    env = os.environ | {"PATH": "/nonexistent"}
    result = subprocess.run([sys.executable, "-m", "w2w.launch.status", str(sweep)], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)
    line = _one_line_error(result, "w2w-status")
    assert "sacct not found" in line and "login node" in line


def test_w2w_run_shards_2_without_torchrun_is_one_line(tmp_path):
    line = _one_line_error(cli("w2w.run_cli", "shards=2", *FAST[1:], f"sweep_dir={tmp_path}", check=False), "w2w-run")
    assert "shards=2 but 1 process(es) started" in line and "torchrun --nproc-per-node 2" in line


def test_w2w_run_on_a_gpu_profile_without_a_gpu_is_one_line(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    line = _one_line_error(cli("w2w.run_cli", "gpu=v100", *FAST, f"sweep_dir={tmp_path}", check=False), "w2w-run")
    assert "no GPU is visible: set gpu=cpu" in line


def test_prompt_longer_than_the_context_is_told_what_can_fix_it():
    """10.11: 'lower max_gen_len' cannot fix a prompt that alone fills model.max_seq_len."""
    assert length_problem(10, 6, 16) is None
    alone = length_problem(20, 4, 16)
    assert "lower max_gen_len" not in alone
    assert "shorten the prompt to under 16 tokens" in alone and "raise model.max_seq_len" in alone
    both = length_problem(12, 8, 16)
    assert "lower max_gen_len to at most 4" in both and "shorten the prompt" in both


def test_w2w_generate_with_a_prompt_longer_than_the_context(tmp_path):
    prompt = "the energy of a model grows with " * 12
    result = cli("w2w.generate_cli", "gpu=cpu", "precision=fp32", "model.max_seq_len=16", "max_gen_len=4",
                 f"prompt={prompt}", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the prompt alone fills the context: shorten the prompt" in result.stderr
    assert "lower max_gen_len" not in result.stderr


def test_varying_axes_are_found_generically():
    """10.7: every key whose value differs is an axis; a group's details that follow its name are not."""
    cells = [cell_parameters(compose_cell([f"seed={s}", f"temperature={t}", f"model={m}", "dataset.num_prompts=8"]))
             for s in (1, 2) for t in (0.5, 0.7) for m in ("tiny", "llama_7b")]
    assert varying_axes(cells) == ["model.name", "temperature", "seed"]  # config order
    assert varying_axes(cells[:1]) == []


def test_plan_shows_every_axis_that_varies():
    out = cli("w2w.launch.sweep", "--plan", "seed=1,2", "dataset.num_prompts=4,8", "top_p=0.5,0.9",
              "temperature=0.6").stdout
    cell_lines = [line for line in out.splitlines() if line.strip().startswith("cell ")]
    assert len(cell_lines) == 8
    assert len({line.split(" ", 3)[3] for line in cell_lines}) == 8  # no two rows alike
    for line in cell_lines:
        assert "dataset.num_prompts=" in line and " seed=" in line and " top_p=" in line
        assert "temperature" not in line  # one value: not an axis


def test_a_version_1_manifest_lists_every_cell_it_counts(tmp_path):
    """10.4: version 1 overwrote a placement's cell list with the last grid's: status counted 2, listed 1."""
    sweep = tmp_path / "sweep"
    cells = {cid: {"job": "j1", "params": {"dataset.name": "synthetic", "batch_size": b, "max_gen_len": 4,
                                           "power_cap_w": None, "seed": s},
                   "skip_reason": None, "world_size": 1} for cid, b, s in (("c1", 1, 1), ("c2", 1, 2))}
    manifest = {"version": 1, "command": ["w2w-sweep", "seed=2"], "cells": cells,
                "jobs": {"j1": {"backend": "local", "nodes": 1, "tasks_per_node": 1, "cells": ["c2"],
                                "describe": "job j1: model=tiny gpu=cpu shards=1 precision=fp32 -> 1 node(s) x "
                                            "1 task(s), 1 cell(s)",
                                "submissions": [{"job_id": "999999999", "folder": str(tmp_path)}]}}}
    _manifest_of(sweep, json.dumps(manifest))
    for cid in cells:  # what the runner leaves for a finished cell
        record = sweep / "cells" / cid / "rank-00000.json"
        record.parent.mkdir(parents=True)
        record.write_text(json.dumps({"cell_id": cid, "rank": 0, "world_size": 1, "status": "ok", "node": "n1",
                                      "counts": {"responses": 1, "output_tokens": 4, "output_words": 3},
                                      "times": {"total_s": 1.0}}))
    status = cli("w2w.launch.status", str(sweep)).stdout
    assert status.splitlines()[0] == f"sweep {sweep}: 2 cells: 2 done, 0 failed, 0 running, 0 pending, 0 skipped"
    listed = [line for line in status.splitlines() if line.startswith("  cell ")]
    assert len(listed) == 2 and "seed=1" in listed[1] + listed[0] and "seed=2" in listed[0] + listed[1]
    assert "job j1: model=tiny gpu=cpu shards=1 precision=fp32 -> 1 node(s) x 1 task(s), 2 cell(s)" in status
