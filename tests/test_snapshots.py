"""Prompt snapshots: w2w-sweep writes each cell's prompts into the sweep, and its jobs read only them."""

from __future__ import annotations

import dataclasses
import json

import pytest
from w2w.launch import sweep
from w2w.launch.plan import make_plan, with_snapshots

from tests.conftest import write_paper_datasets
from w2w.config import compose_cell
from w2w.data import SNAPSHOTS, load_prompt_rows, snapshot_dataset
from w2w.errors import ConfigError
from w2w.records import read_record, record_path


def _gsm8k(tmp_path, rows: int = 8) -> str:
    return write_paper_datasets(tmp_path / "data", rows)["W2W_GSM8K"]


def test_a_snapshot_holds_the_prompts_the_cell_runs_named_by_their_hash(tmp_path):
    cell = compose_cell(["dataset=gsm8k", f"dataset.path={_gsm8k(tmp_path)}", "dataset.num_prompts=5"])
    owned = snapshot_dataset(cell.dataset, tmp_path / "sweep")
    (path,) = (tmp_path / "sweep" / SNAPSHOTS).iterdir()
    assert owned.snapshot == str(path) and path.name.startswith("gsm8k-")
    assert load_prompt_rows(owned) == load_prompt_rows(cell.dataset)  # the same rows, text and references
    assert owned.content_sha256 == cell.dataset.content_sha256  # a local file's id keeps the file's hash
    assert dataclasses.replace(cell, dataset=owned).id == cell.id  # where the snapshot lies is not the cell
    assert snapshot_dataset(cell.dataset, tmp_path / "sweep") == owned  # re-planning writes nothing new


def test_an_edited_or_missing_snapshot_is_refused(tmp_path):
    cell = compose_cell(["dataset=gsm8k", f"dataset.path={_gsm8k(tmp_path)}", "dataset.num_prompts=5"])
    owned = snapshot_dataset(cell.dataset, tmp_path / "sweep")
    path = tmp_path / "sweep" / SNAPSHOTS / owned.snapshot.rsplit("/", 1)[1]
    rows = path.read_text().splitlines()
    path.write_text("\n".join([json.dumps({"id": 0, "text": "edited", "reference": None}), *rows[1:]]) + "\n")
    with pytest.raises(ConfigError, match=r"snapshot .* was edited after the sweep was planned: delete it"):
        load_prompt_rows(owned)
    path.unlink()
    with pytest.raises(ConfigError, match=r"snapshot .* is gone: re-run w2w-sweep"):
        load_prompt_rows(owned)


def test_synthetic_prompts_need_no_snapshot(tmp_path):
    cell = compose_cell(["dataset=synthetic"])
    assert snapshot_dataset(cell.dataset, tmp_path) is cell.dataset and not (tmp_path / SNAPSHOTS).exists()


def test_jobs_run_from_the_snapshot_alone_offline_with_an_empty_home(tmp_path, monkeypatch, capsys):
    """Planned where the prompt file is; run where it is not, with no network and an empty home: a
    compute node's view. Two llama1 cells record Meta's cache shape (batch, model.max_seq_len, heads,
    head_dim)."""
    data = _gsm8k(tmp_path)
    sweep_dir = tmp_path / "sweep"
    overrides = ["engine=llama1", "precision=fp32", "batch_size=2,4", "max_gen_len=4", "dataset=gsm8k", f"dataset.path={data}",
                 "dataset.num_prompts=4", f"sweep_dir={sweep_dir}"]
    plan = with_snapshots(make_plan(overrides), sweep_dir)
    (tmp_path / "data" / "gsm8k.jsonl").unlink()  # the node cannot see the login node's files
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    ids = [c.id for c in plan.cells]
    assert sweep.submit(plan, sweep_dir, overrides) == 0
    assert sweep.wait(sweep_dir, 0.5, ids) == 0, capsys.readouterr().out[-3000:]
    assert list(home.iterdir()) == []  # nothing was written under the home folder
    model = plan.cells[0].cell.model
    for planned in plan.cells:
        record = read_record(record_path(sweep_dir, planned.id, 0))
        assert record.ok
        assert record.kv_cache_shape == [planned.cell.batch_size, model.max_seq_len, model.n_heads,
                                         model.dim // model.n_heads]
        assert record.kv_cache_bytes == 2 * model.n_layers * 4 * planned.cell.batch_size * model.max_seq_len * model.dim
