"""Repeats as an axis: each cell run N times in a seeded interleaved order, reduced to mean, std, n and a 95% interval."""

from __future__ import annotations

import json
import math

import pytest
from w2w.analysis.pareto import Target, distinguishable, frontier_table, recommend
from w2w.analysis.reduce import reduce_sweep
from w2w.analysis.repeats import repeats_lines, spread_table
from w2w.analysis.stats import summarize, t_975
from w2w.analysis.tables import interval_markdown
from w2w.launch.status import cell_records

from tests.conftest import cli
from tests.parallel import run_parallel
from w2w.config import compose_cell, compose_grid
from w2w.errors import ConfigError
from w2w.files import write_json
from w2w.order import run_order
from w2w.progress import progress_path
from w2w.records import record_path, run_dir, runs_done


def _record(cid, repeat, total_s, energy, repeats=3, status="ok", batch_size=4):
    record = {
        "schema": 2, "cell_id": cid, "rank": 0, "world_size": 1, "node": "n1", "status": status, "repeat": repeat,
        "params": {"model": "tiny", "gpu": "v100", "dataset": "synthetic", "shards": 1, "precision": "fp16",
                   "batch_size": batch_size, "max_gen_len": 8, "power_cap_w": None},
        "config": {"repeats": repeats, "batch_size": batch_size},
        "counts": {"responses": 40, "output_tokens": 800, "output_words": 500},
        "times": {"total_s": total_s},
        "energy": {"gpu_j": energy, "source": "nvml_counter"},
    }
    if status != "ok":
        record |= {"error": "RuntimeError: boom", "counts": None, "times": None}
        del record["counts"], record["times"]
    return record


def _write(sweep, records):
    for r in records:
        write_json(record_path(sweep, r["cell_id"], r["rank"], r["repeat"]), r)


def test_summary_of_known_values_uses_students_t():
    s = summarize([10.0, 12.0, 14.0, None, float("nan")])  # runs without a figure are not counted
    assert (s.mean, s.std, s.n) == (12.0, 2.0, 3)
    assert s.ci95 == pytest.approx(4.3027 * 2.0 / math.sqrt(3))
    assert (s.low, s.high) == pytest.approx((12.0 - s.ci95, 12.0 + s.ci95))
    one = summarize([5.0])
    assert (one.mean, one.std, one.n, one.ci95) == (5.0, None, 1, None)  # no spread from one run: none invented
    assert t_975(1) == 12.7062 and t_975(30) == 2.0423
    assert t_975(60) == pytest.approx(2.0003, abs=1e-4) and t_975(120) == pytest.approx(1.9799, abs=1e-4)


def test_repeats_reduce_to_the_right_mean_std_and_interval(tmp_path):
    _write(tmp_path, [_record("a", 0, 10.0, 100.0), _record("a", 1, 8.0, 90.0), _record("a", 2, 12.0, 110.0),
                      _record("b", 0, 10.0, 50.0, repeats=1, batch_size=8)])
    assert run_dir(tmp_path, "a", 2) == tmp_path / "cells" / "a" / "repeat-2"
    table = reduce_sweep(tmp_path).set_index("cell_id")
    a = table.loc["a"]
    assert a["status"] == "ok" and a["repeats"] == 3 and a["repeat_note"] == ""
    assert a["energy_j"] == pytest.approx(100.0) and a["energy_j_std"] == pytest.approx(10.0)
    assert a["energy_j_n"] == 3 and a["energy_j_ci95"] == pytest.approx(4.3027 * 10.0 / math.sqrt(3))
    rates = [800 / 10.0, 800 / 8.0, 800 / 12.0]  # every metric is reduced per run, then averaged
    mean = sum(rates) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in rates) / 2)
    assert a["tokens_per_s"] == pytest.approx(mean) and a["tokens_per_s_std"] == pytest.approx(std)
    assert a["tokens_per_s_ci95"] == pytest.approx(4.3027 * std / math.sqrt(3))
    assert a["energy_per_token_j"] == pytest.approx((100 / 800 + 90 / 800 + 110 / 800) / 3)
    b = table.loc["b"]  # one run: the same figures as before repeats, n = 1 and no interval
    assert b["energy_j"] == 50.0 and b["energy_j_n"] == 1 and math.isnan(b["energy_j_ci95"])
    text = interval_markdown(table.reset_index(), ["cell_id", "energy_j", "tokens_per_s"])
    assert "| a | 100 ± 25 | 82.22 ± 42 |" in text and "| b | 50 | 80 |" in text


def test_a_failed_or_missing_repeat_is_left_out_of_the_mean_and_named(tmp_path):
    _write(tmp_path, [_record("c", 0, 10.0, 100.0, repeats=4), _record("c", 1, 10.0, 120.0, repeats=4),
                      _record("c", 2, 10.0, None, repeats=4, status="error")])
    row = reduce_sweep(tmp_path).iloc[0]
    assert row["status"] == "ok" and row["repeats"] == 2 and row["energy_j"] == pytest.approx(110.0)
    assert "repeat 2: error: rank 0: RuntimeError: boom" in row["repeat_note"]
    assert "repeat(s) [3] of 4 not run" in row["repeat_note"]


def test_report_section_and_recommendation_say_when_intervals_overlap(tmp_path):
    # a and b: overlapping energy per token; d: clearly dearer.
    # a and b: overlapping energy per token and speed (b a little dearer and faster); d: clearly dearer.
    _write(tmp_path, [_record("a", k, t, e, batch_size=4) for k, (t, e) in enumerate(((10, 100), (9, 90), (11, 110)))]
           + [_record("b", k, t, e, batch_size=8) for k, (t, e) in enumerate(((9, 104), (10, 96), (8, 112)))]
           + [_record("d", k, 10.0, e, batch_size=16) for k, e in enumerate((300.0, 301.0, 299.0))])
    cells = reduce_sweep(tmp_path)
    rec = recommend(cells, Target())
    assert rec.best["cell_id"] == "a" and rec.runner_up["cell_id"] == "b"
    assert any("not distinguishable" in line and "overlap" in line for line in rec.lines), rec.lines
    front = frontier_table(cells)
    throughput = front[front["speed"] == "tokens_per_s"].set_index("cell_id")
    assert sorted(throughput.index) == ["a", "b"]  # d is dominated by a's mean
    assert throughput.loc["a", "overlaps"] == "b" and throughput.loc["b", "overlaps"] == "a"
    assert (throughput["n"] == 3).all() and throughput["cost_ci95"].notna().all()
    apart = distinguishable(cells.set_index("cell_id").loc["a"].to_dict(),
                            cells.set_index("cell_id").loc["d"].to_dict(), "energy_per_token_j")
    assert apart[0].startswith("- distinguishable: the 95% intervals of energy_per_token_j do not overlap")
    spread = spread_table(cells)
    assert list(spread["n"]) == [3, 3, 3]
    lines = "\n".join(repeats_lines(cells, "TABLE"))
    assert "## Repeats: spread and 95% intervals" in lines and "TABLE" in lines


def _error_bars(figure) -> list:
    from matplotlib.container import ErrorbarContainer

    return [c for ax in figure.axes for c in ax.containers if isinstance(c, ErrorbarContainer)
            and any(len(line.get_segments()) for line in c.lines[2])]


def test_figures_draw_error_bars_only_for_cells_with_repeats(tmp_path):
    from w2w.analysis.figures import overview_figure
    from w2w.analysis.pareto import pareto_figure

    _write(tmp_path / "r", [_record("a", k, t, e, batch_size=4) for k, (t, e) in enumerate(((10, 100), (8, 90), (12, 110)))]
           + [_record("b", k, t, e, batch_size=8) for k, (t, e) in enumerate(((9, 80), (10, 85), (11, 90)))])
    cells = reduce_sweep(tmp_path / "r")
    overview, pareto = overview_figure(cells), pareto_figure(cells)
    assert _error_bars(overview.figure) and _error_bars(pareto.figure)
    assert any("error bars: the 95% interval" in n for n in overview.notes + pareto.notes)
    _write(tmp_path / "once", [_record("a", 0, 10.0, 100.0, repeats=1), _record("b", 0, 9.0, 80.0, repeats=1,
                                                                                batch_size=8)])
    once = reduce_sweep(tmp_path / "once")
    assert not _error_bars(overview_figure(once).figure) and not _error_bars(pareto_figure(once).figure)


def test_repeats_do_not_change_the_cell_id_and_bad_values_are_refused():
    assert compose_cell(["repeats=3"]).id == compose_cell([]).id
    with pytest.raises(ConfigError, match=r"repeats=0: must be >= 1"):
        compose_cell(["repeats=0"])
    with pytest.raises(ConfigError, match=r"repeat=2: set by w2w .* use repeats=N"):
        compose_cell(["repeat=2"])
    with pytest.raises(ConfigError, match=r"repeats=1,3: .* not a grid axis"):
        compose_grid(["repeats=1,3"])


def _grid(seed: int):
    return compose_grid(["batch_size=1,2,4,8", "max_gen_len=4,8", "repeats=3", f"seed={seed}"])


def test_the_run_order_is_interleaved_and_fixed_by_the_seed():
    cells = _grid(1)
    order = run_order(cells)
    assert [(c.id, c.repeat) for c in order] == [(c.id, c.repeat) for c in run_order(list(reversed(cells)))]
    cycles = [order[i * len(cells):(i + 1) * len(cells)] for i in range(3)]
    for k, cycle in enumerate(cycles):  # cycle k runs repeat k of every cell once
        assert {c.repeat for c in cycle} == {k} and sorted(c.id for c in cycle) == sorted(c.id for c in cells)
    assert [c.id for c in cycles[0]] != [c.id for c in cycles[1]]  # shuffled anew each cycle
    assert [c.id for c in cycles[0]] != sorted(c.id for c in cells)

    def by_setting(runs):
        return [(c.batch_size, c.max_gen_len, c.repeat) for c in runs]
    assert by_setting(run_order(_grid(1))) == by_setting(order)  # the same command: the same order
    assert by_setting(run_order(_grid(2))) != by_setting(order)  # another seed: another order
    once = compose_grid(["batch_size=1,2,4,8"])
    assert run_order(once) == once  # repeats=1: the planned order, as before


def test_status_calls_a_cell_done_only_when_all_its_repeats_are(tmp_path):
    _write(tmp_path, [_record("a", 0, 10.0, 100.0), _record("a", 1, 8.0, 90.0)])
    state, reason = cell_records(tmp_path, "a", 1, 3)
    assert state is None and reason.startswith("2/3 repeats done")
    assert not runs_done(tmp_path, "a", 1, 3)
    _write(tmp_path, [_record("a", 2, 12.0, 110.0)])
    assert cell_records(tmp_path, "a", 1, 3)[0] == "done" and runs_done(tmp_path, "a", 1, 3)
    _write(tmp_path, [_record("a", 1, 8.0, None, status="error")])
    state, reason = cell_records(tmp_path, "a", 1, 3)
    assert state == "failed" and reason.startswith("repeat 1: ")


GRID = ["shards=1", "precision=fp32", "max_gen_len=4", "dataset.num_prompts=4", "batch_size=2,4", "repeats=2"]


def _run(sweep, stop_after: int | None) -> tuple[object, list[str]]:
    """run_cells on this rank, stopped (as a preempted job) before measured batch number stop_after."""
    from w2w import runner
    from w2w.engines import fast

    real, calls = fast.Engine.generate, []

    def generate(self, prompts, params, eos_id, pad_id, cache_len=None, clock=None, generator=None):
        kind = "warmup" if clock is None else "batch"
        if kind == "batch" and calls.count("batch") == stop_after:
            raise SystemExit("preempted")
        calls.append(kind)
        return real(self, prompts, params, eos_id, pad_id, cache_len, clock, generator)

    fast.Engine.generate = generate  # this process only: run_parallel starts one per rank
    try:
        return runner.run_cells(compose_grid([*GRID, f"sweep_dir={sweep}"])), calls
    except SystemExit:
        return "preempted", calls


def test_a_job_preempted_among_repeats_resumes_only_the_unfinished_runs(tmp_path):
    # batch_size=2: 2 batches a run, batch_size=4: 1. Cycle 0 runs both cells (3 batches), then one batch of
    # cycle 1 runs, and the job stops before the next.
    [(outcome, calls)] = run_parallel(1, _run, tmp_path, 4)
    assert outcome == "preempted" and calls.count("batch") == 4
    cells = compose_grid(GRID)
    assert all(record_path(tmp_path, c.id, 0, 0).is_file() for c in cells)  # cycle 0 done
    first = run_order(cells)[len(cells)]  # the first run of cycle 1
    other = next(c for c in cells if c.id != first.id)
    assert not record_path(tmp_path, other.id, 0, 1).exists()
    if first.batch_size == 4:  # its one batch: the run finished
        assert record_path(tmp_path, first.id, 0, 1).is_file()
    else:  # one of its two batches: saved for the resume, no record yet
        assert not record_path(tmp_path, first.id, 0, 1).exists()
        assert len(json.loads(progress_path(tmp_path, first.id, 0, 1).read_text())["batches"]) == 1
    [(outcome, calls)] = run_parallel(1, _run, tmp_path, None)
    assert outcome[:2] == ["skipped", "skipped"] and outcome[-1] == "ok"
    assert calls.count("batch") == 2  # 6 batches in all, 4 of them run before
    assert all(runs_done(tmp_path, c.id, 1, 2) for c in cells)
    assert not any(progress_path(tmp_path, c.id, 0, 1).exists() for c in cells)
    table = reduce_sweep(tmp_path)
    assert list(table["repeats"]) == [2, 2] and list(table["tokens_per_s_n"]) == [2, 2]
    assert table["tokens_per_s_ci95"].notna().all()


def test_a_local_sweep_with_repeats_gives_n_2_per_cell(tmp_path):
    sweep = tmp_path / "sweep"
    out = cli("w2w.launch.sweep", "--wait", "--poll", "1", "shards=1", "precision=fp32", "batch_size=2,4",
              "max_gen_len=4", "dataset.num_prompts=4", "repeats=2", f"sweep_dir={sweep}").stdout
    assert "2 cells: 2 done" in out
    for cell in (sweep / "cells").iterdir():
        runs = [cell / "rank-00000.json", cell / "repeat-1" / "rank-00000.json"]
        assert [json.loads(p.read_text())["repeat"] for p in runs] == [0, 1]
    table = cli("w2w.analysis.reduce", str(sweep)).stdout
    header, _, *rows = table.splitlines()[:4]
    columns = [c.strip() for c in header.strip("|").split("|")]
    for row in rows:
        values = dict(zip(columns, (v.strip() for v in row.strip("|").split("|")), strict=True))
        assert values["status"] == "ok" and values["repeats"] == "2" and " ± " in values["tokens_per_s"]
    grid = ["shards=1", "precision=fp32", "batch_size=2,4", "max_gen_len=4", "dataset.num_prompts=4"]
    again = cli("w2w.launch.sweep", *grid, "repeats=2", f"sweep_dir={sweep}").stdout
    assert "all cells done" in again and "submitted " not in again and "(4 runs with repeats)" in again
    for cell in compose_grid([*grid, "repeats=3"]):  # a third repeat: the same cells, one run each to go
        assert runs_done(sweep, cell.id, 1, 2) and not runs_done(sweep, cell.id, 1, 3)


def test_runs_still_missing_after_repeats_were_raised_are_named(tmp_path):
    # Issue 28: a cell run once, then planned again with repeats=3 (its id unchanged): the records say 1,
    # the manifest 3; the runs not yet done were not mentioned.
    from w2w.launch.submit import save_manifest

    from w2w.manifest import Manifest, ManifestCell

    _write(tmp_path, [_record("c", 0, 10.0, 100.0, repeats=1)])
    save_manifest(Manifest(cells={"c": ManifestCell(world_size=1, params={"repeats": 3})}), tmp_path)
    row = reduce_sweep(tmp_path).iloc[0]
    assert row["status"] == "ok" and row["repeats"] == 1
    assert "repeat(s) [1, 2] of 3 not run" in row["repeat_note"]
