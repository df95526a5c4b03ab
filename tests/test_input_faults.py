"""Issue 18, inputs: silent results, late failures, tracebacks, misleading messages and slow errors, one test each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from w2w.analysis import pareto
from w2w.analysis.reduce import reduce_sweep, summary_notes, table_columns
from w2w.launch.plan import make_plan
from w2w.launch.submit import _controller_stdio, load_manifest, record_plan, save_manifest

from tests.conftest import ROOT, cli, spawn
from tests.test_bookkeeping_errors import FAST, _one_line_error
from w2w.config import compose_cell
from w2w.data import check_unchanged
from w2w.errors import ConfigError
from w2w.exits import EXIT_BROKEN_PIPE
from w2w.files import write_json
from w2w.records import record_path

ROWS = ROOT / "tests" / "data" / "gsm8k_rows.jsonl"


def _record(cid: str, status: str = "ok", seed: int = 1, energy_j: float | None = 100.0, truncated: int = 0,
            total_s: float = 10.0) -> dict:
    """One rank's record of a one-GPU cell, as the runner writes it (constructed)."""
    return {"schema": 1, "cell_id": cid, "rank": 0, "world_size": 1, "node": "n1", "status": status,
            "error": None if status == "ok" else "boom",
            "params": {"model": "tiny", "gpu": "h100", "dataset": "gsm8k", "shards": 1, "precision": "fp16",
                       "batch_size": 4, "max_gen_len": 8, "power_cap_w": None, "seed": seed},
            "config": {"seed": seed, "batch_size": 4},
            "counts": {"responses": 40, "output_tokens": 800, "output_words": 500, "truncated_prompts": truncated},
            "times": {"total_s": total_s},
            "energy": {"gpu_j": energy_j, "source": "nvml_counter" if energy_j else "none", "reason": None}}


def _write(sweep: Path, *records: dict) -> Path:
    for r in records:
        write_json(record_path(sweep, r["cell_id"], r["rank"]), r)
    return sweep


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=None if env is None else os.environ | env, timeout=300)


# -- silent results -----------------------------------------------------------------------------------------------


def test_fewshot_edit_changes_cell_id(tmp_path):
    shots = tmp_path / "shots.jsonl"
    shots.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n")
    options = ["dataset=gsm8k", f"dataset.path={ROWS}", "dataset.fewshot_k=1", f"dataset.fewshot_path={shots}"]
    before = compose_cell(options)
    assert before.dataset.fewshot_sha256 is not None
    shots.write_text(json.dumps({"question": "2+2?", "answer": "2+2=4\n#### 4"}) + "\n")
    with pytest.raises(ConfigError, match=r"fewshot_path=.* was edited after the sweep was planned: re-run w2w-sweep"):
        check_unchanged(before.dataset)  # the node refuses to file new shots' results under the old id
    after = compose_cell(options)
    assert after.id != before.id
    # Without shots nothing is hashed: such cells keep their ids (test_config pins them).
    assert compose_cell(["dataset=gsm8k", f"dataset.path={ROWS}"]).dataset.fewshot_sha256 is None
    assert compose_cell([]).id == "fd01e176789c"


def test_cut_prompts_counted(tmp_path):
    _write(tmp_path, _record("cut", truncated=3), _record("whole", seed=2))
    table = reduce_sweep(tmp_path).set_index("cell_id")
    assert table.loc["cut", "truncated_prompts"] == 3 and table.loc["whole", "truncated_prompts"] == 0
    assert "truncated_prompts" in table_columns(reduce_sweep(tmp_path))
    notes = [n for n in summary_notes(reduce_sweep(tmp_path)) if "dataset.max_prompt_tokens" in n]
    assert notes == ["cell cut: 3 of 40 prompts cut to dataset.max_prompt_tokens (BOS and the last N-1 tokens "
                     "kept): its numbers are for the cut prompts"]
    out = cli("w2w.analysis.report", str(tmp_path)).stdout
    assert notes[0] in out
    assert notes[0] in (tmp_path / "results" / "paper" / "report.md").read_text()


def test_no_cut_no_column(tmp_path):
    _write(tmp_path, _record("whole"))
    assert "truncated_prompts" not in table_columns(reduce_sweep(tmp_path))


def test_recommendation_shows_the_axis_its_winner_and_runner_up_differ_in(tmp_path):
    _write(tmp_path, _record("s1", seed=1, energy_j=100.0), _record("s2", seed=2, energy_j=110.0))
    rec = pareto.recommend(reduce_sweep(tmp_path), pareto.Target())
    best, runner_up = rec.lines[1], rec.lines[2]
    assert "seed=1" in best and "seed=2" in runner_up, rec.lines


# -- late failures: --plan knows what the node will know -------------------------------------------------------------


def test_plan_rejects_missing_fewshot_file(tmp_path):
    line = _one_line_error(cli("w2w.launch.sweep", "--plan", "dataset=gsm8k", f"dataset.path={ROWS}",
                               "dataset.num_prompts=2", "dataset.fewshot_k=2", f"dataset.fewshot_path={tmp_path}/none.jsonl", check=False),
                           "w2w-sweep")
    assert f"dataset.fewshot_path={tmp_path}/none.jsonl: no such file" in line


def test_plan_rejects_unparsable_fewshot_file(tmp_path):
    shots = tmp_path / "shots.jsonl"
    shots.write_text('{"question": "a?", "answer": "#### 1"}\n{"question": \n')
    with pytest.raises(ConfigError, match=r"fewshot_path=.*: line 2 is not JSON .*: fix or remove that line"):
        make_plan(["dataset=gsm8k", f"dataset.path={ROWS}", "dataset.num_prompts=2", "dataset.fewshot_k=1",
                   f"dataset.fewshot_path={shots}"])


def test_plan_rejects_integer_gsm8k_answer(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "a?", "answer": "#### 1"}\n{"question": "b?", "answer": 42}\n')
    with pytest.raises(ConfigError, match=r"line 2 has field 'answer' 42, a int, not text: write it as text, "
                                          r"e.g. \"#### 42\""):
        make_plan(["dataset=gsm8k", f"dataset.path={rows}", "dataset.num_prompts=1"])
    shots = tmp_path / "shots.jsonl"
    shots.write_text('{"question": "a?", "answer": 7}\n')
    with pytest.raises(ConfigError, match=r"fewshot_path=.*shot 1 has field 'answer' 7, a int, not text"):
        make_plan(["dataset=gsm8k", f"dataset.path={ROWS}", "dataset.num_prompts=2", "dataset.fewshot_k=1",
                   f"dataset.fewshot_path={shots}"])


@pytest.mark.parametrize(("options", "message"), [
    (["model.n_heads=3"], r"model.n_heads=3 does not divide model.dim=64: .*choose n_heads from \[1, 2, 4, 8, 16, 32, 64\]"),
    (["model.dim=40", "model.n_heads=8"], r"model.dim=40 / model.n_heads=8 = 5 values per head, which rotary "
                                          r"embeddings need even"),
    (["model.n_heads=4", "model.n_kv_heads=3"], r"model.n_kv_heads=3 does not divide model.n_heads=4"),
    (["model.vocab_size=511", "shards=2"], r"shards=2 does not divide model.vocab_size=511"),
    (["model.n_layers=0"], r"model.n_layers=0: must be >= 1"),
])
def test_plan_rejects_shapes_the_node_cannot_build(options, message):
    with pytest.raises(ConfigError, match=message):
        make_plan([*FAST, *options])


def test_plan_rejects_heads_not_dividing_dim_in_one_line():
    line = _one_line_error(cli("w2w.launch.sweep", "--plan", *FAST, "model.n_heads=3", check=False), "w2w-sweep")
    assert "model.n_heads=3 does not divide model.dim=64" in line


def test_uncached_hub_dataset_offline_fails_at_plan_time_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ConfigError, match=r"dataset.path=openai/gsm8k is a Hugging Face hub name but "
                                          r"HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set and the datasets cache .* has "
                                          r"no copy: give a local copy"):
        make_plan(["dataset=gsm8k"])
    line = _one_line_error(cli("w2w.run_cli", "dataset=gsm8k", f"sweep_dir={tmp_path}/s", check=False), "w2w-run")
    assert "has no copy" in line
    # A prepared copy (as datasets files it) or a hub download is enough.
    (tmp_path / "hf" / "datasets" / "openai___gsm8k" / "main" / "0.0.0" / "abc").mkdir(parents=True)
    assert len(make_plan(["dataset=gsm8k"]).cells) == 1


# -- tracebacks ----------------------------------------------------------------------------------------------------


def test_report_with_no_ok_cell_says_so(tmp_path):
    _write(tmp_path, _record("failed", status="error"))
    result = cli("w2w.analysis.report", str(tmp_path), check=False)
    line = _one_line_error(result, "w2w-report")
    assert result.returncode == 1  # unfinished work, not bad input
    assert line == (f"w2w-report: error: {tmp_path} has no ok cell yet (cell records: 1 error): a report needs at "
                    f"least one finished cell; see why with: w2w-reduce {tmp_path}, and run w2w-report again once "
                    "a cell is done")


def test_report_on_a_sweep_whose_job_wrote_no_cell_is_not_called_not_a_run(tmp_path):
    plan = make_plan([*FAST, f"sweep_dir={tmp_path}"])  # planned, its one job failed before writing a cell
    save_manifest(record_plan(load_manifest(tmp_path), plan, FAST), tmp_path)
    line = _one_line_error(cli("w2w.analysis.report", str(tmp_path), check=False), "w2w-report")
    assert "has no ok cell yet (cell records: none)" in line and f"w2w-status {tmp_path}" in line
    assert "of a run" not in line


@pytest.mark.parametrize("module", ["w2w.analysis.reduce", "w2w.analysis.report"])
def test_results_folder_that_cannot_be_written_is_one_line(tmp_path, module):
    _write(tmp_path, _record("ok"))
    (tmp_path / "results").write_text("a file where the results folder goes")
    result = cli(module, str(tmp_path), check=False)
    line = _one_line_error(result, module.replace("w2w.analysis.", "w2w-"))
    assert result.returncode == 2 and f"{tmp_path / 'results'} is a file, not a folder" in line


def test_run_with_a_file_as_sweep_dir_is_one_line_before_torch(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    line = _one_line_error(cli("w2w.run_cli", *FAST, f"sweep_dir={target}", check=False), "w2w-run")
    assert line == (f"w2w-run: error: sweep_dir={target}: {target} is a file, not a folder: give sweep_dir= a "
                    "folder you can write")


def test_malformed_site_yaml_is_one_line(tmp_path):
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "mysite.yaml").write_text("name: mysite\nbackend: [slurm\n")
    for module, prog in (("w2w.launch.sweep", "w2w-sweep"), ("w2w.run_cli", "w2w-run")):
        args = ["--plan"] if module == "w2w.launch.sweep" else []
        line = _one_line_error(cli(module, *args, "--config-dir", str(tmp_path), "cluster=mysite", check=False), prog)
        assert f"{tmp_path}/cluster/mysite.yaml line 3 column 1: not valid YAML" in line


def _closed_reader(args: list[str]) -> subprocess.CompletedProcess:
    """Run a command whose stdout is a pipe nobody reads: the reader is gone before the first write."""
    proc = spawn([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    return subprocess.CompletedProcess(args, proc.wait(timeout=300), "", err)


def test_broken_pipe_exits_quietly(tmp_path):
    _write(tmp_path, _record("ok"))
    for args in (["w2w.launch.sweep", "--plan", *FAST, "batch_size=range(1,50)"],
                 ["w2w.analysis.reduce", str(tmp_path)]):
        result = _closed_reader(args)
        assert result.stderr == "" and result.returncode == EXIT_BROKEN_PIPE, (args, result.stderr)


def test_a_local_controller_holds_none_of_w2w_sweeps_stdio(tmp_path, capfd):
    """The local executor's controller inherits stdio while it starts: a Ctrl-C in --wait made it print
    submitit's KeyboardInterrupt after w2w-sweep's message, and (issue 28.1) holding stdout it kept a piped
    `w2w-sweep ... | tee log` waiting until the job ended. It now writes to the sweep's log, reads /dev/null."""
    log = tmp_path / "submitit" / "local-controllers.log"
    with _controller_stdio(log):
        child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stderr.write('controller says '); "
                                  "sys.stdout.write('and prints ' + repr(sys.stdin.read()))"])
    child.wait(timeout=60)
    print("w2w-sweep says", file=sys.stderr)
    out, err = capfd.readouterr()
    assert "controller says" not in err and "w2w-sweep says" in err and "prints" not in out
    assert "controller says" in log.read_text() and "and prints ''" in log.read_text()


# -- misleading messages --------------------------------------------------------------------------------------------


def test_empty_range_sweep_says_it_is_empty():
    line = _one_line_error(cli("w2w.launch.sweep", "--plan", "batch_size=range(4,2)", check=False), "w2w-sweep")
    assert line.startswith("w2w-sweep: error: batch_size=range(4,2): the sweep has no values")


def test_same_config_dir_twice_does_not_collide_with_itself(tmp_path, monkeypatch):
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "mysite.yaml").write_text("defaults:\n  - base_cluster\nname: mysite\n")
    monkeypatch.setenv("W2W_CONFIG_DIR", str(tmp_path))
    cell = compose_cell(["cluster=mysite"], config_dir=[f"{tmp_path}/"])  # also in W2W_CONFIG_DIR
    assert cell.cluster.name == "mysite"


def test_follow_with_hint_is_shell_quoted(tmp_path):
    sweep = tmp_path / "my sweep"
    (cell,) = make_plan([*FAST, f"sweep_dir={sweep}"]).cells  # done already: nothing is submitted
    _write(sweep, _record(cell.id) | {"cell_id": cell.id})
    out = cli("w2w.launch.sweep", *FAST, f"sweep_dir={sweep}").stdout
    assert "all cells done" in out and f"follow with: w2w-status '{sweep}'" in out


# -- slow errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "message"), [
    ("from w2w.run_cli import main; rc = main(['bogus_key=1'])", "w2w-run: error: unknown key 'bogus_key'"),
    ("from w2w.generate_cli import main; rc = main(['bogus_key=1', 'prompt=hi'])",
     "w2w-generate: error: unknown key 'bogus_key'"),
    ("from w2w.reshard_cli import main; rc = main(['/nonexistent', '/tmp/x', '--shards', '0'])",
     "w2w-reshard: error: --shards=0: must be >= 1"),
    ("from w2w.reshard_cli import main; rc = main(['/nonexistent', '/tmp/x', '--shards', '2'])",
     "w2w-reshard: error: SRC /nonexistent is not a folder"),
])
def test_bad_arguments_are_refused_before_torch_is_imported(call, message):
    result = _python(f"import sys\n{call}\nprint(rc, 'torch' in sys.modules, 'fairscale' in sys.modules)")
    assert result.stdout.split() == ["2", "False", "False"], result.stderr
    assert result.stderr.startswith(message) and "Traceback" not in result.stderr


def test_the_table_keeps_its_columns_for_old_records(tmp_path):
    """Records from before counts.truncated_prompts read as nothing cut (not as a missing value)."""
    record = _record("old")
    del record["counts"]["truncated_prompts"]
    _write(tmp_path, record)
    assert reduce_sweep(tmp_path).loc[0, "truncated_prompts"] == 0
    assert not pd.isna(reduce_sweep(tmp_path).loc[0, "truncated_prompts"])


@pytest.mark.parametrize(("shot", "what"), [
    ('{"question": "a?", "answer": null}', "field 'answer' null"),  # put 'None' into every prompt
    ('{"question": "a?"}', "field 'answer' missing"),  # was skipped silently: the next row became shot 1
    ('{"question": "", "answer": "#### 1"}', "field 'question' empty"),
    ('["a?", "#### 1"]', "is a JSON list"),
])
def test_a_fewshot_row_must_have_text_for_every_field_it_uses(tmp_path, shot, what):
    # Issue 28: a shot row with "answer": null or without answer must be a clear error naming it.
    shots = tmp_path / "shots.jsonl"
    shots.write_text(shot + '\n{"question": "b?", "answer": "#### 2"}\n')
    with pytest.raises(ConfigError, match=rf"fewshot_path=.*: shot 1 .*{what}"):
        make_plan(["dataset=gsm8k", f"dataset.path={ROWS}", "dataset.num_prompts=2", "dataset.fewshot_k=1",
                   f"dataset.fewshot_path={shots}"])
