"""Every make target runs in a test, in a tiny mode where the real one is long: none ships broken."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, kill_group, spawn
from w2w.tokenizer import TINY_TOKENIZER

# Targets no test runs, and why. Any other target a test does not run (itself or as a prerequisite of
# one it runs) fails test_every_make_target_is_run_by_a_test.
NOT_RUN = {
    "test": "the suite itself: CI runs it (.ci/run)",
    "slurm-up": "needs root and starts the machine's SLURM; conftest.local_slurm runs its script in CI",
    "slurm-down": "stops the machine's SLURM, which other runs may be using",
}
TINY_SWEEP = "shards=1 precision=fp32 batch_size=2 max_gen_len=4 dataset.num_prompts=2 energy.idle_seconds=0"


def make(target: str, *variables: str, directory: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """`make target` in this checkout with this interpreter's venv (the test runs inside it): stdout and
    stderr together."""
    command = ["make", "--no-print-directory", "-C", str(directory), target, f"VENV={sys.prefix}",
               f"BENCH_PY={sys.executable}", *variables]
    proc = spawn(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    print(out)
    return subprocess.CompletedProcess(command, proc.returncode, out, "")


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Traceback" not in result.stdout, result.stdout[-4000:]
    return result.stdout


def _rules(makefile: str) -> tuple[list[str], dict[str, list[str]]]:
    """The .PHONY targets, and each rule's prerequisites."""
    text = makefile.replace("\\\n", " ")
    phony = [name for line in re.findall(r"^\.PHONY:(.*)$", text, re.M) for name in line.split()]
    prerequisites: dict[str, list[str]] = {}
    for targets, deps in re.findall(r"^(\w[\w .-]*):(?!=)(.*)$", text, re.M):
        for target in targets.split():
            prerequisites.setdefault(target, []).extend(deps.split())
    return phony, prerequisites


def test_every_make_target_is_run_by_a_test():
    phony, prerequisites = _rules((ROOT / "Makefile").read_text())
    source = "".join(path.read_text() for path in sorted((ROOT / "tests").glob("*.py")))
    run = set(re.findall(r"\bmake\(\s*\"([\w-]+)\"", source))
    run |= {name for name in re.findall(r"PAPER_TARGETS = \(([^)]*)\)", source)[0].replace('"', "").split(", ")}
    covered, todo = set(), list(run)
    while todo:  # a target runs its prerequisites too (bench its four parts, most an install)
        name = todo.pop()
        if name not in covered:
            covered.add(name)
            todo += prerequisites.get(name, [])
    missing = [name for name in phony if name not in covered and name not in NOT_RUN]
    assert not missing, f"make targets no test runs: {missing}; run each in a test (tiny mode) or say why in NOT_RUN"
    assert set(NOT_RUN) <= set(phony), "NOT_RUN names a target the Makefile no longer has"


def test_the_guard_reads_targets_and_prerequisites():
    phony, prerequisites = _rules(".PHONY: a b\n.PHONY: c\nX ?= 1\na: b \\\n  c\nb c: install\n\tcmd: not a rule\n")
    assert phony == ["a", "b", "c"]
    assert prerequisites == {"a": ["b", "c"], "b": ["install"], "c": ["install"]}


@pytest.mark.slow
def test_bench_runs_its_four_parts_in_a_tiny_mode():
    out = _ok(make("bench", "BENCH_LAUNCHES_ARGS=--kv-heads 4 --dtype fp32",
                   "BENCH_DECODE_ARGS=--dim 64 --layers 1 --heads 2 --ffn 256 --vocab 128 --prompt-len 4 "
                   "--new-tokens 2 --batches 1 --repeats 1 --copy-mb 1",
                   "BENCH_REDUCE_ARGS=--cells 1 --ranks 1 --minutes 0.01",
                   "BENCH_PLAN_ARGS=--sample 1 --repeats 1"))
    assert "w2w.bench.launches --kv-heads 4" in out  # launches: its output is its own (loose on purpose)
    assert "min ratio " in out and "x vs transformers" in out  # decode
    assert "1 cells x 1 ranks" in out and "1/1 cells ok" in out and "target: the whole reduction" in out  # reduce
    assert "composition per paper_all cell" in out and "w2w-sweep --help: " in out  # plan


@pytest.mark.slow
def test_bench_gpu_dry_runs_on_the_cpu():
    out = _ok(make("bench-gpu", "BENCH_GPU_ARGS=--device cpu --tiny --batches 1 --prompt-len 8 --new-tokens 4 "
                   "--repeats 1 --copy-mb 8"))
    assert "batch 1: transformers " in out


@pytest.mark.slow
def test_demo_then_paper_report_on_its_sweep(tmp_path):
    sweep = tmp_path / "demo"
    out = _ok(make("demo", f"SWEEP={sweep}", f"DEMO_GRID={TINY_SWEEP}"))
    assert "1 cells: 1 done" in out or "1 cell(s)" in out, out
    assert list(sweep.glob("results/*"))  # w2w-reduce wrote its tables
    report = make("paper-report", f"SWEEP={sweep}")
    assert "Traceback" not in report.stdout, report.stdout
    assert report.returncode == 0 or "w2w-report: " in report.stdout  # a report, or a one-line refusal


@pytest.mark.slow
def test_gpu_accept_dry_runs_every_step_on_the_cpu(tmp_path):
    result = make("gpu-accept", f"GPU_ACCEPT_ARGS=--device cpu --out {tmp_path}")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert result.returncode == summary["exit_code"], result.stdout[-4000:]  # the summary says how it ended
    assert result.returncode == 0 and summary["status"] == "met" and summary["dry_run"], result.stdout[-4000:]


def test_gpu_check_without_a_gpu_says_so_in_a_line():
    result = make("gpu-check")
    assert "Traceback" not in result.stdout, result.stdout
    if not torch.cuda.is_available():
        assert result.returncode != 0 and "gpu-check" in result.stdout


def test_tiny_tokenizer_rebuilds_the_bundled_one(tmp_path):
    out = tmp_path / "tiny.model"
    assert str(out) in _ok(make("tiny-tokenizer", f"TINY_TOKENIZER_OUT={out}"))
    assert out.read_bytes() == TINY_TOKENIZER.read_bytes()  # the recipe still makes the committed file


@pytest.mark.slow
def test_lint_passes():
    _ok(make("lint"))


PAPER_TARGETS = ("paper", "paper-fig2", "paper-fig3", "paper-fig4-9", "paper-table3", "paper-table4-5")


@pytest.mark.parametrize("target", PAPER_TARGETS)
def test_paper_targets_plan_their_sweep(target, tmp_path, monkeypatch, paper_datasets):
    for name, value in paper_datasets.items():  # W2W_ALPACA, W2W_GSM8K: local copies, planned offline
        monkeypatch.setenv(name, value)
    out = _ok(make(target, "PAPER_ARGS=--plan", f"PAPER_RUNS={tmp_path}"))
    assert f"sweep_dir={tmp_path}/paper_" in out and " cell" in out
    # --plan submits nothing: it writes only the prompts' snapshots into the sweep
    assert {path.name for path in tmp_path.glob("*/*")} == {"prompts"}


def test_slurm_status_reports_the_local_slurm():
    result = make("slurm-status")
    script = subprocess.run(["bash", str(ROOT / "launch" / "slurm_local.sh"), "status"], capture_output=True)
    assert result.returncode == (0 if script.returncode == 0 else 2), result.stdout  # make's 2: the recipe failed


def test_clean_removes_what_runs_leave(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path)
    for left in ("runs/demo", ".pytest_cache", ".ruff_cache"):
        (tmp_path / left).mkdir(parents=True)
    kept = tmp_path / "w2w"
    kept.mkdir()
    _ok(make("clean", directory=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Makefile", "w2w"]


@pytest.mark.slow
def test_make_serving_runs_a_cpu_serving_sweep_and_prints_its_frontier_table(tmp_path):
    out = _ok(make("serving", f"SERVING_SWEEP={tmp_path / 'serving'}",
                   "SERVING_GRID=scenario=serving precision=fp32 greedy=true max_gen_len=4 dataset.num_prompts=4 "
                   "serving.rate=50,inf serving.max_slots=2 energy.idle_seconds=0"))
    assert "## Serving: time-energy frontier" in out and out.count("| r=") == 2, out
    assert "Cheapest configuration meeting each p90 ITL target" in out
