"""The paper report from a real CPU sweep of the tiny model (fake-NVML energy), and corrupt or partial input."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from w2w.analysis import figures
from w2w.analysis.reduce import reduce_sweep

from tests.conftest import ROOT, cli

# Two shard counts (Figs 4-9's axis) x two batch sizes x two lengths.
GRID = ["shards=1,2", "precision=fp32", "batch_size=2,4", "max_gen_len=4,8", "dataset.num_prompts=4",
        "energy.idle_seconds=0.1", "energy.sample_interval_s=0.01", "energy.rapl=false"]
CELLS = 8
PNG = b"\x89PNG"


@pytest.fixture(scope="session")
def sweep(tmp_path_factory) -> Path:
    """w2w-sweep --wait on the local executor; every rank meters a fake GPU (tests/fake_site)."""
    path = tmp_path_factory.mktemp("paper") / "sweep"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("W2W_TEST_FAKE_NVML", "1")
        mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests" / "fake_site"), str(ROOT)]))
        out = cli("w2w.launch.sweep", "--wait", "--poll", "1", *GRID, f"sweep_dir={path}").stdout
    assert f"{CELLS} cells: {CELLS} done" in out
    return path


@pytest.fixture(scope="session")
def report(sweep) -> Path:
    out = cli("w2w.analysis.report", str(sweep)).stdout
    assert "files under" in out
    return sweep / "results" / "paper"


def test_every_table_and_figure_renders(report):
    for name in ("table2", "table3", "table4", "table5"):
        for suffix in (".md", ".csv", ".tex"):
            assert (report / "tables" / f"{name}{suffix}").stat().st_size > 0
    names = ["fig2", "fig3", *figures.FIGS_4_9]
    for name in names:
        assert (report / "figures" / f"{name}.png").read_bytes()[:4] == PNG
    timelines = sorted((report / "figures" / "timelines").glob("timeline_*.png"))
    assert len(timelines) == CELLS and all(p.read_bytes()[:4] == PNG for p in timelines)
    page = (report / "report.md").read_text()
    for name in names:
        assert f"](figures/{name}.png)" in page
    for name in ("Table II", "Table III", "Table IV", "Table V"):
        assert f"**{name}:" in page
    # Every cell ran engine=fast alone: the section says how to get the comparison.
    assert "## What the implementation costs" in page and "sweep with `engine=llama1,llama2,fast`" in page


def test_tables_hold_the_measured_values_and_say_what_stands_in(report):
    table2 = pd.read_csv(report / "tables" / "table2.csv")
    assert table2.to_dict("records") == [{"model": "tiny", "CPU GPUs": 1, "CPU max batch": 4}]
    table4 = pd.read_csv(report / "tables" / "table4.csv")
    # The fake GPUs report 40 % memory and 90 % SM utilization.
    assert list(table4["max len"]) == [4, 8]
    assert set(table4["max GPU memory util (%)"]) == {40.0} and set(table4["avg SM util (%)"]) == {90.0}
    text = (report / "tables" / "table4.md").read_text()
    assert "model = tiny: the paper's 65B is not in this sweep" in text
    table3 = (report / "tables" / "table3.md").read_text()  # no caps on a CPU: the layout, empty, and why
    assert "| max len | time @175W | time @150W |" in table3 and "no power-capped cell ran" in table3


def test_comparison_has_every_published_number_and_invents_none(report):
    compared = pd.read_csv(report / "comparison.csv", keep_default_na=False)
    counts = compared["artifact"].value_counts().to_dict()
    assert counts == {"Setup": 3, "Table II": 12, "Table III": 18, "Table IV": 8, "Table V": 6, "Finding": 8,
                      "McDonald et al. 2022": 6}
    assert (compared["paper"] != "").all()
    # Nothing of the tiny model is in the paper's configuration: no number of ours, no ratio, a reason.
    published = compared[compared["artifact"] != "Setup"]
    assert (published["ours"] == "").all() and (published["ratio"] == "").all()
    assert published["note"].str.contains("not measured in this sweep").all()
    setup = compared[compared["artifact"] == "Setup"].set_index("quantity")
    assert setup.loc["temperature", "ours"] == "0.8" and setup.loc["temperature", "ratio"] == "1"
    assert setup.loc["prompts per dataset", "ours"] == "4"


def test_energy_by_the_papers_convention_beside_all_gpus(report):
    energy = pd.read_csv(report / "energy_conventions.csv")
    assert len(energy) == CELLS and (energy["energy, all GPUs (J)"] > 0).all()
    # One node: the rank-0 node x 1 node is every GPU.
    assert energy["paper / all GPUs"].tolist() == pytest.approx([1.0] * CELLS)


def _two_rank_cells(sweep: Path) -> list[Path]:
    return [c for c in sorted((sweep / "cells").iterdir()) if (c / "rank-00001.json").is_file()]


def test_corrupt_and_partial_input_is_reported_by_file_and_cell(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep / "cells", copy / "cells")
    torn, edited, gap, garbled = _two_rank_cells(copy)
    record = torn / "rank-00001.json"
    record.write_bytes(record.read_bytes()[:200])
    text = (edited / "rank-00000.json").read_text()
    (edited / "rank-00000.json").write_text(text.replace('"output_tokens": ', '"output_tokens": "many", "was": '))
    (gap / "rank-00001.json").unlink()
    (garbled / "rank-00000.timeline.parquet").write_bytes(b"PAR1 not a parquet file")

    table = reduce_sweep(copy).set_index("cell_id")
    assert len(table) == CELLS  # nothing dropped
    notes = {cell.name: table.loc[cell.name, "note"] for cell in (torn, edited, gap, garbled)}
    for cell in (torn, edited, gap, garbled):
        assert table.loc[cell.name, "status"] == "incomplete"
    assert f"{torn.name}/rank-00001.json: unreadable record" in notes[torn.name]
    assert f"{edited.name}/rank-00000.json: field 'counts.output_tokens' is 'many'" in notes[edited.name]
    assert "missing rank(s) [1] of 2" in notes[gap.name]
    assert f"{garbled.name}/rank-00000.timeline.parquet: unreadable timeline" in notes[garbled.name]
    assert (table["status"] == "ok").sum() == CELLS - 4
    # The report still renders, and says which cells it left out.
    out = cli("w2w.analysis.report", str(copy)).stdout
    assert f"cell {garbled.name}: incomplete:" in out and "unreadable timeline" in out
    assert len(list((copy / "results" / "paper" / "figures" / "timelines").glob("*.png"))) == CELLS - 4


def _cell(engine: str, batch: int, tokens_per_s: float, j_per_token: float | None, status: str = "ok") -> dict:
    return {"cell_id": f"{engine}{batch}{status}", "model": "llama_7b", "gpu": "h100", "dataset": "gsm8k",
            "shards": 1, "precision": "fp16", "engine": engine, "batch_size": batch, "max_gen_len": 128,
            "power_cap_w": None, "status": status, "tokens_per_s": tokens_per_s, "energy_per_token_j": j_per_token}


def test_implementation_costs_pair_the_engines_of_each_setting():
    from w2w.analysis.report import _costs_section, implementation_costs

    cells = pd.DataFrame([
        _cell("llama1", 1, 10.0, 60.0), _cell("llama2", 1, 20.0, 30.0), _cell("fast", 1, 80.0, 6.0),  # all: a row
        _cell("llama2", 64, 1000.0, None), _cell("fast", 64, 4000.0, None),  # no meter, no llama1: a row
        _cell("fast", 16, 900.0, 1.0),  # fast only: nothing to compare
        _cell("llama2", 32, 10.0, 1.0, status="oom"), _cell("fast", 32, 900.0, 1.0),  # llama2 failed
    ])
    costs = implementation_costs(cells).set_index("batch_size")
    assert list(costs.index) == ["1", "64"]
    one = costs.loc["1"]
    assert (one["llama2 tokens/s"], one["fast tokens/s"], one["fast / llama2 tokens/s"]) == (20.0, 80.0, 4.0)
    assert (one["llama2 J/token"], one["fast J/token"], one["fast / llama2 J/token"]) == (30.0, 6.0, 0.2)
    assert (one["llama1 tokens/s"], one["fast / llama1 tokens/s"], one["fast / llama1 J/token"]) == (10.0, 8.0, 0.1)
    assert one["power_cap_w"] == "the GPU's own limit"
    wide = costs.loc["64"]
    assert wide["fast / llama2 tokens/s"] == 4.0
    assert all(pd.isna(wide[c]) for c in ("llama1 tokens/s", "llama2 J/token", "fast J/token", "fast / llama2 J/token"))
    section = _costs_section(implementation_costs(cells))
    assert "## What the implementation costs" in section and "| 4 |" in section
    fast_only = implementation_costs(cells[cells["engine"] == "fast"])
    assert "sweep with `engine=llama1,llama2,fast`" in _costs_section(fast_only)
