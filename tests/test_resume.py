"""A cell preempted between batches resumes at its first unfinished batch (gloo ranks, no SLURM)."""

from __future__ import annotations

import json

import pytest
from w2w.analysis.reduce import reduce_sweep

from tests.parallel import run_parallel
from w2w.config import compose_grid
from w2w.progress import CellProgress, CellShape, progress_path, streams_path
from w2w.records import Batch, BatchTimes, Segment, read_record, record_path

MAX_GEN_LEN = 6  # not the warm-up's length: the fake below tells the two apart


def _cells(sweep, *extra: str):
    return compose_grid(["shards=2", "precision=fp32", f"max_gen_len={MAX_GEN_LEN}",
                         "dataset.num_prompts=8", "batch_size=2", "dist_timeout_s=20", f"sweep_dir={sweep}", *extra])


def _run(sweep, preempt_after: int | None, *extra: str) -> tuple[object, list[str], list[tuple[int, bytes]]]:
    """run_cells, stopped by SystemExit (what submitit's USR2 handler raises) before a batch; also the
    sampling stream each call got: (its object's id, its state as the call began)."""
    from w2w import runner
    from w2w.engines import fast

    real, calls, streams = fast.Engine.generate, [], []

    def generate(self, prompts, params, eos_id, pad_id, cache_len=None, clock=None, generator=None, **kwargs):
        kind = "batch" if params.max_gen_len == MAX_GEN_LEN else "warmup"
        if kind == "batch" and calls.count("batch") == preempt_after:
            raise SystemExit("preempted")
        calls.append(kind)
        streams.append((id(generator), bytes(generator.get_state().tolist())))
        return real(self, prompts, params, eos_id, pad_id, cache_len, clock, generator, **kwargs)

    fast.Engine.generate = generate  # this process only: run_parallel starts one per rank
    try:
        return runner.run_cells(_cells(sweep, *extra)), calls, streams
    except SystemExit:
        return "preempted", calls, streams


@pytest.mark.parametrize("sampling", ["greedy=true", "temperature=1.5"])
def test_a_preempted_cell_runs_only_its_unfinished_batches_and_matches_an_uninterrupted_run(tmp_path, sampling):
    """Greedy, and sampled: the cell's one stream resumes where its finished batches left it."""
    sweep, reference = tmp_path / "sweep", tmp_path / "reference"
    save = ("save_responses=true", sampling)  # the responses of batches run before the preemption are kept too
    cid = _cells(sweep, *save)[0].id
    for outcome, calls, _ in run_parallel(2, _run, sweep, 2, *save):
        assert outcome == "preempted" and calls == ["warmup", "batch", "batch"]
    for rank in (0, 1):
        assert not record_path(sweep, cid, rank).exists()
        saved = json.loads(progress_path(sweep, cid, rank).read_text())
        assert [b["index"] for b in saved["batches"]] == [0, 1]

    resumed_streams, whole_streams = [], []
    for outcome, calls, streams in run_parallel(2, _run, sweep, None, *save):
        assert outcome == ["ok"] and calls == ["warmup", "batch", "batch"]  # warmed up again; 2 of 4 batches
        resumed_streams.append(streams)
    for outcome, calls, streams in run_parallel(2, _run, reference, None, *save):
        assert outcome == ["ok"] and calls == ["warmup", "batch", "batch", "batch", "batch"]
        whole_streams.append(streams)
    for resumed_calls, whole_calls in zip(resumed_streams, whole_streams, strict=True):
        (warmup, _), *batches = whole_calls
        assert len({stream for stream, _ in batches}) == 1 and warmup != batches[0][0]  # one stream; warm-up's own
        assert batches[0][1] == whole_calls[0][1]  # the warm-up drew nothing from the cell's stream
        if sampling != "greedy=true":
            assert len({state for _, state in batches}) == 4  # each batch draws on from where the last stopped
        assert [state for _, state in resumed_calls[1:]] == [state for _, state in batches[2:]]  # restored

    for rank in (0, 1):
        resumed, whole = (read_record(record_path(d, cid, rank)).to_dict() for d in (sweep, reference))
        assert not progress_path(sweep, cid, rank).exists()  # the record holds the batches now
        assert [(b["index"], b["segment"]) for b in resumed["batches"]] == [(0, 0), (1, 0), (2, 1), (3, 1)]
        assert [s["first_batch"] for s in resumed["segments"]] == [0, 2]
        assert all(s["warmup_s"] > 0 and "idle_power_w" in s for s in resumed["segments"])
        assert len(whole["segments"]) == 1
        for key in ("prompts", "responses", "prompt_tokens", "output_tokens", "output_words", "batches"):
            assert resumed["counts"][key] == whole["counts"][key], key
        assert resumed["counts"]["batches"] == 4 and resumed["counts"]["output_tokens"] > 0
        total = sum(b["times"]["total_s"] for b in resumed["batches"])
        assert abs(resumed["times"]["total_s"] - total) < 1e-9

    resumed_lines = (sweep / "cells" / cid / "responses.jsonl").read_text().splitlines()
    assert resumed_lines == (reference / "cells" / cid / "responses.jsonl").read_text().splitlines()
    assert [json.loads(line)["prompt_id"] for line in resumed_lines] == list(range(8))
    assert not list((sweep / "cells" / cid).glob("*.part.jsonl"))

    row = reduce_sweep(sweep).iloc[0]
    ref_row = reduce_sweep(reference).iloc[0]
    assert row["status"] == "ok" and row["segments"] == 2 and ref_row["segments"] == 1
    assert row["output_tokens"] == ref_row["output_tokens"] and row["responses"] == ref_row["responses"] == 8


def _shape(**changes) -> CellShape:
    return CellShape(**({"cell_id": "c", "rank": 0, "world_size": 2, "batch_size": 2, "num_batches": 4} | changes))


def _saved(tmp_path, batches: int) -> CellProgress:
    progress = CellProgress(_shape(), tmp_path / "progress-rank-00000.json")
    progress.begin_segment(Segment(segment=0, idle_power_w=50.0))
    for _ in range(batches):
        progress.add_batch(Batch(index=0, segment=0, times=BatchTimes(start_unix_s=0.0, total_s=1.0)))
    return progress


def test_progress_resumes_only_what_matches_this_cell_and_batching(tmp_path):
    saved = _saved(tmp_path, 3)
    assert CellProgress.load(saved.path, _shape()).done == 3
    assert CellProgress.load(saved.path, _shape(batch_size=4, num_batches=2)).done == 0  # other batching
    assert CellProgress.load(saved.path, _shape(world_size=4)).done == 0
    data = json.loads(saved.path.read_text())
    data["batches"][1]["index"] = 7  # a gap: only the run of batches from the first counts
    saved.path.write_text(json.dumps(data))
    assert CellProgress.load(saved.path, _shape()).done == 1
    saved.path.write_text('{"version": 1, "shape": {"cell_id"')  # not what write_json leaves, but a hand edit
    assert CellProgress.load(saved.path, _shape()).done == 0


def test_ranks_agree_on_the_fewest_finished_batches_and_a_new_segment_follows(tmp_path):
    progress = CellProgress.load(_saved(tmp_path, 3).path, _shape())
    progress.resume_at(1)  # another rank had finished only one batch
    progress.begin_segment(Segment(segment=0, idle_power_w=60.0))
    progress.add_batch(Batch(index=0, segment=0, times=BatchTimes(start_unix_s=1.0, total_s=2.0)))
    again = CellProgress.load(progress.path, _shape())
    assert [(b.index, b.segment) for b in again.batches] == [(0, 0), (1, 1)]
    assert [(s.segment, s.first_batch, s.idle_power_w) for s in again.segments] == [(0, 0, 50.0), (1, 1, 60.0)]


ACTIVE_W = 150.0  # each fake GPU's draw while the model runs
IDLE_W = (40.0, 60.0)  # ... at rest, in the first and in the second segment


def _run_metered(sweep, preempt_after: int | None, segment: int) -> tuple[object, list[str]]:
    """_run with a fake NVML GPU behind the runner's meter; its idle draw differs per segment."""
    import os
    from unittest import mock

    from tests.fake_nvml import FakeGpu, fake_nvml
    from w2w import runner
    from w2w.energy.monitor import EnergyMonitor

    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    gpus = [FakeGpu(uuid=f"GPU-{i}", power_w=ACTIVE_W) for i in range(2)]
    gpu, nvml = gpus[int(os.environ["RANK"])], fake_nvml(gpus)

    class Metered(EnergyMonitor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, nvml=nvml, **kwargs)

        def measure_idle(self, seconds):
            gpu.set_power(IDLE_W[segment], self._clock())
            try:
                return super().measure_idle(seconds)
            finally:
                gpu.set_power(ACTIVE_W, self._clock())

    with mock.patch.object(runner, "EnergyMonitor", Metered):
        return _run(sweep, preempt_after, "greedy=true", "energy.idle_seconds=0.3", "energy.rapl=false")


def test_a_resumed_cell_sums_the_energy_windows_of_its_batches_at_each_segments_idle_power(tmp_path):
    sweep = tmp_path / "sweep"
    for outcome, *_ in run_parallel(2, _run_metered, sweep, 1, 0):
        assert outcome == "preempted"
    for outcome, *_ in run_parallel(2, _run_metered, sweep, None, 1):
        assert outcome == ["ok"]
    cid = _cells(sweep, "greedy=true", "energy.idle_seconds=0.3", "energy.rapl=false")[0].id
    for rank in (0, 1):
        record = read_record(record_path(sweep, cid, rank)).to_dict()
        batches, energy = record["batches"], record["energy"]
        assert [b["segment"] for b in batches] == [0, 1, 1, 1]
        assert [s["idle_power_w"] for s in record["segments"]] == [pytest.approx(w, rel=0.05) for w in IDLE_W]
        assert energy["gpu_j"] == pytest.approx(sum(b["energy"]["gpu_j"] for b in batches), rel=1e-12)
        assert energy["gpu_j"] == pytest.approx(ACTIVE_W * record["times"]["total_s"], rel=0.05)
        for phase in ("prefill_gpu_j", "decode_gpu_j"):
            assert energy[phase] == pytest.approx(sum(b["energy"][phase] for b in batches), rel=1e-12)
        idle = sum(IDLE_W[b["segment"]] * b["times"]["total_s"] for b in batches)
        assert energy["idle_gpu_j"] == pytest.approx(idle, rel=0.05)
    row = reduce_sweep(sweep).iloc[0]
    assert row["segments"] == 2
    records = [read_record(record_path(sweep, cid, rank)).to_dict() for rank in (0, 1)]
    assert row["energy_j"] == pytest.approx(sum(r["energy"]["gpu_j"] for r in records), rel=1e-12)
    above = sum(r["energy"]["gpu_j"] - r["energy"]["idle_gpu_j"] for r in records)
    assert row["energy_j_above_idle"] == pytest.approx(above, rel=1e-9)


def test_every_batchs_sampling_state_is_kept_so_an_earlier_resume_samples_exactly(tmp_path):
    # Issue 28: only the last two states were kept, so resuming earlier (a deleted response part, a rank
    # that got less far, a gap in the batch indices) restarted the stream and sampled other tokens.
    progress = CellProgress(_shape(), tmp_path / "progress-rank-00000.json")
    progress.begin_segment(Segment(segment=0, idle_power_w=50.0))
    for n in range(4):
        progress.add_batch(Batch(index=0, segment=0, times=BatchTimes(start_unix_s=0.0, total_s=1.0)),
                           stream_state=f"state-after-{n + 1}")
    earlier = CellProgress.load(progress.path, _shape())
    earlier.resume_at(1)
    assert earlier.stream_state == "state-after-1"
    data = json.loads(progress.path.read_text())
    data["batches"][2]["index"] = 9  # a gap after two batches
    progress.path.write_text(json.dumps(data))
    gapped = CellProgress.load(progress.path, _shape())
    assert gapped.done == 2 and gapped.stream_state == "state-after-2"


def test_a_resume_without_a_saved_sampling_state_is_recorded_in_the_cell_the_table_and_status(tmp_path):
    # Issue 28: a progress file without the stream's state (an older w2w's kept only the last two) restarted
    # sampling with a line in the job log only; the record, the cells table and w2w-status now say so.
    from w2w.launch.status import run_records

    sweep = tmp_path / "sweep"
    sampled = ("temperature=1.5",)
    cid = _cells(sweep, *sampled)[0].id
    for outcome, _, _ in run_parallel(2, _run, sweep, 2, *sampled):
        assert outcome == "preempted"
    for rank in (0, 1):
        path = progress_path(sweep, cid, rank)
        path.write_text(json.dumps(json.loads(path.read_text()) | {"stream_states": {}}))
        streams_path(path).unlink()  # as an older w2w left it: no side file
    for outcome, _, _ in run_parallel(2, _run, sweep, None, *sampled):
        assert outcome == ["ok"]
    record = read_record(record_path(sweep, cid, 0))
    assert [s.sampling_restarted for s in record.segments] == [None, True] and record.segments[1].first_batch == 2
    row = reduce_sweep(sweep).iloc[0]
    assert row["sampling_note"].startswith("sampling restarted at batch(es) [2]")
    assert run_records(sweep, cid, 2)[1].endswith("sampling restarted at batch(es) [2] (no stream state saved)")


def test_the_first_save_of_a_run_makes_its_folder(tmp_path):
    progress = CellProgress(_shape(), progress_path(tmp_path, "c", 0, repeat=1))  # repeat-1/ does not exist yet
    progress.begin_segment(Segment(segment=0))
    progress.add_batch(Batch(index=0, segment=0, times=BatchTimes(start_unix_s=0.0, total_s=1.0)), stream_state="s1")
    assert CellProgress.load(progress.path, _shape()).stream_state == "s1"
