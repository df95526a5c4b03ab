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
from w2w.engines import ENGINES
from w2w.files import write_json
from w2w.records import record_path

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
    # The page says which energy per token each table and figure uses.
    assert "is energy_per_token_j: per returned token (after the EOS cut)" in page
    # Every cell ran engine=fast alone: the section says how to get the comparison.
    assert "## What the implementation costs" in page and f"sweep with `engine={','.join(ENGINES)}`" in page


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
    # The first "output_tokens" in the sorted file is its first batch's: batches are typed too.
    assert f"{edited.name}/rank-00000.json: field 'batches[0].counts.output_tokens' is 'many'" in notes[edited.name]
    assert "missing rank(s) [1] of 2" in notes[gap.name]
    assert f"{garbled.name}/rank-00000.timeline.parquet: unreadable timeline" in notes[garbled.name]
    assert (table["status"] == "ok").sum() == CELLS - 4
    # The report still renders, and says which cells it left out.
    out = cli("w2w.analysis.report", str(copy)).stdout
    assert f"cell {garbled.name}: incomplete:" in out and "unreadable timeline" in out
    assert len(list((copy / "results" / "paper" / "figures" / "timelines").glob("*.png"))) == CELLS - 4


def _record(engine: str, batch: int, seconds: float, energy_j: float | None, positions: int | None,
            status: str = "ok") -> dict:
    """One rank's record of a cell that returned 800 tokens: what the runner writes, constructed."""
    counts = {"responses": 40, "output_tokens": 800, "output_words": 500} | ({"positions": positions} if positions else {})
    return {"schema": 1, "cell_id": f"{engine}{batch}{status}", "rank": 0, "world_size": 1, "node": "n1",
            "status": status, "params": {"model": "llama_7b", "gpu": "h100", "dataset": "gsm8k", "shards": 1,
                                         "precision": "fp16", "engine": engine, "batch_size": batch,
                                         "max_gen_len": 128, "power_cap_w": None},
            "counts": counts, "times": {"total_s": seconds},
            "energy": {"gpu_j": energy_j, "source": "nvml_counter" if energy_j else "none", "reason": None}}


def test_implementation_costs_show_every_engine_of_each_setting(tmp_path):
    from w2w.analysis.page import costs_section, implementation_costs

    first, second, *rest = ENGINES  # whatever the registry names: the table follows it
    records = [
        *(_record(e, 1, 10.0 * (i + 1), 400.0 * (i + 1), 1600 * (i + 1)) for i, e in enumerate(ENGINES)),  # all
        _record(first, 64, 1.0, None, 9000), _record(second, 64, 4.0, None, 9000),  # no meter: no J
        _record(first, 16, 2.0, 100.0, 4000),  # one engine: nothing to compare
        _record(first, 32, 2.0, 100.0, 4000, status="oom"), _record(second, 32, 2.0, 100.0, 4000),  # one ok
        _record(first, 8, 2.0, 100.0, None), _record(second, 8, 4.0, 100.0, 800),  # older record: no positions
    ]
    for record in records:
        write_json(record_path(tmp_path, record["cell_id"], 0), record)
    costs = implementation_costs(reduce_sweep(tmp_path)).set_index("batch_size")
    assert list(costs.index) == ["1", "8", "64"]
    assert list(costs.columns[-3 * len(ENGINES):]) == [f"{e} {q}" for e in ENGINES
                                                       for q in ("tokens/s", "J/token", "J/position")]
    one = costs.loc["1"]
    for i, engine in enumerate(ENGINES):
        assert one[f"{engine} tokens/s"] == pytest.approx(800 / (10.0 * (i + 1)))
        assert one[f"{engine} J/token"] == pytest.approx(400.0 * (i + 1) / 800)  # per returned token
        assert one[f"{engine} J/position"] == pytest.approx(0.25)  # per computed position
    assert one["power_cap_w"] == "the GPU's own limit"
    wide = costs.loc["64"]
    assert wide[f"{second} tokens/s"] == 200.0
    assert all(pd.isna(wide[f"{e} {q}"]) for e in ENGINES for q in ("J/token", "J/position"))
    assert all(pd.isna(wide[f"{e} tokens/s"]) for e in rest)  # not run under the others: empty
    old = costs.loc["8"]
    assert old[f"{first} J/token"] == pytest.approx(100 / 800) and pd.isna(old[f"{first} J/position"])
    assert old[f"{second} J/position"] == pytest.approx(100 / 800)
    section = "\n".join(costs_section(costs.reset_index()))
    assert "## What the implementation costs" in section and "J/position is per computed position" in section
    assert all(f"`{e}`" in section for e in ENGINES)
    alone = implementation_costs(reduce_sweep(tmp_path).query(f"engine == '{first}'"))
    assert f"sweep with `engine={','.join(ENGINES)}`" in "\n".join(costs_section(alone))
