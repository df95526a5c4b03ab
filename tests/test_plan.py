"""Planning without SLURM: placements, node/task counts, fit checks, and the golden sbatch script."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from submitit.slurm.slurm import _make_sbatch_string
from w2w.launch.plan import make_plan
from w2w.launch.submit import slurm_parameters

from tests.conftest import cli
from w2w.config import ConfigError

GOLDEN = Path(__file__).parent / "golden"
PAPER_65B = ["model=llama_65b", "gpu=v100", "cluster=supercloud", "shards=8,16,32", "batch_size=16,128",
             "max_gen_len=256,512", "dataset=alpaca,gsm8k", "skip_unfit=true"]


def test_65b_on_v100_plans_nodes_and_tasks_without_slurm(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # sbatch/sacct unreachable: --plan must not need them
    out = cli("w2w.launch.sweep", "--plan", *PAPER_65B).stdout
    assert "3 job(s), " in out
    for shards, nodes in ((8, 4), (16, 8), (32, 16)):
        assert f"shards={shards} precision=fp16 -> {nodes} node(s) x 2 task(s)" in out
    plan = make_plan(PAPER_65B)
    per_job = {job.cfg.shards: len(job.cells) for job in plan.jobs}
    # 8 V100s hold 65B at batch 16 but not at batch 128 (the fit estimate); 16 and 32 hold both.
    assert per_job == {8: 4, 16: 8, 32: 8}
    assert len(plan.skipped) == 4 and all(c.cfg.shards == 8 and c.cfg.batch_size == 128 for c in plan.skipped)


def test_unfit_cell_is_an_error_without_skip_unfit():
    with pytest.raises(ConfigError, match=r"needs ~.* GiB per GPU .* has 32 GiB: raise shards"):
        make_plan(["model=llama_65b", "gpu=v100", "cluster=supercloud", "shards=8", "batch_size=256"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["model=llama_65b", "gpu=v100", "cluster=supercloud", "shards=64"], "cluster.max_nodes"),
     (["shards=3", "model.n_heads=6", "model.dim=48", "cluster=supercloud"], "does not split evenly over 2 nodes"),
     (["model=llama_65b", "shards=16"], r"offers at most 1 \(cluster.max_nodes\)"),
     (["dataset=gsm8k", "dataset.path=/nonexistent/gsm8k.jsonl"], "dataset.path=/nonexistent/gsm8k.jsonl: no such file")],
)
def test_placements_the_cluster_cannot_offer(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_plan(overrides)


def test_sbatch_for_one_placement_matches_golden():
    (job,) = make_plan(["model=llama_65b", "gpu=v100", "cluster=supercloud", "shards=16", "batch_size=64",
                        "max_gen_len=256"]).jobs
    script = _make_sbatch_string(command="python -u -m submitit.core._submit /sweep/submitit/%j",
                                 folder="/sweep/submitit/%j", **slurm_parameters(job))
    golden = GOLDEN / "sbatch_llama65b_v100_x16.sh"
    if os.environ.get("W2W_UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text()
