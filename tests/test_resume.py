"""A cell preempted between batches resumes at its first unfinished batch (gloo ranks, no SLURM)."""

from __future__ import annotations

import json

from w2w.analysis.reduce import reduce_sweep

from tests.parallel import run_parallel
from w2w.config import cell_id, compose_grid
from w2w.progress import CellProgress, CellShape, progress_path
from w2w.records import read_record, record_path

MAX_GEN_LEN = 6  # not the warm-up's length: the fake below tells the two apart


def _cells(sweep):
    return compose_grid(["shards=2", "precision=fp32", f"max_gen_len={MAX_GEN_LEN}", "greedy=true",
                         "dataset.num_prompts=8", "batch_size=2", "dist_timeout_s=20", f"sweep_dir={sweep}"])


def _run(sweep, preempt_after: int | None) -> tuple[object, list[str]]:
    """run_cells, stopped by SystemExit (what submitit's USR2 handler raises) before a batch."""
    from w2w import runner

    real, calls = runner.generate, []

    def generate(model, prompts, params, *args, **kwargs):
        kind = "batch" if params.max_gen_len == MAX_GEN_LEN else "warmup"
        if kind == "batch" and calls.count("batch") == preempt_after:
            raise SystemExit("preempted")
        calls.append(kind)
        return real(model, prompts, params, *args, **kwargs)

    runner.generate = generate
    try:
        return runner.run_cells(_cells(sweep)), calls
    except SystemExit:
        return "preempted", calls


def test_a_preempted_cell_runs_only_its_unfinished_batches_and_matches_an_uninterrupted_run(tmp_path):
    sweep, reference = tmp_path / "sweep", tmp_path / "reference"
    cid = cell_id(_cells(sweep)[0])
    for outcome, calls in run_parallel(2, _run, sweep, 2):
        assert outcome == "preempted" and calls == ["warmup", "batch", "batch"]
    for rank in (0, 1):
        assert not record_path(sweep, cid, rank).exists()
        saved = json.loads(progress_path(sweep, cid, rank).read_text())
        assert [b["index"] for b in saved["batches"]] == [0, 1]

    for outcome, calls in run_parallel(2, _run, sweep, None):
        assert outcome == ["ok"] and calls == ["warmup", "batch", "batch"]  # warmed up again; 2 of 4 batches
    for outcome, calls in run_parallel(2, _run, reference, None):
        assert outcome == ["ok"] and calls == ["warmup", "batch", "batch", "batch", "batch"]

    for rank in (0, 1):
        resumed, whole = read_record(record_path(sweep, cid, rank)), read_record(record_path(reference, cid, rank))
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

    row = reduce_sweep(sweep).iloc[0]
    ref_row = reduce_sweep(reference).iloc[0]
    assert row["status"] == "ok" and row["segments"] == 2 and ref_row["segments"] == 1
    assert row["output_tokens"] == ref_row["output_tokens"] and row["responses"] == ref_row["responses"] == 8


def _shape(**changes) -> CellShape:
    return CellShape(**({"cell_id": "c", "rank": 0, "world_size": 2, "batch_size": 2, "num_batches": 4} | changes))


def _saved(tmp_path, batches: int) -> CellProgress:
    progress = CellProgress(_shape(), tmp_path / "progress-rank-00000.json")
    progress.begin_segment({"idle_power_w": 50.0})
    for _ in range(batches):
        progress.add_batch({"counts": {}, "times": {"start_unix_s": 0.0, "total_s": 1.0}, "energy": {}})
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
    progress.begin_segment({"idle_power_w": 60.0})
    progress.add_batch({"counts": {}, "times": {"start_unix_s": 1.0, "total_s": 2.0}, "energy": {}})
    again = CellProgress.load(progress.path, _shape())
    assert [(b["index"], b["segment"]) for b in again.batches] == [(0, 0), (1, 1)]
    assert [(s["segment"], s["first_batch"]) for s in again.segments] == [(0, 0), (1, 1)]
