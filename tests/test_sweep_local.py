"""The demo's path: w2w-sweep on submitit's local executor, two model-parallel ranks, then w2w-reduce."""

from __future__ import annotations

import json

from w2w.analysis.metrics import METRIC_NAMES

from tests.conftest import cli

GRID = ["shards=2", "precision=fp32", "batch_size=2,4", "max_gen_len=4,8", "dataset.num_prompts=6"]


def test_local_sweep_then_reduce(tmp_path):
    sweep = tmp_path / "sweep"
    out = cli("w2w.launch.sweep", "--wait", "--poll", "1", *GRID, f"sweep_dir={sweep}").stdout
    assert "4 cells: 4 done" in out
    cells = sorted((sweep / "cells").iterdir())
    assert len(cells) == 4
    for cell in cells:
        ranks = sorted(json.loads(p.read_text())["rank"] for p in cell.glob("rank-*.json"))
        assert ranks == [0, 1]

    table = cli("w2w.analysis.reduce", str(sweep)).stdout
    header, _, *rows = table.splitlines()[:6]
    for name in METRIC_NAMES:
        assert f" {name} " in header
    columns = [c.strip() for c in header.strip("|").split("|")]
    for row in rows:
        values = dict(zip(columns, (v.strip() for v in row.strip("|").split("|")), strict=True))
        assert values["status"] == "ok" and values["gpus"] == "2"
        for name in ("words_per_s", "tokens_per_s", "responses_per_s"):
            assert float(values[name]) > 0
        for name in ("energy_per_s_w", "energy_per_token_j", "energy_per_response_j"):
            assert values[name] == ""  # no meter on a CPU: empty, never a number
    assert "energy columns empty: no GPU" in table
    assert (sweep / "results" / "cells.csv").is_file()
    assert (sweep / "results" / "metrics.png").stat().st_size > 10_000

    again = cli("w2w.launch.sweep", *GRID, f"sweep_dir={sweep}").stdout
    assert "all cells done" in again and "submitted " not in again
