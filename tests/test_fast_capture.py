"""The fast engine around its capture: a failed capture falls back to eager, every batch shape is
warmed up outside the cell's windows, a dead peer ends the cell with an error, not a hang."""

from __future__ import annotations

import time

import pytest
import torch

from tests.parallel import run_parallel
from w2w import distributed, engines
from w2w.config import compose_grid
from w2w.engines import fast
from w2w.engines.common import SamplingParams
from w2w.model import ModelArgs, build_model, random_state_dict
from w2w.records import read_record, record_path

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=128)
PROMPTS = [[1, 5, 9, 12, 7, 30], [1, 44], [1, 3, 3, 8]]
GREEDY = SamplingParams(max_gen_len=8, greedy=True, force_max_gen_len=True)


@pytest.fixture(scope="module")
def model():
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(1, 1)
    return build_model(ARGS, random_state_dict(ARGS, 5), torch.device("cpu"), torch.float32)


def test_a_failed_capture_falls_back_to_eager_once_and_says_why(model):
    calls = []

    def failing(step):
        calls.append(step)
        raise RuntimeError("operation not permitted when stream is capturing")

    eager = engines.create("fast", model).generate(PROMPTS, GREEDY, 2, 0).tokens
    engine = fast.Engine(model, capture=failing)
    assert engine.generate(PROMPTS, GREEDY, 2, 0).tokens == eager
    assert engine.generate(PROMPTS, GREEDY, 2, 0).tokens == eager  # the same decoder: no second try
    assert len(calls) == 1
    assert engine.graph == "eager, capture failed: RuntimeError: operation not permitted when stream is capturing"


def _capture_failing_midway(calls: list):
    """A capture that runs the step until its 12th torch call, then fails: what a sync inside a CUDA
    capture does (the calls before it have written the mask and the first layer's cache slot)."""
    from w2w.gpu_accept import SyncMidway

    def capture(step):
        calls.append(step)
        with SyncMidway(after=12):
            step()
        raise AssertionError("the step should have failed midway")

    return capture


def test_a_capture_that_fails_midway_leaves_the_tokens_of_the_eager_path(model):
    calls: list = []
    eager = engines.create("fast", model).generate(PROMPTS, GREEDY, 2, 0).tokens
    engine = fast.Engine(model, capture=_capture_failing_midway(calls))
    assert engine.generate(PROMPTS, GREEDY, 2, 0).tokens == eager
    assert len(calls) == 1
    assert engine.graph.startswith("eager, capture failed: RuntimeError: ") and "capturing" in engine.graph
    assert engine.decode_path == engine.graph  # the report says why it is eager


def test_after_a_failed_capture_no_other_shape_captures_again(model, caplog):
    """One fallback for the engine, said once: a new batch shape (and a new cache) runs eagerly with no capture."""
    calls: list = []
    caplog.set_level("WARNING", logger="w2w.run")
    engine = fast.Engine(model, capture=_capture_failing_midway(calls))
    engine.generate(PROMPTS, GREEDY, 2, 0)
    first = engine.graph
    other_shape = [PROMPTS[0], PROMPTS[2]]
    longer = SamplingParams(max_gen_len=70, greedy=True, force_max_gen_len=True)  # a cache of 128 slots, not 64
    eager = engines.create("fast", model)
    for prompts, params in ((other_shape, GREEDY), (PROMPTS, longer)):
        assert engine.generate(prompts, params, 2, 0).tokens == eager.generate(prompts, params, 2, 0).tokens
    assert len(calls) == 1 and engine.decoders_built == 3 and engine.graph == first
    said = [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()]
    assert said == [f"fast: {first}; this engine's decode steps run eagerly from now on, every shape"]


def test_the_end_of_a_forced_decode_waits_under_the_eos_check_deadline(model, monkeypatch):
    """With force_max_gen_len there is no EOS check: the last wait, for every step, has the deadline."""
    class NeverDone:  # a CUDA event behind a collective whose peer died
        def record(self):
            pass

        def query(self):
            return False

    monkeypatch.setattr(fast, "new_event", lambda device: NeverDone())
    params = SamplingParams(max_gen_len=4, greedy=True, force_max_gen_len=True, deadline_s=0.2)
    with pytest.raises(fast.DecodeTimeout, match=r"Timed out: decode steps unfinished after 0\.2 s"):
        fast.Engine(model).generate(PROMPTS, params, 2, 0)


def test_a_capture_replays_the_recorded_step(model):
    """A stand-in capture (the step itself) exercises the replay path on the CPU."""
    eager = engines.create("fast", model).generate(PROMPTS, GREEDY, 2, 0).tokens
    engine = fast.Engine(model, capture=lambda step: step)
    assert engine.generate(PROMPTS, GREEDY, 2, 0).tokens == eager
    assert engine.graph == "cuda graph" and engines.create("fast", model).graph == "eager"


def test_the_eos_check_deadline_raises_instead_of_waiting_forever():
    class NeverDone:  # a CUDA event behind a collective whose peer died
        def record(self):
            pass

        def query(self):
            return False

    start = time.monotonic()
    with pytest.raises(fast.DecodeTimeout, match=r"Timed out: decode steps unfinished after 0\.2 s"):
        fast.wait_for(NeverDone(), 0.2)
    assert time.monotonic() - start < 2


def _cells(sweep):
    # 5 prompts in batches of 2: the last batch has one row, a shape of its own.
    return compose_grid(["shards=1", "precision=fp32", "max_gen_len=6", "dataset.num_prompts=5", "batch_size=2",
                         "dist_timeout_s=10", f"sweep_dir={sweep}"])


def _decoders_built_per_batch(sweep) -> tuple[list[int], list[int]]:
    """run_cells, counting the fast decoders (a capture each on a GPU) built inside each batch's window."""
    from w2w import measure, runner

    real, during, sizes = measure._run_batch, [], []

    def run_batch(run, batch, responses):
        engine = run.loaded.engines[run.cell.engine]
        before = engine.decoders_built
        out = real(run, batch, responses)
        during.append(engine.decoders_built - before)
        sizes.append(len(batch))
        return out

    measure._run_batch = run_batch  # this process only: run_parallel starts one per rank
    runner.run_cells(_cells(sweep))
    return during, sizes


def test_every_batch_shape_is_warmed_up_outside_the_cell_windows(tmp_path):
    [(during, sizes)] = run_parallel(1, _decoders_built_per_batch, tmp_path)
    assert sizes == [2, 2, 1] and during == [0, 0, 0]
    record = read_record(record_path(tmp_path, _cells(tmp_path)[0].id, 0))
    assert record.status == "ok" and record.graph == "eager"  # no capture on the CPU


def _one_rank_stops(stop_rank: int) -> tuple[str, float]:
    """Rank stop_rank stops answering inside a layer of its third decode step; the other's error and wait.
    (FairScale's own gathers, embedding and output, are bound by its group's timeout instead.)"""
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(2, 2)
    rank = torch.distributed.get_rank()
    model = build_model(ARGS, random_state_dict(ARGS, 5, rank, 2), torch.device("cpu"), torch.float32)
    engine = fast.Engine(model)
    real, calls = engine.fused.project, []

    def project(*args):
        calls.append(1)  # 2 per layer, 2 layers: the prefill makes none, each step 4
        if rank == stop_rank and len(calls) == 2 * 4 + 1:
            time.sleep(12)  # alive but silent: its peer's all-reduce gets no answer
        return real(*args)

    engine.fused.project = project
    start = time.monotonic()
    try:
        engine.generate(PROMPTS, SamplingParams(max_gen_len=8, greedy=True, deadline_s=4.0), 2, 0)
    except RuntimeError as exc:
        return f"{type(exc).__name__}: {exc}", time.monotonic() - start
    return "finished", time.monotonic() - start


@pytest.mark.slow
def test_a_peer_that_stops_answering_ends_the_decode_with_an_error(tmp_path):
    results = run_parallel(2, _one_rank_stops, 1)
    error, waited = results[0]
    assert error.startswith("DecodeTimeout: decode step 3: a model-parallel peer stopped answering"), error
    assert distributed.is_collective_error(RuntimeError(error))  # the runner then stops the job
    assert waited < 25  # bounded by dist_timeout_s (4 s here), not by the silent peer


def test_one_decoder_and_its_graph_serve_every_sampling_setting(model):
    """Temperature and top-p are read from device tensors: a second setting replays the same graph."""
    settings = [SamplingParams(max_gen_len=8, temperature=t, top_p=p, seed=3, force_max_gen_len=True)
                for t, p in ((0.8, 0.95), (1.3, 0.5))]
    alone = [fast.Engine(model, capture=lambda step: step).generate(PROMPTS, s, 2, 0).tokens for s in settings]
    engine = fast.Engine(model, capture=lambda step: step)
    shared = [engine.generate(PROMPTS, s, 2, 0).tokens for s in settings]
    assert shared == alone and alone[0] != alone[1]
    assert engine.decoders_built == 1 and engine.graph == "cuda graph"
