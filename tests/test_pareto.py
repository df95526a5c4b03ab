"""Pareto frontier and recommendation on a synthetic sweep whose frontier is known by construction."""

from __future__ import annotations

import pandas as pd
import pytest
from w2w.analysis import pareto
from w2w.analysis.report import main as report_main

from w2w.files import write_json

# (shards, batch, power cap) -> (tokens/s, J/token). Built so the frontier of J/token vs tokens/s is
# exactly FRONT: each other cell is dominated by a named frontier cell (slower and dearer).
SPEED_COST = {
    (1, 8, 250): (100.0, 1.0),   # frontier: cheapest
    (1, 16, 250): (180.0, 1.2),  # frontier
    (2, 16, 250): (300.0, 2.0),  # frontier: fastest
    (1, 16, 150): (150.0, 1.25),  # dominated by (1, 16, 250): slower and dearer
    (2, 8, 250): (170.0, 2.5),   # dominated by (1, 16, 250)
    (2, 8, 150): (90.0, 1.5),    # dominated by (1, 8, 250)
    (1, 8, 150): (100.0, 1.0),   # ties (1, 8, 250) on both: kept as well
    (2, 16, 150): (250.0, 2.2),  # dominated by (2, 16, 250)
}
FRONT = {(1, 8, 250), (1, 8, 150), (1, 16, 250), (2, 16, 250)}
TOKENS, RESPONSES = 6000, 60


def _cells() -> pd.DataFrame:
    rows = []
    for (shards, batch, cap), (tps, jpt) in SPEED_COST.items():
        total_s = TOKENS / tps
        batches = -(-RESPONSES // batch)
        rows.append({"cell_id": f"s{shards}b{batch}c{cap}", "model": "tiny", "gpu": "a100", "dataset": "gsm8k",
                     "shards": shards, "batch_size": batch, "max_gen_len": 100, "power_cap_w": float(cap),
                     "precision": "fp16", "status": "ok", "tokens_per_s": tps, "energy_per_token_j": jpt,
                     "seconds_per_response": total_s / batches, "accuracy": 0.5,
                     "energy_per_correct_j": jpt * TOKENS / (RESPONSES / 2)})
    return pd.DataFrame(rows)


def _key(row) -> tuple:
    return (int(row["shards"]), int(row["batch_size"]), int(row["power_cap_w"]))


def test_frontier_of_energy_per_token_against_throughput_is_the_constructed_one():
    front = pareto.frontier(_cells(), "energy_per_token_j", "tokens_per_s", larger_is_faster=True)
    assert {_key(r) for _, r in front.iterrows()} == FRONT
    assert list(front["tokens_per_s"]) == sorted(front["tokens_per_s"])


def test_frontier_matches_a_brute_force_definition_for_time_per_response():
    cells = _cells()
    front = pareto.frontier(cells, "energy_per_correct_j", "seconds_per_response", larger_is_faster=False)
    expected = set()
    for i, a in cells.iterrows():
        beaten = any(
            b["energy_per_correct_j"] <= a["energy_per_correct_j"] and b["seconds_per_response"] <= a["seconds_per_response"]
            and (b["energy_per_correct_j"] < a["energy_per_correct_j"] or b["seconds_per_response"] < a["seconds_per_response"])
            for j, b in cells.iterrows() if i != j)
        if not beaten:
            expected.add(_key(a))
    assert {_key(r) for _, r in front.iterrows()} == expected
    assert 0 < len(expected) < len(cells)


def test_varied_axes_name_the_points():
    cells = _cells()
    assert pareto.varied_axes(cells) == ["shards", "batch_size", "power_cap_w"]
    assert pareto.label(cells.iloc[0].to_dict(), ["shards", "batch_size", "power_cap_w"]) == "s=1 b=8 cap=250 W"


@pytest.mark.parametrize(("target", "best", "second"), [
    (pareto.Target(), (1, 8, 250), (1, 8, 150)),  # the tie: both cheapest
    (pareto.Target(min_tokens_per_s=150), (1, 16, 250), (1, 16, 150)),
    (pareto.Target(min_tokens_per_s=200), (2, 16, 250), (2, 16, 150)),
    (pareto.Target(min_tokens_per_s=260), (2, 16, 250), None),
])
def test_recommendation_is_the_cheapest_cell_meeting_the_target(target, best, second):
    rec = pareto.recommend(_cells(), target)
    assert _key(rec.best) == best
    assert (rec.runner_up is None and second is None) or _key(rec.runner_up) == second
    assert f"cell {rec.best['cell_id']}" in "\n".join(rec.lines)


def test_recommendation_with_a_latency_target():
    cells = _cells()
    limit = cells["seconds_per_response"].median()
    rec = pareto.recommend(cells, pareto.Target(max_seconds_per_response=limit))
    meeting = cells[cells["seconds_per_response"] <= limit]
    assert rec.best["energy_per_token_j"] == meeting["energy_per_token_j"].min()
    assert rec.best["seconds_per_response"] <= limit


def test_no_cell_meets_the_target_names_the_fastest():
    rec = pareto.recommend(_cells(), pareto.Target(min_tokens_per_s=1000))
    assert rec.best is None
    assert "No cell meets tokens_per_s >= 1000" in rec.lines[0] and "tokens_per_s=300" in rec.lines[0]


def test_no_energy_no_recommendation_and_a_reason():
    cells = _cells().assign(energy_per_token_j=None, energy_per_correct_j=None)
    assert pareto.recommend(cells, pareto.Target()).best is None
    assert "no ok cell has an energy reading" in pareto.missing_reason(cells)


def _records(sweep, cells: pd.DataFrame) -> None:
    """Rank records that the reducer turns back into these cells' speeds and energies."""
    for row in cells.to_dict("records"):
        total_s = TOKENS / row["tokens_per_s"]
        energy = row["energy_per_token_j"] * TOKENS
        for rank in range(row["shards"]):
            write_json(sweep / "cells" / row["cell_id"] / f"rank-{rank:05d}.json", {
                "cell_id": row["cell_id"], "rank": rank, "local_rank": rank, "world_size": row["shards"],
                "status": "ok", "node": "n0", "device": "cpu",
                "params": {k: row[k] for k in ("model", "gpu", "dataset", "shards", "batch_size", "max_gen_len",
                                               "power_cap_w", "precision")},
                "counts": {"responses": RESPONSES, "output_tokens": TOKENS, "output_words": TOKENS,
                           "batches": -(-RESPONSES // row["batch_size"]), "scored": RESPONSES,
                           "correct": RESPONSES // 2},
                "times": {"total_s": total_s},
                "energy": {"gpu_j": energy / row["shards"], "source": "counter", "idle_power_w": None},
                "responses": {"requested": False, "saved": False, "file": None, "score_reason": None},
            })


def test_report_cli_draws_the_frontier_and_names_the_cheapest(tmp_path, capsys):
    _records(tmp_path, _cells())
    assert report_main([str(tmp_path), "--min-tokens-per-s", "150"]) == 0
    out = capsys.readouterr().out
    assert "Cheapest configuration meeting tokens_per_s >= 150" in out
    assert "shards=1, batch_size=16, power_cap_w=250 W" in out and "runner-up: " in out
    page = (tmp_path / "results" / "paper" / "report.md").read_text()
    assert "## Which configuration to run" in page and "](figures/pareto.png)" in page
    assert (tmp_path / "results" / "paper" / "figures" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    front = pd.read_csv(tmp_path / "results" / "paper" / "pareto.csv")
    per_token = front[(front["cost"] == "energy_per_token_j") & (front["speed"] == "tokens_per_s")]
    assert set(per_token["cell_id"]) == {f"s{s}b{b}c{c}" for s, b, c in FRONT}
    assert set(front["cost"]) == {"energy_per_token_j", "energy_per_correct_j"}


def test_report_rejects_a_bad_target(tmp_path, capsys):
    _records(tmp_path, _cells())
    assert report_main([str(tmp_path), "--min-tokens-per-s", "0"]) == 2
    assert "--min-tokens-per-s=0.0: must be > 0" in capsys.readouterr().err
