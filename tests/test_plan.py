"""Planning without SLURM: placements, node/task counts, fit checks, and the golden sbatch script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from submitit.slurm.slurm import _make_sbatch_string
from w2w.launch.plan import make_plan
from w2w.launch.submit import make_executor, slurm_parameters

from tests.conftest import ROOT, cli
from w2w.errors import ConfigError

GOLDEN = Path(__file__).parent / "golden"
PAPER_65B = ["model=llama_65b", "gpu=v100", "cluster=supercloud", "shards=8,16,32", "batch_size=16,128",
             "max_gen_len=256,512", "dataset=alpaca,gsm8k", "skip_unfit=true"]


def test_65b_on_v100_plans_nodes_and_tasks_without_slurm(monkeypatch, paper_datasets, tmp_path):
    plan = make_plan(PAPER_65B)  # the hub names: their prompts assumed 128 tokens long (not read here)
    monkeypatch.setenv("PATH", "/nonexistent")  # sbatch/sacct unreachable: --plan must not need them
    for name, value in paper_datasets.items():  # --plan snapshots the prompts: local copies, read offline
        monkeypatch.setenv(name, value)
    out = cli("w2w.launch.sweep", "--plan", *PAPER_65B, f"sweep_dir={tmp_path}").stdout
    assert "3 job(s), " in out
    for shards, nodes in ((8, 4), (16, 8), (32, 16)):
        assert f"shards={shards} precision=fp16 -> {nodes} node(s) x 2 task(s)" in out
    per_job = {job.cell.shards: len(job.cells) for job in plan.jobs}
    # 8 V100s hold 65B at batch 16 but not at batch 128 (the fit estimate); 16 and 32 hold both.
    assert per_job == {8: 4, 16: 8, 32: 8}
    assert len(plan.skipped) == 4 and all(c.cell.shards == 8 and c.cell.batch_size == 128 for c in plan.skipped)


def test_unfit_cell_is_an_error_without_skip_unfit():
    with pytest.raises(ConfigError, match=r"needs ~.* GiB per GPU .* has 32 GiB: use shards=16,32,64, lower"):
        make_plan(["model=llama_65b", "gpu=v100", "cluster=supercloud", "shards=8", "batch_size=256"])
    # 8 shards is the most Llama 3.1 405B's 8 KV heads allow: no shard count to suggest.
    with pytest.raises(ConfigError, match=r"has 80 GiB: use a GPU with more memory than gpu=a100"):
        make_plan(["model=llama3_1_405b", "gpu=a100", "precision=bf16", "shards=8"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["model=llama_65b", "gpu=v100", "cluster=supercloud", "shards=64"], "cluster.max_nodes"),
     # vocab_size and multiple_of: a model whose dim, vocabulary and feed-forward width 3 shards can split.
     (["shards=3", "model.n_heads=6", "model.dim=48", "model.vocab_size=513", "model.multiple_of=3",
       "cluster=supercloud"], "does not split evenly over 2 nodes"),
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
    expected = golden.read_text()
    if script != expected and os.environ.get("W2W_UPDATE_GOLDEN"):
        golden.write_text(script)
        pytest.fail(f"{golden} rewritten: review its diff and commit it, then run again without W2W_UPDATE_GOLDEN")
    assert script == expected


@pytest.mark.parametrize(("gpu", "gpus"), [("h100", 2), ("cpu", 0)])
def test_local_executor_is_given_a_gpu_per_shard(tmp_path, gpu, gpus):
    """submitit's LocalExecutor hides every GPU it is not given: a GPU cell gets `shards` of them."""
    job = make_plan([f"gpu={gpu}", "shards=2", "cluster=local"]).jobs[0]
    executor = make_executor(job, tmp_path)
    assert executor.parameters["gpus_per_node"] == gpus
    assert executor.parameters["tasks_per_node"] == 2


def test_planning_imports_neither_torch_nor_fairscale(paper_datasets, tmp_path):
    code = ("import sys; from w2w.launch.sweep import main; "
            f"main(['--plan', '+experiment=paper_all', 'sweep_dir={tmp_path}']); "
            "print(sorted(m for m in ('torch', 'fairscale', 'transformers', 'datasets') if m in sys.modules))")
    # No checkpoint folders to read; local prompt files, snapshotted without the datasets library.
    env = {k: v for k, v in os.environ.items() if not k.startswith("W2W_")} | paper_datasets
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert "8 job(s)" in result.stdout and result.stdout.splitlines()[-1] == "[]", result.stdout[-2000:]


def test_the_planners_bytes_per_value_are_torchs():
    from w2w.config import PRECISIONS
    from w2w.model import DTYPES
    from w2w.shapes import PRECISION_BYTES

    assert {name: DTYPES[name].itemsize for name in PRECISIONS} == PRECISION_BYTES
