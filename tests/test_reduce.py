"""The reducer on constructed records: metric arithmetic, energy sums, incomplete and torn input."""

from __future__ import annotations

import pandas as pd
import pytest
from w2w.analysis.reduce import reduce_sweep

from w2w.files import write_json
from w2w.records import Batch, Totals, record_path


def _record(cid, rank, world, node, energy, total_s=10.0, status="ok"):
    return {
        "schema": 1, "cell_id": cid, "rank": rank, "world_size": world, "node": node, "status": status,
        "params": {"model": "tiny", "gpu": "v100", "dataset": "gsm8k", "shards": world, "precision": "fp16",
                   "batch_size": 4, "max_gen_len": 8, "power_cap_w": None},
        "counts": {"responses": 40, "output_tokens": 800, "output_words": 500},
        "times": {"total_s": total_s},
        "energy": {"gpu_j": energy, "source": "nvml_counter" if energy is not None else "none",
                   "reason": None if energy is not None else "no GPU"},
    }


def _write(sweep, records):
    for r in records:
        write_json(record_path(sweep, r["cell_id"], r["rank"]), r)


def test_metrics_sum_every_gpu_and_keep_the_papers_convention(tmp_path):
    _write(tmp_path, [_record("a", 0, 4, "n1", 100.0, 10.0), _record("a", 1, 4, "n1", 110.0, 9.0),
                      _record("a", 2, 4, "n2", 150.0, 10.0), _record("a", 3, 4, "n2", 140.0, 8.0)])
    row = reduce_sweep(tmp_path).iloc[0]
    assert row["status"] == "ok" and row["gpus"] == 4 and row["nodes"] == 2
    assert row["energy_j"] == pytest.approx(500.0)
    assert row["energy_j_paper"] == pytest.approx(2 * 210.0)  # rank-0 node x nodes
    assert row["tokens_per_s"] == pytest.approx(80.0)  # the slowest rank's 10 s
    assert row["words_per_s"] == pytest.approx(50.0)
    assert row["responses_per_s"] == pytest.approx(4.0)
    assert row["energy_per_s_w"] == pytest.approx(50.0)
    assert row["energy_per_token_j"] == pytest.approx(500 / 800)
    assert row["energy_per_response_j"] == pytest.approx(500 / 40)


def test_energy_per_position_counts_work_and_is_empty_without_positions(tmp_path):
    """Per returned token (the paper's) and per computed position; older records have no positions: no figure."""
    counted = _record("new", 0, 1, "n1", 300.0)
    counted["counts"] |= {"positions": 1200}
    _write(tmp_path, [counted, _record("old", 0, 1, "n1", 300.0)])
    table = reduce_sweep(tmp_path).set_index("cell_id")
    assert table.loc["new", "energy_per_token_j"] == pytest.approx(300 / 800)
    assert table.loc["new", "energy_per_position_j"] == pytest.approx(300 / 1200)
    assert table.loc["old", "energy_per_token_j"] == pytest.approx(300 / 800)
    assert pd.isna(table.loc["old", "energy_per_position_j"]) and pd.isna(table.loc["old", "positions"])


def test_positions_of_a_cell_are_unknown_where_a_batch_has_none():
    batch = {"index": 0, "segment": 0, "energy": {},
             "times": {"start_unix_s": 0.0, "total_s": 1.0, "prefill_s": 0.5, "decode_s": 0.5}}
    new = Batch.from_dict(batch | {"counts": {"output_tokens": 3, "positions": 9}})
    old = Batch.from_dict(batch | {"counts": {"output_tokens": 3}})
    assert Totals.of([new, new], []).counts["positions"] == 18
    assert Totals.of([new, old], []).counts["positions"] is None  # never a partial sum
    assert Totals.of([new, old], []).counts["output_tokens"] == 6


def test_no_meter_gives_empty_energy_and_a_reason(tmp_path):
    _write(tmp_path, [_record("a", 0, 1, "n1", None)])
    row = reduce_sweep(tmp_path).iloc[0]
    assert row["energy_j"] is None or row["energy_j"] != row["energy_j"]
    assert row["energy_per_token_j"] is None or row["energy_per_token_j"] != row["energy_per_token_j"]
    assert "no GPU" in row["note"]


def test_torn_and_missing_records_mark_the_cell_incomplete(tmp_path):
    _write(tmp_path, [_record("torn", 0, 2, "n1", 1.0), _record("gap", 0, 2, "n1", 1.0),
                      _record("gap", 1, 2, "n1", 1.0), _record("ok", 0, 1, "n1", 1.0)])
    record_path(tmp_path, "torn", 1).write_text('{"cell_id": "torn", "rank": 1, "wor')
    record_path(tmp_path, "gap", 1).unlink()
    _write(tmp_path, [_record("failed", 0, 1, "n1", None, status="oom") | {"error": "OutOfMemoryError: CUDA"}])
    table = reduce_sweep(tmp_path).set_index("cell_id")
    assert set(table.index) == {"torn", "gap", "ok", "failed"}  # nothing dropped silently
    assert table.loc["torn", "status"] == "incomplete" and "rank-00001.json" in table.loc["torn", "note"]
    assert table.loc["gap", "status"] == "incomplete" and "missing rank(s) [1] of 2" in table.loc["gap", "note"]
    assert table.loc["failed", "status"] == "oom" and "OutOfMemoryError" in table.loc["failed", "note"]
    assert table.loc["ok", "status"] == "ok"
