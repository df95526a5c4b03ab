"""The typed record and manifest schema on files written by the code before it (tests/golden)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from w2w.analysis import reduce as reduce_module
from w2w.analysis.reduce import reduce_sweep
from w2w.analysis.report import render
from w2w.launch import status as status_module
from w2w.launch.plan import make_plan
from w2w.launch.submit import load_manifest, save_manifest, update_manifest

from w2w.records import (
    MANIFEST,
    SCHEMA_VERSION,
    Counts,
    Energy,
    ManifestCell,
    NewerSchemaError,
    RankRecord,
    RecordError,
    parse_record,
    read_manifest,
    read_record,
    record_path,
    write_record,
)

GOLDEN = Path(__file__).parent / "golden" / "schema1_sweep"  # written by w2w before the typed schema
OK_CELL, FAILED_CELL = "162cd50076bb", "fb0b5404180b"
SKIPPED_CELL = "b5320e5269f2"
GOLDEN_MANIFEST_SWEEP_DIR = "/tmp/w2w11b-golden-manifest"  # the sweep_dir its plan had: cell ids hash it


def _raw(cid: str, rank: int) -> dict:
    return json.loads(record_path(GOLDEN, cid, rank).read_text())


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    copy = tmp_path / "sweep"
    shutil.copytree(GOLDEN, copy)
    return copy


def test_a_schema_1_sweep_still_reduces_to_the_same_numbers():
    table = reduce_sweep(GOLDEN).set_index("cell_id")
    ok, failed = table.loc[OK_CELL], table.loc[FAILED_CELL]
    raw = [_raw(OK_CELL, rank) for rank in (0, 1)]
    assert ok["status"] == "ok" and ok["gpus"] == 2 and ok["note"] == ""
    assert ok["energy_j"] == pytest.approx(math.fsum(r["energy"]["gpu_j"] for r in raw))
    assert ok["tokens_per_s"] == pytest.approx(
        raw[0]["counts"]["output_tokens"] / max(r["times"]["total_s"] for r in raw))
    assert ok["cpu_energy_j"] == pytest.approx(raw[0]["energy"]["cpu_j"])  # local rank 0 read the node
    assert ok["sm_util_avg_pct"] == pytest.approx(math.fsum(r["telemetry"]["sm_util_avg_pct"] for r in raw) / 2)
    assert failed["status"] == "error" and "PowerCapError" in failed["note"]


@pytest.mark.parametrize(("cid", "rank"), [(OK_CELL, 0), (OK_CELL, 1), (FAILED_CELL, 0), (FAILED_CELL, 1)])
def test_schema_1_records_read_typed_and_write_back_unchanged(cid, rank):
    raw = _raw(cid, rank)
    record = read_record(record_path(GOLDEN, cid, rank))
    assert record.schema == 1 and record.cell_id == cid and record.rank == rank
    assert isinstance(record.energy, Energy) and record.energy.idle_power_w == raw["energy"]["idle_power_w"]
    written = record.to_dict()
    if record.ok:
        assert isinstance(record.counts, Counts) and record.counts.output_tokens == raw["counts"]["output_tokens"]
        assert written == raw  # the same keys and values: the layout did not move
    else:  # a failed cell had no counts/times/telemetry, and still has none; only empty fields are added
        assert record.counts is None and "counts" not in written and record.error == raw["error"]
        for new, old in ((written, raw), (written["energy"], raw["energy"])):
            assert set(old) <= set(new) and all(new[k] is None for k in set(new) - set(old))
        assert written["energy"] | raw["energy"] == written["energy"]
        assert {k: v for k, v in written.items() if k in raw and k != "energy"} == {
            k: v for k, v in raw.items() if k != "energy"}


def test_unknown_fields_survive_a_round_trip_and_read_by_key(tmp_path):
    raw = _raw(OK_CELL, 0) | {"segments": [{"batch": 0, "total_s": 1.5}]}
    raw["counts"] = raw["counts"] | {"correct": 3}
    raw["params"] = raw["params"] | {"engine": "fairscale"}  # params are free-form
    record = parse_record(raw)
    assert record.extra == {"segments": [{"batch": 0, "total_s": 1.5}]} and record.counts.extra == {"correct": 3}
    assert record["counts"]["correct"] == 3 and record["counts"]["output_tokens"] == raw["counts"]["output_tokens"]
    assert record.params["engine"] == "fairscale" and record.get("absent") is None
    path = write_record(tmp_path, record)
    assert json.loads(path.read_text()) == raw


def test_wrong_types_are_named_by_field():
    raw = _raw(OK_CELL, 0)
    with pytest.raises(RecordError, match=r"field 'times.total_s' is 'long', not float"):
        parse_record(raw | {"times": raw["times"] | {"total_s": "long"}})
    with pytest.raises(RecordError, match=r"field 'rank' is True, not int"):
        parse_record(raw | {"rank": True})
    with pytest.raises(RecordError, match=r"field 'counts.responses' is missing from an ok record"):
        parse_record(raw | {"counts": None})
    with pytest.raises(RecordError, match=r"missing field 'world_size'"):
        parse_record({k: v for k, v in raw.items() if k != "world_size"})


def test_a_newer_schema_is_refused_with_how_to_fix(sweep):
    path = record_path(sweep, OK_CELL, 1)
    path.write_text(json.dumps(json.loads(path.read_text()) | {"schema": SCHEMA_VERSION + 1}))
    with pytest.raises(NewerSchemaError, match=rf"newer w2w \(schema {SCHEMA_VERSION + 1}; this w2w reads up to"):
        read_record(path)
    row = reduce_sweep(sweep).set_index("cell_id").loc[OK_CELL]
    assert row["status"] == "incomplete" and "rank-00001.json: written by a newer w2w" in row["note"]
    assert "upgrade w2w" in row["note"]
    (sweep / MANIFEST).write_text(json.dumps(json.loads((sweep / MANIFEST).read_text()) | {"version": 99}))
    with pytest.raises(NewerSchemaError, match="upgrade w2w"):
        read_manifest(sweep / MANIFEST)
    assert status_module.main([str(sweep)]) == 2


def test_the_writer_writes_the_current_schema(tmp_path):
    record = RankRecord(cell_id="c", rank=0, world_size=1, status="oom", error="OutOfMemoryError: CUDA")
    written = json.loads(write_record(tmp_path, record).read_text())
    assert written["schema"] == SCHEMA_VERSION and written["energy"]["gpu_j"] is None
    assert "counts" not in written and "telemetry" not in written  # a failed cell never had them
    assert read_record(record_path(tmp_path, "c", 0)) == record


def test_a_schema_1_manifest_reads_typed_updates_and_writes_back(sweep):
    raw = json.loads((sweep / MANIFEST).read_text())
    manifest = load_manifest(sweep)
    assert manifest.to_dict() == raw
    (key, job), = manifest.jobs.items()
    assert job.backend == "slurm" and job.submissions[0].job_id == "4242"
    assert manifest.cells[SKIPPED_CELL].job is None and "needs ~135.5 GiB" in manifest.cells[SKIPPED_CELL].skip_reason
    plan = make_plan(["model=tiny,llama_65b", "gpu=v100", "shards=1", "skip_unfit=true", "max_gen_len=4",
                      "batch_size=2", f"sweep_dir={GOLDEN_MANIFEST_SWEEP_DIR}", "cluster=local_slurm"])
    assert [j.key for j in plan.jobs] == [key]  # the same cells and job as when the golden was written
    handle = SimpleNamespace(job_id="4243", paths=SimpleNamespace(folder=sweep / "submitit" / "4243"))
    save_manifest(update_manifest(manifest, plan, [(plan.jobs[0], handle)], ["gpu=v100"]), sweep)
    again = json.loads((sweep / MANIFEST).read_text())
    assert [s["job_id"] for s in again["jobs"][key]["submissions"]] == ["4242", "4243"]
    assert again["cells"] == raw["cells"] and again["version"] == raw["version"]


def test_status_reads_schema_1_records():
    done = status_module.cell_state(GOLDEN, OK_CELL, ManifestCell(world_size=2, job="j"), None)
    failed = status_module.cell_state(GOLDEN, FAILED_CELL, ManifestCell(world_size=2, job="j"), None)
    assert done == ("done", "on vm")
    assert failed[0] == "failed" and "rank 1: error: PowerCapError" in failed[1]


def test_the_report_reads_each_rank_file_once(sweep, tmp_path):
    with mock.patch.object(reduce_module, "read_record", autospec=True, side_effect=read_record) as reads:
        report = render(sweep, tmp_path / "out", max_timelines=0)
    assert reads.call_count == len(list(sweep.glob("cells/*/rank-*.json"))) == 4
    page = (tmp_path / "out" / "report.md").read_text()
    assert "Cells: 2 (1 ok, 1 error)" in page and report.files
    assert "65B on v100: no cell ran (1 GPU(s) batch 2: skipped)" in page  # the manifest's skipped cell
    assert "| Setup | prompts per dataset | every cell | 4096 |  | 4 |" in page  # the records' params
