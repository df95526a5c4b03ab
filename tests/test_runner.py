"""The runner on several gloo ranks: records, resumption, and failures inside a job."""

from __future__ import annotations

import time

import pytest

from tests.conftest import cli
from tests.parallel import run_parallel
from w2w.config import compose_grid
from w2w.records import read_record, record_path


def _cells(sweep, *extra):
    return compose_grid(["shards=2", "precision=fp32", "max_gen_len=4", "dataset.num_prompts=4", "batch_size=2,4",
                         "dist_timeout_s=10", f"sweep_dir={sweep}", *extra])


def _run_with_failure(sweep, failing_ranks: list[int], failing_batch: int) -> tuple[list[str] | None, str | None]:
    """run_cells where the fast engine's generate raises on the given ranks for cells of one batch size."""
    import torch.distributed as dist

    from w2w import runner
    from w2w.engines import fast

    real = fast.Engine.generate

    def generate(self, prompts, params, *args, **kwargs):
        if dist.get_rank() in failing_ranks and len(prompts) == failing_batch and params.max_gen_len == 4:
            raise ValueError(f"injected failure on rank {dist.get_rank()}")
        return real(self, prompts, params, *args, **kwargs)

    fast.Engine.generate = generate  # this process only: run_parallel starts one per rank
    try:
        return runner.run_cells(_cells(sweep)), None
    except RuntimeError as exc:
        return None, str(exc)


def test_a_failure_on_every_rank_is_recorded_and_the_job_goes_on(tmp_path):
    results = run_parallel(2, _run_with_failure, tmp_path, [0, 1], 2)
    for statuses, error in results:
        assert error is None and statuses == ["error", "ok"]
    first = _cells(tmp_path)[0]
    for rank in (0, 1):
        record = read_record(record_path(tmp_path, first.id, rank))
        assert record.status == "error" and f"injected failure on rank {rank}" in record.error


def test_a_failure_on_one_rank_stops_the_job_on_every_rank_quickly(tmp_path):
    start = time.monotonic()
    results = run_parallel(2, _run_with_failure, tmp_path, [1], 2)
    assert time.monotonic() - start < 90  # bounded by dist_timeout_s, not the allocation
    for statuses, error in results:
        assert statuses is None and ("job stops" in error or "did not finish the cell" in error)
    cid = _cells(tmp_path)[0].id
    assert "injected failure on rank 1" in read_record(record_path(tmp_path, cid, 1)).error
    assert read_record(record_path(tmp_path, cid, 0)).status == "error"  # its collective broke
    assert not list(tmp_path.glob(f"cells/{_cells(tmp_path)[1].id}/*.json"))  # the job stopped


def test_w2w_run_skips_done_cells_and_rejects_bad_prompt_files_before_loading(tmp_path):
    # max_gen_len below the warm-up's length: the warm-up must fit the cell's cache too.
    args = ["precision=fp32", "max_gen_len=2", "dataset.num_prompts=2", "batch_size=1,2", f"sweep_dir={tmp_path}"]
    cli("w2w.run_cli", *args)
    records = sorted(tmp_path.glob("cells/*/rank-00000.json"))
    assert len(records) == 2
    mtimes = [p.stat().st_mtime_ns for p in records]
    out = cli("w2w.run_cli", *args)
    assert out.stderr.count("done already, skipped") == 2
    assert [p.stat().st_mtime_ns for p in records] == mtimes

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = cli("w2w.run_cli", "dataset=gsm8k", f"dataset.path={empty}", f"sweep_dir={tmp_path}/b", check=False)
    assert bad.returncode == 2 and "dataset.path" in bad.stderr and "empty" in bad.stderr
    assert "loaded in" not in bad.stderr  # stopped before the model


@pytest.mark.parametrize(("option", "fragment"), [("batch_size=0", "batch_size=0"), ("model=llama_1b", "unknown model")])
def test_w2w_run_bad_options_exit_2_with_the_option_named(tmp_path, option, fragment):
    bad = cli("w2w.run_cli", option, f"sweep_dir={tmp_path}", check=False)
    assert bad.returncode == 2 and fragment in bad.stderr and "Traceback" not in bad.stderr

