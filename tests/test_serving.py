"""scenario=serving: continuous batching gives each request its offline tokens, energies add up, plan-time checks."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from tests.fake_nvml import FakeGpu, fake_nvml
from tests.parallel import run_parallel
from w2w import arrivals as arrivals_mod
from w2w.cell import Cell
from w2w.config import compose_cell, compose_grid, validate
from w2w.errors import ConfigError
from w2w.records import STATUS_OK, read_record
from w2w.serving_stats import StepShare, overloaded, percentile, request_energy, steady_window

# Ragged prompts (6, 2, 4, 9, 3 and 5 tokens); arrivals staggered so that later ones come while earlier ones decode.
PROMPTS = [[1, 5, 9, 12, 7, 30], [1, 44], [1, 3, 3, 8], [1, 9, 8, 7, 6, 5, 4, 3, 2], [1, 60, 61], [1, 20, 21, 22, 23]]
ARRIVAL_S = [0.0, 0.0, 3.0, 4.0, 11.0, 11.5]
MAX_GEN = 12


class TickClock:
    """A clock that moves one tick per reading: the serve loop's timing is deterministic."""

    def __init__(self):
        self.t = 0.0

    def now(self) -> float:
        self.t += 1.0
        return self.t

    def wait(self, seconds: float) -> None:
        self.t += seconds


def _same_tokens(world: int, args_name: str) -> dict:
    import torch

    from tests.test_engines import GQA, MHA, _model
    from w2w import distributed, engines
    from w2w.engines.common import SamplingParams, new_generator
    from w2w.engines.serving import ContinuousBatch, Request

    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(world, world)
    model = _model({"mha": MHA, "gqa": GQA}[args_name], world)
    engine = engines.create("fast", model)
    forced = SamplingParams(max_gen_len=MAX_GEN, greedy=True, force_max_gen_len=True)
    rows = [engine.generate([p], forced, -1, 0).tokens[0] for p in PROMPTS]
    # An EOS that some rows draw midway: the most common token among the rows' 3rd..8th tokens.
    counts = {}
    for row in rows:
        for token in row[2:8]:
            counts[token] = counts.get(token, 0) + 1
    eos = max(counts, key=counts.get)
    params = SamplingParams(max_gen_len=MAX_GEN, greedy=True)
    alone = [engine.generate([p], params, eos, 0).tokens[0] for p in PROMPTS]
    cache_len = max(len(p) for p in PROMPTS) + MAX_GEN
    batch = ContinuousBatch(engine, 2, cache_len, params, eos, new_generator(model.device, 1))
    clock = TickClock()
    decide = distributed.broadcast_int if world > 1 else None
    with torch.inference_mode():
        result = batch.serve([Request(i, p, a) for i, (p, a) in enumerate(zip(PROMPTS, ARRIVAL_S, strict=True))],
                             clock.now, clock.wait, decide)
    return {"alone": alone, "served": [s.tokens for s in result.served],
            "ended": [s.ended_by for s in result.served],
            "overlap": any(s.admit_s < max(o.finish_s for o in result.served if o.index < s.index)
                           for s in result.served[2:]),
            "slots": [s.slot for s in result.served]}


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("args_name", ["mha", "gqa"])
def test_every_request_gets_the_tokens_of_its_prompt_run_alone(world, args_name):
    for out in run_parallel(world, _same_tokens, world, args_name):
        assert out["served"] == out["alone"]
        assert "eos" in out["ended"] and "max_gen_len" in out["ended"]  # rows ending at EOS, and at max_gen_len
        assert out["overlap"]  # a request admitted while an earlier one still decoded
        assert set(out["slots"]) == {0, 1}


# --- arrivals ---

def _serving_cell(*extra: str) -> Cell:
    return compose_cell(["scenario=serving", "precision=fp32", *extra])


def test_arrivals_replay_from_the_cells_seed():
    cell = _serving_cell("serving.rate=4", "dataset.num_prompts=50")
    first, again = arrivals_mod.draw(cell, 50), arrivals_mod.draw(cell, 50)
    other = arrivals_mod.draw(dataclasses.replace(cell, seed=2), 50)
    assert first == again != other
    offsets = [a.offset_s for a in first]
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert [a.row for a in first] == list(range(50))
    burst = arrivals_mod.draw(_serving_cell("serving.rate=4", "serving.arrival=gamma", "serving.cv=3",
                                            "dataset.num_prompts=400"), 400)
    gaps = np.diff([a.offset_s for a in burst])
    assert gaps.std() / gaps.mean() > 2  # burstier than Poisson (cv 1)
    assert {a.offset_s for a in arrivals_mod.draw(_serving_cell("dataset.num_prompts=5"), 5)} == {0.0}  # rate=inf


def test_trace_arrivals_are_read_and_cut_by_duration(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("# offset_s,row\n0.0,2\n0.5,0\n{\"offset_s\": 2.5, \"row\": 1}\n")
    cell = _serving_cell("serving.arrival=trace", f"serving.trace_path={trace}", "dataset.num_prompts=3")
    assert [(a.offset_s, a.row) for a in arrivals_mod.draw(cell, 3)] == [(0.0, 2), (0.5, 0), (2.5, 1)]
    cut = dataclasses.replace(cell, serving=dataclasses.replace(cell.serving, duration_s=1.0))
    assert len(arrivals_mod.draw(cut, 3)) == 2


# --- plan-time checks: one line naming the option and the fix ---

@pytest.mark.parametrize(("overrides", "expected"), [
    (["engine=llama1"], "engine=llama1 runs scenario=offline only"),
    (["engine=llama2"], "use engine=fast"),
    (["serving.rate=0"], "serving.rate=0.0: must be > 0"),
    (["serving.rate=-2"], "serving.rate=-2.0: must be > 0"),
    (["serving.max_slots=0"], "serving.max_slots=0: must be >= 1"),
    (["serving.arrival=uniform"], "serving.arrival=uniform: valid are poisson, gamma, trace"),
    (["serving.ttft_slo_ms=-5"], "serving.ttft_slo_ms=-5.0: must be > 0 ms"),
    (["serving.itl_slo_ms=-1"], "serving.itl_slo_ms=-1.0: must be > 0 ms"),
    (["serving.arrival=trace"], "serving.arrival=trace needs serving.trace_path"),
    (["serving.arrival=trace", "serving.trace_path=/nonexistent/t.csv"], "serving.trace_path=/nonexistent/t.csv: cannot be read"),
    (["scenario=online"], "scenario=online: valid are offline, serving"),
])
def test_bad_serving_values_are_one_line_naming_the_option(overrides, expected):
    with pytest.raises(ConfigError) as info:
        validate(_serving_cell(*[o for o in overrides if not o.startswith("scenario=")])
                 if not any(o.startswith("scenario=") for o in overrides) else compose_cell(overrides))
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("0.0,0\n1.0,1\n0.5,2\n", "offsets are not sorted"),
    ("0.0,0\n1.0,7\n", "names a row the dataset lacks"),
    ("0.0\n", "is not 'offset_s,row'"),
    ("", "has no arrivals"),
])
def test_bad_traces_are_refused_at_plan(tmp_path, text, expected):
    trace = tmp_path / "trace.csv"
    trace.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        validate(_serving_cell("serving.arrival=trace", f"serving.trace_path={trace}", "dataset.num_prompts=3"))


def test_offline_cells_keep_their_ids_and_serving_cells_get_new_ones():
    offline = compose_cell([])
    assert offline.id == compose_cell(["scenario=offline", "serving.max_slots=8"]).id
    serving = {compose_cell(["scenario=serving", f"serving.rate={r}"]).id for r in ("inf", "1", "2")}
    assert len(serving) == 3 and offline.id not in serving


# --- the figures: energy rule, steady state, overload ---

def test_request_energies_sum_to_the_cells_and_follow_positions():
    steps = [StepShare(1.0, {0: 6}), StepShare(2.0, {0: 1, 1: 1}), StepShare(4.0, {1: 1})]
    shares = request_energy(steps, 100.0)
    assert sum(shares.values()) == pytest.approx(100.0, rel=1e-12)
    assert shares[0] == pytest.approx(25.0 + 12.5) and shares[1] == pytest.approx(12.5 + 50.0)


def _line(arrival, admit, finish):
    return {"arrival_s": arrival, "admit_s": admit, "first_token_s": admit + 0.1, "finish_s": finish,
            "token_s": [admit + 0.1, finish]}


def test_steady_window_is_all_slots_busy_to_the_last_arrival():
    lines = [_line(0, 0, 3), _line(1, 1, 4), _line(2, 3, 6), _line(2.5, 4, 7)]
    assert steady_window(lines, 2, 0) == (1, 2.5, "all slots busy")
    assert steady_window(lines, 3, 1) == (1, 2.5, "arrivals after warm-up")


def test_a_queue_that_keeps_growing_is_overload():
    steady = [_line(t, t, t + 1) for t in range(9)]
    growing = [_line(0, 3 * t, 3 * t + 1) for t in range(9)]  # all at t = 0, one slot
    assert not overloaded(steady) and overloaded(growing)


# --- through the runner: fake NVML at a known power, one and two ranks ---

ACTIVE_W = [150.0, 210.0]


def _rank(cells: list[Cell]) -> list[str]:
    from w2w import runner
    from w2w.energy.monitor import EnergyMonitor

    gpus = [FakeGpu(uuid=f"GPU-{i}", power_w=ACTIVE_W[i]) for i in range(2)]
    nvml = fake_nvml(gpus)

    class InjectedMonitor(EnergyMonitor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, nvml=nvml, **kwargs)

    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    with mock.patch.object(runner, "EnergyMonitor", InjectedMonitor):
        return runner.run_cells(cells)


def _run_serving(tmp_path: Path, shards: int, *extra: str) -> tuple[list[dict], list[dict]]:
    sweep = tmp_path / "sweep"
    cells = compose_grid(["scenario=serving", "precision=fp32", "max_gen_len=8", "dataset.num_prompts=6", "serving.num_requests=8",
                          f"shards={shards}", f"sweep_dir={sweep}", "energy.idle_seconds=0.2", "energy.rapl=false",
                          "energy.sample_interval_s=0.02", "serving.max_slots=3", "serving.itl_slo_ms=1000",
                          "serving.ttft_slo_ms=5000", "dataset=gsm8k", f"dataset.path={GSM8K}", *extra])
    statuses = run_parallel(shards, _rank, cells)
    assert statuses == [[STATUS_OK]] * shards
    folder = next((sweep / "cells").iterdir())
    records = [read_record(p).to_dict() for p in sorted(folder.glob("rank-*.json"))]
    lines = [json.loads(line) for line in (folder / "responses.jsonl").read_text().splitlines()]
    return records, lines


GSM8K = Path(__file__).parent / "data" / "gsm8k_rows.jsonl"


@pytest.mark.parametrize("shards", [1, 2])
def test_energies_add_up_and_percentiles_follow_from_the_timestamps(tmp_path, shards):
    records, lines = _run_serving(tmp_path, shards, "serving.rate=50")
    assert len(lines) == 8 and all(line["finish_s"] >= line["first_token_s"] >= line["admit_s"] >= line["arrival_s"]
                                   for line in lines)
    cell_j = sum(r["energy"]["gpu_j"] for r in records)
    for record, watts in zip(records, ACTIVE_W, strict=False):
        assert record["energy"]["gpu_j"] == pytest.approx(watts * record["times"]["total_s"], rel=3e-2)
    total = sum(line["energy_j"] for line in lines)
    assert abs(total - cell_j) / cell_j < 1e-9
    idle_j = sum(r["energy"]["idle_gpu_j"] for r in records)
    above = sum(line["energy_above_idle_j"] for line in lines)
    assert abs(above - (cell_j - idle_j)) / (cell_j - idle_j) < 1e-9
    whole = records[0]["serving"]["whole"]
    itl_ms = [1e3 * g for line in lines for g in np.diff(line["token_s"])]
    for q in (50, 90, 99):
        assert whole[f"itl_p{q}_ms"] == pytest.approx(np.percentile(itl_ms, q), rel=1e-12)
        if not records[0]["serving"]["overloaded"]:
            ttft = [1e3 * (line["first_token_s"] - line["arrival_s"]) for line in lines]
            assert whole[f"ttft_p{q}_ms"] == pytest.approx(np.percentile(ttft, q), rel=1e-12)
    assert whole["j_per_request"] == pytest.approx(cell_j / 8)
    assert whole["j_per_output_token"] == pytest.approx(cell_j / sum(line["output_tokens"] for line in lines))
    assert records[0]["counts"]["responses"] == 8 and records[0]["serving"]["scored"] == 8
    # The report's table reads the same figures (one run: the mean is the run's figure).
    from w2w.analysis.serving import load_points

    (point,) = load_points(tmp_path / "sweep")
    serving = records[0]["serving"]
    assert point.itl_p90_ms.mean == serving[point.window]["itl_p90_ms"]
    assert point.j_per_output_token.mean == serving[point.window]["j_per_output_token"]


def test_percentile_is_numpys_linear_rule():
    values = [3.0, 1.0, 7.5, 2.0, 9.0]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_the_bench_prints_the_ratio_and_the_step_adds_only_the_rings_bookkeeping(capsys):
    from w2w.bench.serving_vs_offline import main

    assert main(["--device", "cpu", "--dtype", "fp32", "--dim", "64", "--layers", "2", "--heads", "4", "--kv-heads",
                 "2", "--vocab", "128", "--slots", "2", "--batches", "2", "--prompt-len", "6", "--new-tokens", "4",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "ratio serving/offline: " in out
    # The layers' operators are fast's own; the ring wraps its column and clamps idle rows' positions,
    # where offline writes its output column (index_copy_ of an unsqueezed row) and advances it.
    assert "serving only: {'remainder_': 1, 'clamp_': 1}" in out
    assert "offline only: {'unsqueeze': 1, 'index_copy_': 1, 'add_': 1}" in out


@pytest.mark.slurm
@pytest.mark.usefixtures("local_slurm")
def test_a_serving_sweep_on_the_local_slurm_two_rates_two_slot_counts_two_shards(tmp_path):
    from tests.conftest import cli

    sweep = tmp_path / "sweep"
    out = cli("w2w.launch.sweep", "--wait", "--poll", "1", "cluster=local_slurm", "gpu=cpu", "precision=fp32",
              "dist_timeout_s=60", "shards=2", "scenario=serving", "greedy=true", "max_gen_len=4",
              "dataset.num_prompts=6", "serving.rate=20,inf", "serving.max_slots=2,3", "energy.idle_seconds=0",
              f"sweep_dir={sweep}").stdout
    assert "4 done, 0 failed" in out, out
    records = [read_record(p).to_dict() for p in sorted(sweep.glob("cells/*/rank-*.json"))]
    assert len(records) == 8 and {r["node"] for r in records} == {"n1", "n2"}
    assert all(r["status"] == STATUS_OK for r in records)
    assert cli("w2w.analysis.reduce", str(sweep)).returncode == 0
    table = cli("w2w.analysis.serving", str(sweep)).stdout
    print(table)
    assert table.count("| r=") == 4 and "s=2" in table


def _preempted_serving(sweep: Path, preempt: bool) -> str:
    from w2w import runner
    from w2w.engines.serving import ContinuousBatch

    real = ContinuousBatch.serve

    def serve(self, requests, now, wait, decide=None):
        if preempt and self.params.max_gen_len == 6:  # the cell's serve, not its warm-up's
            raise SystemExit("preempted")  # what submitit's USR2 handler raises
        return real(self, requests, now, wait, decide)

    ContinuousBatch.serve = serve  # this process only: run_parallel starts one per rank
    try:
        return runner.run_cells(compose_grid(["scenario=serving", "precision=fp32", "max_gen_len=6", "greedy=true",
                                              "dataset.num_prompts=4", f"sweep_dir={sweep}"]))
    except SystemExit:
        return "preempted"


def test_a_preempted_serving_cell_restarts_whole_and_says_so(tmp_path):
    sweep = tmp_path / "sweep"
    assert run_parallel(1, _preempted_serving, sweep, True) == ["preempted"]
    assert run_parallel(1, _preempted_serving, sweep, False) == [[STATUS_OK]]
    folder = next((sweep / "cells").iterdir())
    record = read_record(folder / "rank-00000.json")
    assert record.serving["restarted_whole"] == 1 and record.serving["requests"] == 4
    assert len(record.segments) == 1  # the figures are the whole second attempt's
    assert len((folder / "responses.jsonl").read_text().splitlines()) == 4


def test_the_cheapest_cell_meets_the_target_at_its_upper_bound_and_is_not_overloaded():
    from w2w.analysis.serving import Point, cheapest, on_frontier
    from w2w.analysis.stats import Summary

    def point(cid, itl, itl_ci, j, overloaded=False):
        s = Summary(j, None, 1, None)
        return Point(cid, 1.0, 2, 1, None, "fast", "steady", s, Summary(itl, None, 2, itl_ci), s, s, s, s,
                     overloaded, (), None)

    points = [point("a", 40, 20, 5.0), point("b", 45, 1, 7.0), point("c", 30, 1, 1.0, overloaded=True),
              point("d", 200, 1, 2.0)]
    assert cheapest(points, 50, "j_per_request").cell_id == "b"  # a's interval reaches 60 ms; c's queue grew
    assert cheapest(points, 250, "j_per_request").cell_id == "d"
    assert cheapest(points, 10, "j_per_request") is None
    assert on_frontier(points) == {"c"}  # c (30 ms, 1 J) beats every other cell on both axes


def test_the_frontiers_bars_and_table_use_the_interval_that_fits_never_below_zero():
    """Two skewed repeats: the t interval of J/token would reach below zero (a log axis draws it across
    the figure); the frontier's bars and table take the median's interval from the runs instead."""
    from w2w.analysis.serving import _bars, _fmt
    from w2w.analysis.stats import summarize

    skewed = summarize([0.2, 3.0])
    assert skewed.mean - skewed.ci95 < 0  # what the t interval alone would draw
    (low,), (high,) = _bars([skewed])
    assert skewed.mean - low == pytest.approx(0.2) and skewed.mean + high == pytest.approx(3.0)
    assert _fmt(skewed) == "med 1.6 [0.2, 3]"
