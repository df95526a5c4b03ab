"""Every paper preset plans (w2w-sweep --plan) to the jobs, cells and node x GPU shapes its grid implies,
offline: its datasets are local files of 4,096 rows (W2W_ALPACA, W2W_GSM8K) snapshotted into the sweep."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from w2w.analysis import paper
from w2w.launch import sweep

from tests.conftest import ROOT

PRESETS = ("paper_fig2_3", "paper_fig4_9", "paper_table3", "paper_table4_5", "paper_all")
ENV = ("W2W_CLUSTER_V100", "W2W_CLUSTER_A100", "W2W_CKPT_7B", "W2W_CKPT_13B", "W2W_CKPT_65B", "W2W_ALPACA",
       "W2W_GSM8K")
JOB = re.compile(r"^job \w+: model=(\w+) gpu=(\w+) shards=(\d+) precision=\w+ -> (\d+) node\(s\) x (\d+) task\(s\), (\d+) cell\(s\)")
CELL = re.compile(r"^  cell (\w+) dataset=(\w+) (?:engine=\w+ )?batch_size=(\d+) max_gen_len=(\d+) power_cap_w=(\S+)")
SKIPPED = re.compile(r"^  skipped (\w+) ")


def parse_plan(text: str) -> dict:
    head = re.search(r"^(\d+) job\(s\), (\d+) cell\(s\)", text, re.M)
    jobs = [m.groups() for m in map(JOB.match, text.splitlines()) if m]
    return {
        "text": text, "jobs": int(head[1]), "cells": int(head[2]),
        # (model, gpu, shards) -> (nodes, tasks per node, cells)
        "shapes": {(m, g, int(s)): (int(n), int(t), int(c)) for m, g, s, n, t, c in jobs},
        "cell_rows": [m.groups() for m in map(CELL.match, text.splitlines()) if m],
        "skipped": {m[1] for m in map(SKIPPED.match, text.splitlines()) if m},
        "engines": set(re.findall(r"^  cell \w+ .* engine=(\w+)", text, re.M)),
    }


def plan_output(*overrides: str, env: dict[str, str]) -> dict:
    """w2w-sweep --plan in this process (the CLI's own code path), offline, parsed."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for name in ENV:
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        with contextlib.redirect_stdout(out):
            assert sweep.main(["--plan", *overrides]) == 0
    return parse_plan(out.getvalue())


@pytest.fixture(scope="session")
def sweeps(tmp_path_factory) -> Path:
    """Where the presets' plans write their prompt snapshots (--plan writes them into sweep_dir)."""
    return tmp_path_factory.mktemp("paper-sweeps")


@pytest.fixture(scope="session")
def plans(paper_datasets, sweeps) -> dict[str, dict]:
    """The largest plan in a second process, beside the others here: both cores, half the wait."""
    env = {k: v for k, v in os.environ.items() if k not in ENV} | paper_datasets | {"HF_DATASETS_OFFLINE": "1"}
    largest = subprocess.Popen([sys.executable, "-m", "w2w.launch.sweep", "--plan", f"+experiment={PRESETS[-1]}",
                                f"sweep_dir={sweeps / PRESETS[-1]}"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    found = {name: plan_output(f"+experiment={name}", f"sweep_dir={sweeps / name}", env=paper_datasets)
             for name in PRESETS[:-1]}
    out, err = largest.communicate(timeout=300)
    assert largest.returncode == 0, err[-2000:]
    return found | {PRESETS[-1]: parse_plan(out)}


def _ids(plan: dict) -> set[str]:
    return {row[0] for row in plan["cell_rows"]}


def test_fig2_3_runs_table2_hardware_and_a_batch_ladder(plans):
    p = plans["paper_fig2_3"]
    assert (p["jobs"], p["cells"], len(p["skipped"])) == (6, 14, 28)
    # One job per model x GPU on Table II's GPUs (V100: 2 per node; A100: 4 per node, assumed).
    assert p["shapes"] == {
        ("llama_7b", "v100", 1): (1, 1, 2), ("llama_7b", "a100", 1): (1, 1, 3),
        ("llama_13b", "v100", 2): (1, 2, 2), ("llama_13b", "a100", 1): (1, 1, 2),
        ("llama_65b", "v100", 8): (4, 2, 2), ("llama_65b", "a100", 4): (1, 4, 3),
    }
    assert {(m, g, s) for m, g, s in p["shapes"]} == {(r.model, r.gpu, r.gpus) for r in paper.TABLE2}
    figs = [r for r in p["cell_rows"] if r[2] == "64"]
    assert len(figs) == 12 and {r[1] for r in figs} == {"alpaca", "gsm8k"}  # 6 placements x 2 datasets
    assert {r[3] for r in p["cell_rows"]} == {"256"} and {r[4] for r in p["cell_rows"]} == {"250.0"}
    # The ladder past 64 runs only where LLaMA-1's cache (batch x model.max_seq_len 512) fits: 7B and 65B on A100.
    ladder = sorted(int(r[2]) for r in p["cell_rows"] if r[2] != "64")
    assert ladder == [128, 128]


def test_the_planner_gives_table2_with_metas_cache(plans):
    """Per model x GPU: the fewest GPUs with a cell that fits, and the largest batch on them."""
    p = plans["paper_fig2_3"]
    rows = {(m, g): s for m, g, s in p["shapes"]}
    largest = {}
    for job in re.finditer(r"^job \w+: model=(\w+) gpu=(\w+) .*?(?=^job |\Z)", p["text"], re.M | re.S):
        batches = [int(b) for b in re.findall(r"^  cell \w+ .*batch_size=(\d+)", job[0], re.M)]
        largest[job[1], job[2]] = max(batches)
    for row in paper.TABLE2:
        assert rows[row.model, row.gpu] == row.gpus, row
        # 7B on an A100: 128 fits (49.5 GiB of 80); the paper reports 64, the batch it ran, not the limit.
        expected = 128 if (row.model, row.gpu) == ("llama_7b", "a100") else row.max_batch
        assert largest[row.model, row.gpu] == expected, row


def test_fig4_9_is_65b_on_8_16_32_v100s(plans):
    p = plans["paper_fig4_9"]
    # 3 shard counts x 4 batch sizes x 2 lengths x 2 datasets = 48 grid points; 16 do not fit.
    assert (p["jobs"], p["cells"], len(p["skipped"])) == (3, 32, 16)
    assert p["shapes"] == {("llama_65b", "v100", 8): (4, 2, 4), ("llama_65b", "v100", 16): (8, 2, 12),
                           ("llama_65b", "v100", 32): (16, 2, 16)}
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
    # IV: 256-2048 on 4 A100s, each in LLaMA-1's cache of 512 positions; V: 8/16/32 V100s.
    assert (p["jobs"], p["cells"], len(p["skipped"])) == (4, 7, 0)
    assert p["shapes"] == {("llama_65b", "a100", 4): (1, 4, 4), ("llama_65b", "v100", 8): (4, 2, 1),
                           ("llama_65b", "v100", 16): (8, 2, 1), ("llama_65b", "v100", 32): (16, 2, 1)}
    assert sorted(int(r[3]) for r in p["cell_rows"]) == [256, 256, 256, 256, 512, 1024, 2048]
    # Table III's 250 W cells are Table IV's: the same cell ids, run once in paper_all.
    assert len(_ids(p) & _ids(plans["paper_table3"])) == 3


def test_paper_all_is_the_union_of_the_other_presets(plans):
    p = plans["paper_all"]
    others = [plans[name] for name in PRESETS[:-1]]
    assert _ids(p) == set().union(*map(_ids, others))
    assert p["skipped"] == set().union(*(o["skipped"] for o in others))
    assert (p["jobs"], p["cells"]) == (8, 57)
    assert p["shapes"][("llama_65b", "v100", 8)] == (4, 2, 6)  # Figs 2-3, Figs 4-9 and Table V cells


def test_plan_snapshots_the_prompts_into_the_sweep(plans, sweeps, paper_datasets):
    """--plan wrote each dataset's 4,096 prompts once, named by their content hash, into the sweep."""
    for name in PRESETS:
        snapshots = sorted((sweeps / name / "prompts").glob("*.jsonl"))
        datasets = {"alpaca", "gsm8k"} if name in ("paper_fig2_3", "paper_fig4_9", "paper_all") else {"gsm8k"}
        assert {path.name.split("-")[0] for path in snapshots} == datasets, name
        for path in snapshots:
            assert len(path.read_text().splitlines()) == 4096
            assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(path.stem.split("-")[1])


def test_every_preset_runs_the_papers_generation_schedule(plans, paper_datasets, tmp_path):
    for name, plan in plans.items():
        assert plan["engines"] == {"llama1"}, name
    # fast stops at EOS and needs prompt + max_gen_len to fit: LLaMA-1's 512 positions hold no 1024-token answer.
    fast = plan_output("+experiment=paper_table3", "engine=fast", "model.max_seq_len=2048", f"sweep_dir={tmp_path}",
                       env=paper_datasets)
    assert fast["engines"] == {"fast"}  # the command line wins


def test_cluster_profiles_come_from_the_environment_or_the_command_line(paper_datasets, tmp_path):
    a100_on_v100_nodes = plan_output("+experiment=paper_table3", f"sweep_dir={tmp_path}",
                                     env=paper_datasets | {"W2W_CLUSTER_A100": "supercloud"})
    assert a100_on_v100_nodes["shapes"] == {("llama_65b", "a100", 4): (2, 2, 9)}
    command_line = plan_output("+experiment=paper_table3", "cluster=supercloud", f"sweep_dir={tmp_path}",
                               env=paper_datasets)
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
