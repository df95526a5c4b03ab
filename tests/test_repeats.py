"""Repeats as an axis: each cell run N times (or until tight: repeats=auto) in a seeded interleaved order, reduced to
the 95% interval that fits the runs."""

from __future__ import annotations

import json
import math
from unittest import mock

import pytest
from w2w.analysis.pareto import Target, distinguishable, frontier_table, recommend
from w2w.analysis.reduce import reduce_sweep
from w2w.analysis.repeats import repeats_lines, spread_table
from w2w.analysis.stats import difference, summarize
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
from w2w.stats import median_rank, t_half_width


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
    assert s.ci95 == pytest.approx(4.3027 * 2.0 / math.sqrt(3), abs=1e-4)
    assert s.normal_p == pytest.approx(1.0) and s.interval == "t"  # evenly spaced: nothing against normality
    assert (s.low, s.high) == pytest.approx((12.0 - s.ci95, 12.0 + s.ci95))
    one = summarize([5.0])
    assert (one.mean, one.std, one.n, one.ci95, one.interval) == (5.0, None, 1, None, None)  # none invented
    # scipy's t quantiles against the published table (df 1, 30, 60, 120)
    for df, quantile in ((1, 12.7062), (30, 2.0423), (60, 2.0003), (120, 1.9799)):
        assert t_half_width(1.0, df + 1) * math.sqrt(df + 1) == pytest.approx(quantile, abs=1e-4)
    two = summarize([4.0, 6.0])  # too few to check normality: the median's interval, said so
    assert two.normal_p is None and two.interval == "median" and (two.low, two.high) == (4.0, 6.0)
    assert "normality not checked (n < 3)" in two.describe() and two.cover_pct == pytest.approx(50.0)


def test_the_median_interval_is_the_binomial_order_statistics():
    # n = 5: no pair of order statistics covers 95%; [min, max] covers 1 - 2 / 2**5 = 93.75%.
    assert median_rank(5) == (1, pytest.approx(0.9375))
    # n = 10: P(B(10, 1/2) <= 1) = 11/1024, so [x(2), x(9)] covers 1 - 22/1024 = 97.85%; [x(3), x(8)] only 89%.
    assert median_rank(10) == (2, pytest.approx(1 - 22 / 1024))
    s = summarize([9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0, 100.0])
    assert s.interval == "median" and s.normal_p < 0.05  # one far outlier: not normal
    assert (s.median, s.low, s.high) == (5.5, 2.0, 9.0) and s.cover_pct == pytest.approx(97.85, abs=0.01)


def test_a_skewed_repeats_5_sweep_draws_no_interval_below_zero(tmp_path):
    # Five runs of one cell, skewed: one run ten times as fast (tokens/s 80, 76.19, 72.73, 80, 800) and one
    # nine times as dear (J/token 0.125 ... 1.125), as a straggler or a cold cache makes them.
    times = (10.0, 10.5, 11.0, 10.0, 1.0)
    energies = (100.0, 101.0, 104.0, 108.0, 900.0)
    _write(tmp_path, [_record("s", k, t, e, repeats=5) for k, (t, e) in enumerate(zip(times, energies, strict=True))])
    row = reduce_sweep(tmp_path).iloc[0].to_dict()
    rates = sorted(800 / t for t in times)
    mean = sum(rates) / 5
    std = math.sqrt(sum((r - mean) ** 2 for r in rates) / 4)
    assert mean - 2.7764 * std / math.sqrt(5) < 0  # the symmetric t interval would reach below zero
    assert row["tokens_per_s"] - row["tokens_per_s_ci95"] < 0 and row["energy_per_token_j"] - row["energy_per_token_j_ci95"] < 0
    assert row["tokens_per_s_interval"] == "median"  # so the median's interval is used instead
    # By hand: 5 sorted runs, the median is the 3rd; [x(1), x(5)] is the widest pair, covering 1 - 2/32.
    assert row["tokens_per_s_median"] == pytest.approx(rates[2])
    assert (row["tokens_per_s_low"], row["tokens_per_s_high"]) == pytest.approx((rates[0], rates[4]))
    assert row["tokens_per_s_median_cover_pct"] == pytest.approx(93.75)
    for metric in ("tokens_per_s", "energy_per_token_j", "responses_per_s", "energy_j", "total_s"):
        assert row[metric + "_low"] > 0, metric
    text = interval_markdown(reduce_sweep(tmp_path), ["tokens_per_s"])
    assert "| med 80 [72.73, 800] |" in text


def test_repeats_reduce_to_the_right_mean_std_and_interval(tmp_path):
    _write(tmp_path, [_record("a", 0, 10.0, 100.0), _record("a", 1, 8.0, 90.0), _record("a", 2, 12.0, 110.0),
                      _record("b", 0, 10.0, 50.0, repeats=1, batch_size=8)])
    assert run_dir(tmp_path, "a", 2) == tmp_path / "cells" / "a" / "repeat-2"
    table = reduce_sweep(tmp_path).set_index("cell_id")
    a = table.loc["a"]
    assert a["status"] == "ok" and a["repeats"] == 3 and a["repeat_note"] == ""
    assert a["energy_j"] == pytest.approx(100.0) and a["energy_j_std"] == pytest.approx(10.0)
    assert a["energy_j_n"] == 3 and a["energy_j_ci95"] == pytest.approx(4.3027 * 10.0 / math.sqrt(3), abs=1e-3)
    rates = [800 / 10.0, 800 / 8.0, 800 / 12.0]  # every metric is reduced per run, then averaged
    mean = sum(rates) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in rates) / 2)
    assert a["tokens_per_s"] == pytest.approx(mean) and a["tokens_per_s_std"] == pytest.approx(std)
    assert a["tokens_per_s_ci95"] == pytest.approx(4.3027 * std / math.sqrt(3), abs=1e-3)
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


def test_report_section_and_recommendation_say_how_sure_a_difference_is(tmp_path):
    # a and b: overlapping energy per token and speed (b a little dearer and faster); d: clearly dearer.
    _write(tmp_path, [_record("a", k, t, e, batch_size=4) for k, (t, e) in enumerate(((10, 100), (9, 90), (11, 110)))]
           + [_record("b", k, t, e, batch_size=8) for k, (t, e) in enumerate(((9, 104), (10, 96), (8, 112)))]
           + [_record("d", k, 10.0, e, batch_size=16) for k, e in enumerate((300.0, 301.0, 299.0))])
    cells = reduce_sweep(tmp_path)
    rec = recommend(cells, Target())
    assert rec.best["cell_id"] == "a" and rec.runner_up["cell_id"] == "b"
    line = next(line for line in rec.lines if "not distinguishable" in line)
    a, b = [0.125, 0.1125, 0.1375], [0.13, 0.12, 0.14]  # J/token of the runs: both pass Shapiro-Wilk
    welch = difference(a, b)
    assert welch.test == "Welch t" and not welch.significant
    assert line.startswith("- **not distinguishable** in energy_per_token_j (0.125 ± 0.031 vs 0.13 ± 0.025 J/token): "
                           "Welch t: ")
    assert f"Welch t: t = {welch.statistic:.3g}, p = {welch.p:.2g}, n = 3, 3" in line
    # the Welch interval of the difference by hand: means 0.125 and 0.13, variances 1.5625e-4 and 1e-4
    se = math.sqrt(1.5625e-4 / 3 + 1e-4 / 3)
    df = se**4 / ((1.5625e-4 / 3) ** 2 / 2 + (1e-4 / 3) ** 2 / 2)
    from scipy import stats
    half = stats.t.ppf(0.975, df) * se
    assert (welch.low, welch.high) == pytest.approx((-0.005 - half, -0.005 + half))
    assert f"[{-0.005 - half:+.4g}, {-0.005 + half:+.4g}]" in line
    front = frontier_table(cells)
    throughput = front[front["speed"] == "tokens_per_s"].set_index("cell_id")
    assert sorted(throughput.index) == ["a", "b"]  # d is dominated by a's mean
    assert throughput.loc["a", "next"].startswith("vs b: energy_per_token_j: not distinguishable (Welch t")
    assert throughput.loc["b", "next"] == ""  # the fastest has no next neighbour
    assert (throughput["n"] == 3).all() and (throughput["cost_interval"] == "t").all()
    apart = distinguishable(cells.set_index("cell_id").loc["a"].to_dict(),
                            cells.set_index("cell_id").loc["d"].to_dict(), "energy_per_token_j")
    far = difference(a, [0.375, 0.37625, 0.37375])
    assert far.significant and far.high < 0  # the difference and its interval, all below zero
    assert apart[0].startswith("- distinguishable in energy_per_token_j (0.125 ± 0.031 vs 0.375 ± 0.0031 J/token): "
                               f"mean difference -0.25, 95% interval [{far.low:+.4g}, {far.high:+.4g}] J/token; "
                               f"Welch t: t = {far.statistic:.3g}, p = {far.p:.2g}, n = 3, 3")
    skewed = difference([1.0, 1.1, 1.0, 1.05, 1.9], [2.0, 2.1, 2.0, 2.05, 9.2])  # b not normal: rank test
    assert skewed.test == "Mann-Whitney U" and skewed.statistic == 0.0 and skewed.significant  # no a above a b
    # Hodges-Lehmann: the median of the 25 differences a - b (13th of them sorted: 1.0 - 2.0)
    assert skewed.difference == pytest.approx(-1.0) and skewed.numbers().startswith("Mann-Whitney U: U = 0, p = 0.012")
    spread = spread_table(cells)
    assert list(spread["n"]) == [3, 3, 3]
    lines = "\n".join(repeats_lines(cells, "TABLE"))
    assert "## Repeats: spread and 95% intervals" in lines and "TABLE" in lines and "Shapiro-Wilk" in lines


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
    assert any("n = 3 run(s) per cell; error bars: the 95% interval that fits" in n
               for n in overview.notes + pareto.notes)
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

    def generate(self, prompts, params, eos_id, pad_id, cache_len=None, clock=None, generator=None, **kwargs):
        kind = "warmup" if clock is None else "batch"
        if kind == "batch" and calls.count("batch") == stop_after:
            raise SystemExit("preempted")
        calls.append(kind)
        return real(self, prompts, params, eos_id, pad_id, cache_len, clock, generator, **kwargs)

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
        # two runs: too few to check normality, so the median's interval [min, max] (it covers 50%)
        assert values["status"] == "ok" and values["repeats"] == "2" and values["tokens_per_s"].startswith("med ")
    grid = ["shards=1", "precision=fp32", "batch_size=2,4", "max_gen_len=4", "dataset.num_prompts=4"]
    again = cli("w2w.launch.sweep", *grid, "repeats=2", f"sweep_dir={sweep}").stdout
    assert "all cells done" in again and "submitted " not in again and "(4 runs with repeats)" in again
    for cell in compose_grid([*grid, "repeats=3"]):  # a third repeat: the same cells, one run each to go
        assert runs_done(sweep, cell.id, 1, 2) and not runs_done(sweep, cell.id, 1, 3)


# J per token is energy / 800 tokens: a settles within ±2% at its 4th run; b never does.
AUTO_ENERGY_J = {2: [100.0, 101.0, 99.0, 100.5, 100.0, 100.0], 4: [50.0, 150.0, 60.0, 140.0, 55.0, 145.0]}


def test_repeats_auto_runs_until_tight_or_the_maximum(tmp_path, monkeypatch):
    import torch
    from w2w.analysis.reduce import summary_notes

    from w2w import runner
    from w2w.distributed import CELL_OK, DistInfo
    from w2w.records import parse_record
    from w2w.stopping import read_stop

    cells = compose_grid(["shards=1", "precision=fp32", "max_gen_len=4", "dataset.num_prompts=4", "batch_size=2,4",
                          "repeats=auto", "repeats_max=6", f"sweep_dir={tmp_path}"])
    assert [c.repeats for c in cells] == [6, 6] and all(c.repeats_auto for c in cells)
    measured = []

    def measure(cell, rows, loaded, info, monitor, capper, run=None):  # the meter's readings, known in advance
        measured.append((cell.batch_size, cell.repeat))
        energy = AUTO_ENERGY_J[cell.batch_size][cell.repeat]
        return parse_record(_record(cell.id, cell.repeat, 10.0, energy, repeats=cell.repeats,
                                    batch_size=cell.batch_size)), CELL_OK

    monkeypatch.setattr(runner, "measure_cell", measure)
    monkeypatch.setattr(runner, "_load_measured", lambda cells, info, monitor: None)
    monkeypatch.setattr(runner, "restore_or_log", lambda capper: None)
    info = DistInfo(0, 0, 1, "host", "node", torch.device("cpu"))
    statuses = runner._run_loaded(cells, info, monitor=type("M", (), {"close": lambda self: None})(), capper=mock.Mock(),
                                  prompt_sets={c.dataset: [] for c in cells})
    tight, never = (next(c for c in cells if c.batch_size == b) for b in (2, 4))
    assert sorted(k for b, k in measured if b == 2) == [0, 1, 2, 3]  # 3 runs: ±2.5%; the 4th: ±1.4%
    assert sorted(k for b, k in measured if b == 4) == [0, 1, 2, 3, 4, 5]
    assert statuses.count("skipped") == 2 and statuses.count("ok") == 10
    stop = read_stop(tmp_path, tight.id)
    assert (stop.runs, stop.ok_runs, stop.stopped, stop.interval) == (4, 4, "tight", "t")
    values = [e / 800 for e in AUTO_ENERGY_J[2][:4]]
    assert stop.interval_pct == pytest.approx(100 * summarize(values).ci95 / (sum(values) / 4)) and stop.interval_pct <= 2
    stop = read_stop(tmp_path, never.id)
    assert (stop.runs, stop.stopped) == (6, "maximum") and stop.interval_pct > 2
    assert cell_records(tmp_path, tight.id, 1, 6) == ("done", "4 repeats (repeats=auto: stopped tight), on n1")
    assert runs_done(tmp_path, tight.id, 1, 4) and not runs_done(tmp_path, tight.id, 1, 6)
    table = reduce_sweep(tmp_path).set_index("batch_size")
    assert list(table["repeats"]) == [4, 6] and list(table["repeats_stopped"]) == ["tight", "maximum"]
    assert table.loc[2, "repeat_note"] == ""  # the runs it did not need are not missing
    notes = summary_notes(table.reset_index())
    assert f"cell {tight.id}: repeats=auto took 4 runs and stopped tight (energy_per_token_j 95% interval " \
           f"±{table.loc[2, 'repeats_interval_pct']:.2f}%, target ±2%)" in notes
    assert any(n.startswith(f"cell {never.id}: repeats=auto took 6 runs and stopped at the maximum (repeats_max), not tight")
               for n in notes)


def test_repeats_auto_keeps_the_cell_id_and_refuses_bad_values():
    assert compose_cell(["repeats=auto", "repeats_target_pct=1", "repeats_max=20"]).id == compose_cell([]).id
    for override, message in (("repeats_target_pct=0", r"repeats_target_pct=0.0: must be > 0"),
                              ("repeats_min=2", r"repeats_min=2: must be >= 3"),
                              ("repeats_max=2", r"repeats_max=2: must be >= repeats_min=3")):
        with pytest.raises(ConfigError, match=message):
            compose_cell(["repeats=auto", override])


def test_figures_label_powers_of_two_plainly_caption_n_and_shade_the_phases(tmp_path):
    import pandas as pd
    from matplotlib.patches import Polygon, Rectangle
    from w2w.analysis.figures import overview_figure, timeline_figure

    from w2w.records import parse_record

    _write(tmp_path, [_record(f"c{b}", k, t, e, batch_size=b) for b in (1, 2, 4) for k, (t, e) in
                      enumerate(((10, 100), (8, 90), (12, 110)))])
    overview = overview_figure(reduce_sweep(tmp_path))
    axis = overview.figure.axes[0]
    overview.figure.canvas.draw()
    assert [t.get_text() for t in axis.get_xticklabels()] == ["1", "2", "4"]  # not 2^0, 2^1, 2^2
    assert overview.figure.get_supxlabel().startswith("n = 3 run(s) per cell; error bars: the 95% interval")
    record = _record("a", 0, 10.0, 100.0, repeats=1) | {
        "segments": [{"segment": 0, "start_unix_s": 99.5, "warmup_s": 0.5}],  # stamped as the warm-up ends
        "batches": [{"index": i, "segment": 0, "times": {"start_unix_s": 100.0 + 2 * i, "total_s": 1.5,
                                                         "prefill_s": 0.5, "decode_s": 1.0}} for i in range(2)]}
    frame = pd.DataFrame({"rank": [0] * 5, "unix_s": [100.0, 101.0, 102.0, 103.0, 104.0], "power_w": [50.0] * 5})
    rendered = timeline_figure("a", [frame], "test", parse_record(record))
    spans = [p for p in rendered.figure.axes[0].patches if isinstance(p, Polygon | Rectangle)]
    # warm-up, 2 x (prefill, decode), and idle from 99.5 to 100, 101.5 to 102 and 103.5 to 104: 8 spans
    assert sorted((round(p.get_x(), 3), round(p.get_x() + p.get_width(), 3)) for p in spans) == [
        (-1.0, -0.5), (-0.5, 0.0), (0.0, 0.5), (0.5, 1.5), (1.5, 2.0), (2.0, 2.5), (2.5, 3.5), (3.5, 4.0)]
    labels = [t.get_text() for t in rendered.figure.axes[0].get_legend().get_texts()]
    assert labels == ["rank 0", "warm-up", "prefill", "decode", "idle"]
    assert rendered.notes[0].startswith("n = 1 run (repeat 0), 1 rank(s); no interval")


def test_the_paper_comparison_tests_its_two_sides_where_each_is_one_cell_with_runs(tmp_path):
    from w2w.analysis.compare import tested

    _write(tmp_path, [_record("a", k, t, 100.0, batch_size=4) for k, t in enumerate((10.0, 10.2, 9.8))]
           + [_record("b", k, t, 100.0, batch_size=8) for k, t in enumerate((5.0, 5.1, 4.9))])
    cells = reduce_sweep(tmp_path).set_index("cell_id", drop=False)
    said = tested(cells.loc[["b"]], cells.loc[["a"]], "tokens_per_s", "b vs a")
    assert said.startswith("b vs a: differ (mean difference +80.02, 95% interval [+73.37, +86.67] tokens/s; ") and "Welch t: t = " in said
    assert tested(cells, cells.loc[["a"]], "tokens_per_s", "all vs a") == ""  # two cells on one side: no test


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
