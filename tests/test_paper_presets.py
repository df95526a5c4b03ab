"""Every paper preset plans (w2w-sweep --plan) to the jobs, cells and node x GPU shapes its grid implies."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys

import pytest
from w2w.analysis import paper
from w2w.launch import sweep

from tests.conftest import ROOT

PRESETS = ("paper_fig2_3", "paper_fig4_9", "paper_table3", "paper_table4_5", "paper_all")
ENV = ("W2W_CLUSTER_V100", "W2W_CLUSTER_A100", "W2W_CKPT_7B", "W2W_CKPT_13B", "W2W_CKPT_65B")
JOB = re.compile(r"^job \w+: model=(\w+) gpu=(\w+) shards=(\d+) precision=\w+ -> (\d+) node\(s\) x (\d+) task\(s\), (\d+) cell\(s\)")
CELL = re.compile(r"^  cell (\w+) dataset=(\w+) (?:engine=\w+ )?batch_size=(\d+) max_gen_len=(\d+) power_cap_w=(\S+)")
SKIPPED = re.compile(r"^  skipped (\w+) ")


def parse_plan(text: str) -> dict:
    head = re.search(r"^(\d+) job\(s\), (\d+) cell\(s\)", text, re.M)
    jobs = [m.groups() for m in map(JOB.match, text.splitlines()) if m]
    return {
        "jobs": int(head[1]), "cells": int(head[2]),
        # (model, gpu, shards) -> (nodes, tasks per node, cells)
        "shapes": {(m, g, int(s)): (int(n), int(t), int(c)) for m, g, s, n, t, c in jobs},
        "cell_rows": [m.groups() for m in map(CELL.match, text.splitlines()) if m],
        "skipped": {m[1] for m in map(SKIPPED.match, text.splitlines()) if m},
        "engines": set(re.findall(r"^  cell \w+ .* engine=(\w+)", text, re.M)),
    }


def plan_output(*overrides: str, env: dict[str, str] | None = None) -> dict:
    """w2w-sweep --plan in this process (the CLI's own code path), parsed."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for name in ENV:
            mp.delenv(name, raising=False)
        for name, value in (env or {}).items():
            mp.setenv(name, value)
        with contextlib.redirect_stdout(out):
            assert sweep.main(["--plan", *overrides]) == 0
    return parse_plan(out.getvalue())


@pytest.fixture(scope="session")
def plans() -> dict[str, dict]:
    """The largest plan in a second process, beside the others here: both cores, half the wait."""
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    largest = subprocess.Popen([sys.executable, "-m", "w2w.launch.sweep", "--plan", f"+experiment={PRESETS[-1]}"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    found = {name: plan_output(f"+experiment={name}") for name in PRESETS[:-1]}
    out, err = largest.communicate(timeout=300)
    assert largest.returncode == 0, err[-2000:]
    return found | {PRESETS[-1]: parse_plan(out)}


def _ids(plan: dict) -> set[str]:
    return {row[0] for row in plan["cell_rows"]}


def test_fig2_3_runs_table2_hardware_and_a_batch_ladder(plans):
    p = plans["paper_fig2_3"]
    assert (p["jobs"], p["cells"], len(p["skipped"])) == (6, 16, 26)
    # One job per model x GPU on Table II's GPUs (V100: 2 per node; A100: 4 per node, assumed).
    assert p["shapes"] == {
        ("llama_7b", "v100", 1): (1, 1, 2), ("llama_7b", "a100", 1): (1, 1, 4),
        ("llama_13b", "v100", 2): (1, 2, 2), ("llama_13b", "a100", 1): (1, 1, 3),
        ("llama_65b", "v100", 8): (4, 2, 2), ("llama_65b", "a100", 4): (1, 4, 3),
    }
    assert {(m, g, s) for m, g, s in p["shapes"]} == {(r.model, r.gpu, r.gpus) for r in paper.TABLE2}
    figs = [r for r in p["cell_rows"] if r[2] == "64"]
    assert len(figs) == 12 and {r[1] for r in figs} == {"alpaca", "gsm8k"}  # 6 placements x 2 datasets
    assert {r[3] for r in p["cell_rows"]} == {"256"} and {r[4] for r in p["cell_rows"]} == {"250.0"}
    # The ladder past 64 runs only where the fit estimate allows: 7B 128/256, 13B 128, 65B 128 on A100.
    ladder = sorted(int(r[2]) for r in p["cell_rows"] if r[2] != "64")
    assert ladder == [128, 128, 128, 256]


def test_fig4_9_is_65b_on_8_16_32_v100s(plans):
    p = plans["paper_fig4_9"]
    # 3 shard counts x 4 batch sizes x 2 lengths x 2 datasets = 48 grid points; 28 do not fit.
    assert (p["jobs"], p["cells"], len(p["skipped"])) == (3, 20, 28)
    assert p["shapes"] == {("llama_65b", "v100", 8): (4, 2, 2), ("llama_65b", "v100", 16): (8, 2, 6),
                           ("llama_65b", "v100", 32): (16, 2, 12)}
    assert {r[3] for r in p["cell_rows"]} == {"512", "1024"}


def test_table3_is_one_a100_node_with_three_caps_at_three_lengths(plans):
    p = plans["paper_table3"]
    assert (p["jobs"], p["cells"], len(p["skipped"])) == (1, 9, 0)
    assert p["shapes"] == {("llama_65b", "a100", 4): (1, 4, 9)}
    grid = {(r[1], r[2], r[3], r[4]) for r in p["cell_rows"]}
    assert grid == {("gsm8k", "64", str(n), f"{w:.1f}") for n in paper.TABLE3
                    for w in (paper.TABLE3_BASE_W, *paper.TABLE3_CAPS_W)}


def test_table4_5_utilization_cells(plans):
    p = plans["paper_table4_5"]
    # IV: 256/512/1024 on 4 A100s (2048 cannot hold its KV cache: skipped); V: 8/16/32 V100s.
    assert (p["jobs"], p["cells"], len(p["skipped"])) == (4, 6, 1)
    assert p["shapes"] == {("llama_65b", "a100", 4): (1, 4, 3), ("llama_65b", "v100", 8): (4, 2, 1),
                           ("llama_65b", "v100", 16): (8, 2, 1), ("llama_65b", "v100", 32): (16, 2, 1)}
    assert sorted(int(r[3]) for r in p["cell_rows"]) == [256, 256, 256, 256, 512, 1024]
    # Table III's 250 W cells are Table IV's: the same cell ids, run once in paper_all.
    assert len(_ids(p) & _ids(plans["paper_table3"])) == 3


def test_paper_all_is_the_union_of_the_other_presets(plans):
    p = plans["paper_all"]
    others = [plans[name] for name in PRESETS[:-1]]
    assert _ids(p) == set().union(*map(_ids, others))
    assert p["skipped"] == set().union(*(o["skipped"] for o in others))
    assert (p["jobs"], p["cells"]) == (9, 47)
    assert p["shapes"][("llama_65b", "v100", 8)] == (4, 2, 4)  # Figs 2-3, Figs 4-9 and Table V cells


def test_every_preset_runs_the_papers_generation_schedule(plans):
    for name, plan in plans.items():
        assert plan["engines"] == {"llama1"}, name
    assert plan_output("+experiment=paper_table3", "engine=fast")["engines"] == {"fast"}  # the command line wins


def test_cluster_profiles_come_from_the_environment_or_the_command_line():
    a100_on_v100_nodes = plan_output("+experiment=paper_table3", env={"W2W_CLUSTER_A100": "supercloud"})
    assert a100_on_v100_nodes["shapes"] == {("llama_65b", "a100", 4): (2, 2, 9)}
    command_line = plan_output("+experiment=paper_table3", "cluster=supercloud")
    assert command_line["shapes"] == a100_on_v100_nodes["shapes"]


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True)


def test_make_targets_submit_the_presets_with_cluster_and_checkpoints():
    out = _make("paper-fig4-9", "CLUSTER=local_slurm", "CKPT_ROOT=/ckpt").stdout
    assert ("W2W_CLUSTER_V100=local_slurm W2W_CLUSTER_A100=local_slurm W2W_CKPT_7B=/ckpt/7B "
            "W2W_CKPT_13B=/ckpt/13B W2W_CKPT_65B=/ckpt/65B") in out
    assert "w2w-sweep +experiment=paper_fig4_9 sweep_dir=runs/paper_fig4_9" in out
    supercloud = _make("paper-table3", "PAPER_ARGS=--plan").stdout
    assert "W2W_CLUSTER_A100=supercloud_a100" in supercloud and "+experiment=paper_table3" in supercloud
    refused = _make("paper", "CKPT_ROOT=")
    assert refused.returncode != 0 and "needs the LLaMA 7B checkpoint" in refused.stderr
    assert "w2w.analysis.report runs/x" in _make("paper-report", "SWEEP=runs/x").stdout
