"""The JSON on disk is pinned: records, a progress file and manifests written by the main before the typed
batches (tests/golden/records, from commit cc1766c) read with today's types and written back byte-identical."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from w2w.files import write_json
from w2w.manifest import read_manifest
from w2w.progress import CellProgress, CellShape
from w2w.records import BatchCounts, BatchEnergy, BatchTimes, Totals, read_record, with_batch_totals

GOLDEN = Path(__file__).parent / "golden" / "records"
RECORDS = sorted(p.name for p in GOLDEN.glob("record-*.json"))


def _shape(record_name: str) -> CellShape:
    record = read_record(GOLDEN / record_name)
    return CellShape(record.cell_id, record.rank, record.world_size, record.params["batch_size"], len(record.batches))


def test_the_golden_set_holds_every_kind_of_record():
    records = {name: read_record(GOLDEN / name) for name in RECORDS}
    assert {r.status for r in records.values()} == {"ok", "error"}
    ok = records["record-ok-rank0.json"]
    assert ok.batches and ok.segments and ok.gpu_state and ok.telemetry and ok.energy.cpu_j is not None
    assert isinstance(ok.batches[0].counts, BatchCounts) and isinstance(ok.batches[0].energy, BatchEnergy)
    assert records["record-failed.json"].counts is None and records["record-failed.json"].traceback


@pytest.mark.parametrize("name", RECORDS)
def test_a_record_is_rewritten_byte_identical(name, tmp_path):
    out = tmp_path / name
    write_json(out, read_record(GOLDEN / name))
    assert out.read_bytes() == (GOLDEN / name).read_bytes()


def test_a_progress_file_is_rewritten_byte_identical_and_resumes(tmp_path):
    path = tmp_path / "progress-rank-00000.json"
    shutil.copy(GOLDEN / "progress-rank0.json", path)
    progress = CellProgress.load(path, _shape("record-ok-rank0.json"))
    assert progress.done == 2 and progress.stream_state == "state-after-2"
    last = progress.batches.pop()
    progress.stream_states.pop("2")
    progress.add_batch(last, stream_state="state-after-2")  # saves the file again
    assert path.read_bytes() == (GOLDEN / "progress-rank0.json").read_bytes()


def test_the_progress_file_totalled_is_the_records_sections():
    progress = CellProgress.load(GOLDEN / "progress-rank0.json", _shape("record-ok-rank0.json"))
    record = read_record(GOLDEN / "record-ok-rank0.json")
    totals = Totals.of(progress.batches, progress.segments)
    assert totals.counts == {k: getattr(record.counts, k) for k in totals.counts}
    assert totals.times == {k: getattr(record.times, k) for k in totals.times}
    assert totals.energy == {k: getattr(record.energy, k) for k in totals.energy}
    assert totals.energy["gpu_j"] is not None and totals.energy["idle_gpu_j"] is not None
    assert set(totals.counts) == {*BatchCounts.__dataclass_fields__, "batches"} - {"extra"}
    assert set(totals.times) == set(BatchTimes.__dataclass_fields__) - {"extra"}
    assert with_batch_totals(record) == record  # the record already holds its batches' totals


def test_manifests_v1_and_v2_read_to_the_v2_file(tmp_path):
    out = tmp_path / "manifest.json"
    write_json(out, read_manifest(GOLDEN / "manifest-v2.json"))
    assert out.read_bytes() == (GOLDEN / "manifest-v2.json").read_bytes()
    write_json(out, read_manifest(GOLDEN / "manifest-v1.json"))  # upgraded on read
    assert out.read_bytes() == (GOLDEN / "manifest-v2.json").read_bytes()
    assert json.loads((GOLDEN / "manifest-v1.json").read_text())["version"] == 1
