"""Table III (and Table II) on constructed records: the % changes, the base cap, repeats, the comparison."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from w2w.analysis import paper, tables
from w2w.analysis.compare import comparison, read_facts
from w2w.analysis.page import read_skipped
from w2w.analysis.reduce import reduce_sweep

from w2w.files import write_json
from w2w.records import record_path

BASE_S, BASE_RATE, BASE_J = 1000.0, 500.0, 800_000.0  # at 250 W: run time, tokens/s, energy of all 4 GPUs


def _write_cell(sweep, cid: str, length: int, cap: float | None, total_s: float, tokens: int, energy_j: float,
                gpu: str = "a100", shards: int = 4, telemetry: dict | None = None, engine: str = "llama1") -> None:
    """One node of `shards` GPUs (the paper's 4 A100s by default); every GPU draws an equal share."""
    for rank in range(shards):
        write_json(record_path(sweep, cid, rank), {
            "schema": 1, "cell_id": cid, "rank": rank, "local_rank": rank, "world_size": shards, "node": "a1",
            "status": "ok", "device": f"cuda:{rank}",
            "params": {"model": "llama_65b", "gpu": gpu, "dataset": "gsm8k", "shards": shards, "precision": "fp16", "engine": engine,
                       "batch_size": 64, "max_gen_len": length, "power_cap_w": cap, "num_prompts": 4096,
                       "temperature": 0.8, "top_p": 0.95},
            "counts": {"responses": 4096, "output_tokens": tokens, "output_words": tokens // 2},
            "times": {"total_s": total_s},
            "energy": {"gpu_j": energy_j / shards, "source": "nvml_counter"},
            "telemetry": telemetry or {},
            "gpu": {"gpu_name": f"NVIDIA {gpu.upper()}"},
        })


def _papers_table3(sweep) -> None:
    """Cells whose time, energy and token rate change exactly as the paper's Table III says."""
    for length, changes in paper.TABLE3.items():
        _write_cell(sweep, f"b{length}", length, 250.0, BASE_S, round(BASE_RATE * BASE_S), BASE_J)
        for cap in paper.TABLE3_CAPS_W:
            total_s = BASE_S * (1 + changes[("time", cap)] / 100)
            rate = BASE_RATE * (1 + changes[("token_rate", cap)] / 100)
            _write_cell(sweep, f"c{length}-{cap:g}", length, cap, total_s, round(rate * total_s),
                        BASE_J * (1 + changes[("energy", cap)] / 100))


def test_the_papers_tables_take_the_llama1_engines_cells(tmp_path):
    """A sweep that also ran engine=fast: the paper's artifacts stand on LLaMA-1's program, as it ran."""
    _papers_table3(tmp_path)
    for length in paper.TABLE3:
        for cap in (250.0, *paper.TABLE3_CAPS_W):
            _write_cell(tmp_path, f"fast{length}-{cap:g}", length, cap, BASE_S / 3, round(BASE_RATE * BASE_S),
                        BASE_J / 3, engine="fast")
    t3 = tables.table3_values(reduce_sweep(tmp_path))
    assert t3.choice.values["engine"] == "llama1" and not t3.choice.notes
    assert t3.values[512][("energy", 150.0)] == pytest.approx(paper.TABLE3[512][("energy", 150.0)], abs=2e-3)


def test_old_records_of_engine_reference_read_as_llama2_and_stand_in_before_fast(tmp_path):
    """Sweeps before the rename wrote engine=reference (Llama 2's program): the closest stand-in for llama1."""
    for length in paper.TABLE3:
        for cap in (250.0, *paper.TABLE3_CAPS_W):
            for engine in ("reference", "fast"):
                _write_cell(tmp_path, f"{engine}{length}-{cap:g}", length, cap, BASE_S, round(BASE_RATE * BASE_S),
                            BASE_J, engine=engine)
    cells = reduce_sweep(tmp_path)
    assert set(cells["engine"]) == {"llama2", "fast"}
    t3 = tables.table3_values(cells)
    assert t3.choice.values["engine"] == "llama2"
    assert any("engine = llama2: the paper's llama1 is not in this sweep" in n for n in t3.choice.notes)


def test_percent_change_is_relative_to_the_base():
    assert tables.percent_change(106.23, 100.0) == pytest.approx(6.23)
    assert tables.percent_change(78.18, 100.0) == pytest.approx(-21.82)
    assert tables.percent_change(None, 100.0) is None and tables.percent_change(1.0, float("nan")) is None


def test_table3_reproduces_the_papers_percentages_from_records(tmp_path):
    _papers_table3(tmp_path)
    cells = reduce_sweep(tmp_path)
    t3 = tables.table3_values(cells)
    assert t3.caps == paper.TABLE3_CAPS_W and not t3.choice.notes
    for length, changes in paper.TABLE3.items():
        for key, value in changes.items():
            assert t3.values[length][key] == pytest.approx(value, abs=2e-3), (length, key)
    rendered = tables.table3(cells)
    assert list(rendered.frame.columns) == ["max len", "time @175W", "time @150W", "energy @175W", "energy @150W",
                                            "token rate @175W", "token rate @150W"]
    assert "| 512 | +6.51 | +21.70 | -23.95 | -34.66 | -6.11 | -17.83 |" in tables.to_markdown(rendered)
    assert r"512 & +6.51 & +21.70 & -23.95 & -34.66 & -6.11 & -17.83 \\" in tables.to_latex(rendered)
    assert tables.to_csv(rendered).splitlines()[0] == ",".join(rendered.frame.columns)

    compared = comparison(cells, read_skipped(tmp_path), read_facts(tmp_path)).set_index(["artifact", "quantity", "setting"])
    row = compared.loc[("Table III", "energy change @150 W (%)", "65B, 4 A100, GSM8K, batch 64, max length 1024")]
    assert row["paper"] == "-34.59" and float(row["ours"]) == pytest.approx(-34.59, abs=1e-3)
    assert float(row["ratio"]) == pytest.approx(1.0, abs=1e-3)
    assert row["our_hardware"] == "4 x NVIDIA A100 on 1 node(s)"
    mean_175 = compared.loc[("Finding", "power cap 250 -> 175 W: run time change (mean over lengths) (%)",
                             "as the paper states it")]
    assert float(mean_175["ours"]) == pytest.approx(sum(paper.TABLE3[n][("time", 175.0)] for n in paper.TABLE3) / 3, abs=1e-3)
    assert len(compared.loc["Table III"]) == 18


def test_a_missing_base_or_cap_is_empty_never_estimated(tmp_path):
    _write_cell(tmp_path, "c175", 256, 175.0, BASE_S, 500_000, BASE_J)  # no 250 W cell at 256
    _write_cell(tmp_path, "b512", 512, 250.0, BASE_S, 500_000, BASE_J)
    _write_cell(tmp_path, "c512", 512, 150.0, 2 * BASE_S, 500_000, BASE_J / 2)  # no 175 W cell at 512
    t3 = tables.table3_values(reduce_sweep(tmp_path))
    assert t3.values[256][("time", 175.0)] is None
    assert t3.values[512][("time", 150.0)] == pytest.approx(100.0)
    assert t3.values[512][("energy", 150.0)] == pytest.approx(-50.0)
    assert t3.values[512][("token_rate", 150.0)] == pytest.approx(-50.0)
    assert t3.values[512][("time", 175.0)] is None
    assert any("some caps lack a cell" in n for n in t3.notes)


def test_repeats_are_averaged_and_said_so(tmp_path):
    _write_cell(tmp_path, "b1", 256, 250.0, 900.0, 450_000, BASE_J)
    _write_cell(tmp_path, "b2", 256, 250.0, 1100.0, 550_000, BASE_J)
    _write_cell(tmp_path, "c", 256, 175.0, 1100.0, 500_000, BASE_J)
    t3 = tables.table3_values(reduce_sweep(tmp_path))
    assert t3.values[256][("time", 175.0)] == pytest.approx(10.0)
    assert any("2 cells with the same settings" in n for n in t3.notes)


def _cell_row(model: str, gpu: str, shards: int, batch: int, status: str) -> dict:
    return {"cell_id": f"{model}{gpu}{shards}{batch}", "model": model, "gpu": gpu, "dataset": "alpaca",
            "shards": shards, "precision": "fp16", "engine": "llama1", "batch_size": batch, "max_gen_len": 256, "power_cap_w": 250.0,
            "status": status}


def test_table2_is_the_fewest_gpus_and_largest_batch_that_ran(tmp_path):
    cells = pd.DataFrame([_cell_row("llama_65b", "a100", 4, 64, "ok"), _cell_row("llama_65b", "a100", 4, 128, "ok"),
                          _cell_row("llama_65b", "a100", 4, 256, "oom"), _cell_row("llama_7b", "v100", 1, 64, "ok")])
    (tmp_path / "manifest.json").write_text(json.dumps({"cells": {"s": {
        "skip_reason": "needs ~100 GiB", "job": None, "world_size": 2, "params": {"model.name": "llama_65b", "gpu.name": "a100", "dataset.name":
                                                    "alpaca", "shards": 2, "precision": "fp16", "engine": "llama1", "batch_size": 64,
                                                    "max_gen_len": 256, "power_cap_w": 250.0}}}}))
    found, _ = tables.table2_found(cells, read_skipped(tmp_path))
    by = {(f.model, f.gpu): f for f in found}
    assert (by[("llama_65b", "a100")].gpus, by[("llama_65b", "a100")].max_batch) == (4, 128)
    notes = " ".join(by[("llama_65b", "a100")].notes)
    assert "4 GPU(s) batch 256: oom" in notes and "2 GPU(s) batch 64: skipped" in notes
    assert (by[("llama_7b", "v100")].gpus, by[("llama_7b", "v100")].max_batch) == (1, 64)
    table = tables.table2(cells, read_skipped(tmp_path))
    assert list(table.frame.columns) == ["model", "V100 GPUs", "V100 max batch", "A100 GPUs", "A100 max batch"]
    row = table.frame.set_index("model").loc["65B"]
    assert math.isnan(row["V100 GPUs"]) and row["A100 max batch"] == 128


def test_utilization_at_the_gpus_own_limit_is_compared_with_a_note(tmp_path):
    """A site that forbids power caps runs uncapped: Table V still compares, and says so."""
    for shards in (8, 16):
        _write_cell(tmp_path, f"v{shards}", 256, None, BASE_S, 500_000, BASE_J, gpu="v100", shards=shards,
                    telemetry={"mem_util_max_pct": 24.25 * 8 / shards, "sm_util_avg_pct": 95.0})
    compared = comparison(reduce_sweep(tmp_path), read_skipped(tmp_path), read_facts(tmp_path))
    rows = compared[compared["artifact"] == "Table V"].set_index(["quantity", "setting"])
    row = rows.loc[("max GPU memory util (%)", "65B, batch 64, 8 GPUs")]
    assert float(row["ours"]) == pytest.approx(24.25) and row["ratio"] == "1"
    assert row["note"] == "ours at power cap the GPU's own limit (the paper's: 250 W)"
    assert float(rows.loc[("max GPU memory util (%)", "65B, batch 64, 16 GPUs"), "ratio"]) == pytest.approx(
        12.125 / 13.33, abs=1e-3)
    assert rows.loc[("avg SM util (%)", "65B, batch 64, 32 GPUs"), "ours"] == ""
