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
from w2w.analysis.page import render
from w2w.analysis.reduce import reduce_sweep
from w2w.launch import status as status_module
from w2w.launch import sweep as sweep_module
from w2w.launch.plan import make_plan
from w2w.launch.submit import load_manifest, record_plan, record_submission, save_manifest

from w2w import manifest as manifest_module
from w2w.manifest import (
    MANIFEST,
    MANIFEST_VERSION,
    Command,
    Manifest,
    ManifestCell,
    ManifestError,
    ManifestJob,
    Submission,
    read_manifest,
)
from w2w.records import (
    SCHEMA_VERSION,
    Counts,
    Energy,
    RankRecord,
    parse_record,
    read_record,
    record_path,
    write_record,
)
from w2w.schema import NewerSchemaError, RecordError

GOLDEN = Path(__file__).parent / "golden" / "schema1_sweep"  # written by w2w before the typed schema
OK_CELL, FAILED_CELL = "162cd50076bb", "fb0b5404180b"
SKIPPED_CELL = "b5320e5269f2"


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
    else:  # a failed cell had no counts/times/telemetry, and still has none
        assert record.counts is None and "counts" not in written and record.error == raw["error"]
    # The same keys and values (the layout did not move); fields newer than the file only at their defaults.
    added = _added(written, raw)
    assert added.pop("repeat") == 0  # a record from before repeats is run 0 of its cell
    if record.ok:
        # Energy fields of issue 19 (bounds, RAPL domains, window flags): unknown for records written before.
        later = {f"energy.{k}": None for k in ("gpu_bound_j", "cpu_bound_j", "cpu_package_j", "cpu_dram_j",
                                               "window_period_s", "min_window_periods", "short_windows",
                                               "shortest_window_periods")}
        # positions was not counted then: a LATER field, left out of the JSON while None (w2w.schema.rule).
        assert "counts.positions" not in added and record.counts.positions is None
        assert added == {"batches": [], "segments": [], "counts.scored": 0, "counts.correct": 0,
                         "energy.idle_gpu_j": None} | later
    else:  # its energy section held only what the failure left; the rest is added, empty
        energy = {k: v for k, v in added.items() if k.startswith("energy.")}
        assert added == {"batches": [], "segments": [], "timeline": None} | energy and set(energy.values()) == {None}


def _added(new: dict, old: dict, prefix: str = "") -> dict:
    """The (dotted) keys `new` adds to `old`, with their values; AssertionError if it changes or drops one."""
    assert set(old) <= set(new), set(old) - set(new)
    added = {}
    for key, value in new.items():
        if key not in old:
            added[prefix + key] = value
        elif isinstance(value, dict) and isinstance(old[key], dict) and key not in ("params", "config"):
            added |= _added(value, old[key], f"{prefix}{key}.")
        else:
            assert value == old[key], (prefix + key, value, old[key])
    return added


def test_unknown_fields_survive_a_round_trip(tmp_path):
    raw = record.to_dict() if (record := read_record(record_path(GOLDEN, OK_CELL, 0))) else {}
    raw |= {"future_section": [{"batch": 0, "total_s": 1.5}]}
    raw["counts"] = raw["counts"] | {"future_count": 3}
    raw["params"] = raw["params"] | {"engine": "fairscale"}  # params are free-form
    record = parse_record(raw)
    assert record.extra == {"future_section": [{"batch": 0, "total_s": 1.5}]}
    assert record.counts.extra == {"future_count": 3}
    assert record.counts.output_tokens == raw["counts"]["output_tokens"] and record.params["engine"] == "fairscale"
    assert not hasattr(record, "__getitem__")  # typed fields only: no reads by key
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


def test_a_newer_manifest_is_refused_by_every_reader_and_left_as_it_was(sweep, capsys):
    newer = json.loads((sweep / MANIFEST).read_text()) | {"version": MANIFEST_VERSION + 1}
    (sweep / MANIFEST).write_text(json.dumps(newer))
    with pytest.raises(NewerSchemaError, match=rf"newer w2w \(version {MANIFEST_VERSION + 1}; this w2w reads up to "
                                               rf"{MANIFEST_VERSION}\): upgrade w2w") as refused:
        read_manifest(sweep / MANIFEST)
    assert isinstance(refused.value, ManifestError)  # the one-line error of w2w-status and w2w-sweep
    capsys.readouterr()
    assert status_module.main([str(sweep)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    # w2w-sweep plans, then refuses before it rewrites the manifest or submits anything.
    argv = ["model=tiny", "gpu=cpu", "shards=1", "cluster=local_slurm", f"sweep_dir={sweep}"]
    assert sweep_module.main(argv) == 2
    assert "written by a newer w2w" in capsys.readouterr().err
    assert json.loads((sweep / MANIFEST).read_text()) == newer and not (sweep / "submitit").exists()
    with pytest.raises(ManifestError, match="newer w2w"):
        render(sweep, sweep / "out", max_timelines=0)


def test_the_writer_writes_the_current_schema(tmp_path):
    record = RankRecord(cell_id="c", rank=0, world_size=1, status="oom", error="OutOfMemoryError: CUDA")
    written = json.loads(write_record(tmp_path, record).read_text())
    assert written["schema"] == SCHEMA_VERSION and written["energy"]["gpu_j"] is None
    assert "counts" not in written and "telemetry" not in written  # a failed cell never had them
    assert read_record(record_path(tmp_path, "c", 0)) == record


def test_a_version_1_manifest_upgrades_on_read_and_writes_back_as_version_2(sweep):
    raw = json.loads((sweep / MANIFEST).read_text())
    assert raw["version"] == 1  # written by the first manifest writer
    manifest = load_manifest(sweep)
    assert manifest.version == MANIFEST_VERSION == 2
    assert manifest.commands == [Command(argv=raw["command"], unix_s=raw["updated_unix_s"])]
    (key, job), = manifest.jobs.items()
    assert job.backend == "slurm" and (job.nodes, job.tasks_per_node) == (1, 1)
    assert job.shape == "model=tiny gpu=v100 shards=1 precision=fp16 -> 1 node(s) x 1 task(s)"  # from describe
    (first,) = job.submissions
    assert (first.job_id, first.cells, first.command) == ("4242", ["29b8c0b50d76"], raw["command"])
    assert manifest.cells[SKIPPED_CELL].job is None and "needs ~135.5 GiB" in manifest.cells[SKIPPED_CELL].skip_reason
    assert {cid: c.to_dict() for cid, c in manifest.cells.items()} == raw["cells"]
    # A later grid into the same sweep: the version 1 job and cells stay beside the new ones.
    argv = ["model=tiny", "gpu=cpu", "shards=1", "max_gen_len=4", "batch_size=2", f"sweep_dir={sweep}",
            "cluster=local_slurm"]
    plan = make_plan(argv)
    (new_job,) = plan.jobs
    record_plan(manifest, plan, argv)
    handle = SimpleNamespace(job_id="4243", paths=SimpleNamespace(folder=sweep / "submitit" / "4243"))
    record_submission(manifest, new_job, new_job.cells, handle, argv)
    save_manifest(manifest, sweep)
    again = json.loads((sweep / MANIFEST).read_text())
    assert again["version"] == 2 and "command" not in again
    assert [c["argv"] for c in again["commands"]] == [raw["command"], ["w2w-sweep", *argv]]
    assert again["jobs"][key]["describe"] == raw["jobs"][key]["describe"]  # a key it no longer writes is kept
    assert again["jobs"][key]["submissions"][0]["cells"] == raw["jobs"][key]["cells"]
    (submitted,) = again["jobs"][new_job.key]["submissions"]
    assert submitted["job_id"] == "4243" and submitted["cells"] == [c.id for c in new_job.cells]
    assert submitted["command"] == ["w2w-sweep", *argv] and again["jobs"][new_job.key]["shape"] == new_job.shape()
    assert {cid: again["cells"][cid] for cid in raw["cells"]} == raw["cells"]
    assert set(again["cells"]) == set(raw["cells"]) | {c.id for c in new_job.cells}
    assert load_manifest(sweep) == manifest  # and reads back as it was written


def test_a_version_2_manifest_round_trips_field_for_field(tmp_path):
    raw = {"version": 2, "updated_unix_s": 1.5e9, "future_key": {"a": 1},
           "commands": [{"argv": ["w2w-sweep", "seed=1"], "unix_s": 1.5e9}],
           "jobs": {"j1": {"backend": "local", "nodes": 1, "tasks_per_node": 2, "shape": "s", "cells": ["c1"],
                           "submissions": [{"job_id": "17", "folder": "/f/17", "submitted_unix_s": 1.5e9,
                                            "cells": ["c1"], "command": ["w2w-sweep", "seed=1"], "node": "n1"}]}},
           "cells": {"c1": {"job": "j1", "params": {"seed": 1, "dataset.path": None}, "skip_reason": None,
                            "world_size": 2},
                     "c2": {"job": None, "params": {"seed": 2}, "skip_reason": "too big", "world_size": 8}}}
    (tmp_path / MANIFEST).write_text(json.dumps(raw))
    manifest = load_manifest(tmp_path)
    submission = manifest.jobs["j1"].submissions[0]
    assert isinstance(manifest.jobs["j1"], ManifestJob) and isinstance(submission, Submission)
    assert manifest.extra == {"future_key": {"a": 1}} and submission.extra == {"node": "n1"}
    assert manifest.jobs["j1"].holder("c1") is submission and manifest.jobs["j1"].holder("c2") is None
    assert manifest.cells["c2"].skip_reason == "too big" and manifest.cells["c1"].world_size == 2
    save_manifest(manifest, tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / MANIFEST).read_text()) == raw
    assert load_manifest(tmp_path / "missing") == Manifest()  # before the first w2w-sweep


def test_a_cells_holder_is_its_latest_submission_in_any_placement():
    """A cell re-planned under another placement key (a cluster option changed) stays held by the
    job that has it: w2w-sweep must not submit it a second time."""
    def job(*submissions: Submission) -> ManifestJob:
        return ManifestJob(backend="slurm", nodes=1, tasks_per_node=1, cells=["c1"], submissions=list(submissions))

    first, retry, moved = (Submission(job_id=i, folder="f", submitted_unix_s=t, cells=["c1"])
                           for i, t in (("40", 1.0), ("41", 2.0), ("50", 3.0)))
    old, new = job(first, retry), job()
    manifest = Manifest(jobs={"old": old, "new": new}, cells={"c1": ManifestCell(world_size=1, job="new")})
    assert manifest.holder("c1") == (old, retry) and manifest.holder("c2") is None
    new.submissions.append(moved)
    assert manifest.holder("c1") == (new, moved)


@pytest.mark.parametrize(("change", "message"), [
    ({"jobs": {"j1": {"backend": "slurm", "nodes": "two", "tasks_per_node": 1}}},
     r"field 'jobs.j1.nodes' is 'two', not int"),
    ({"cells": {"c1": {"job": "j1"}}}, r"missing field 'cells.c1.world_size'"),
    ({"commands": [{"argv": "w2w-sweep seed=1"}]}, r"field 'commands\[0\].argv' is 'w2w-sweep seed=1', not list"),
    ({"version": "2"}, r"version '2' is not a version number"),
])
def test_a_wrong_manifest_field_is_one_error_naming_it(tmp_path, change, message):
    (tmp_path / MANIFEST).write_text(json.dumps({"version": 2, "jobs": {}, "cells": {}} | change))
    with pytest.raises(ManifestError, match=message) as wrong:
        load_manifest(tmp_path)
    assert "\n" not in str(wrong.value) and "move it away" in str(wrong.value)


def test_status_reads_schema_1_records():
    done = status_module.cell_state(GOLDEN, OK_CELL, ManifestCell(world_size=2, job="j"), None)
    failed = status_module.cell_state(GOLDEN, FAILED_CELL, ManifestCell(world_size=2, job="j"), None)
    assert done == ("done", "on vm")
    assert failed[0] == "failed" and "rank 1: error: PowerCapError" in failed[1]


def test_the_report_reads_each_rank_file_and_the_manifest_once(sweep, tmp_path):
    with mock.patch.object(reduce_module, "read_record", autospec=True, side_effect=read_record) as reads, \
            mock.patch.object(manifest_module, "parse_manifest", autospec=True,
                              side_effect=manifest_module.parse_manifest) as manifests:
        report = render(sweep, tmp_path / "out", max_timelines=0)
    assert reads.call_count == len(list(sweep.glob("cells/*/rank-*.json"))) == 4
    assert manifests.call_count == 1
    page = (tmp_path / "out" / "report.md").read_text()
    assert "Cells: 2 (1 ok, 1 error)" in page and report.files
    assert "65B on v100: no cell ran (1 GPU(s) batch 2: skipped)" in page  # the manifest's skipped cell
    assert "| Setup | prompts per dataset | every cell | 4096 |  | 4 |" in page  # the records' params


def test_each_field_is_totalled_by_the_rule_it_carries():
    from dataclasses import dataclass, field

    from w2w.schema import ADD, CELL, LATER, MAX, MIN, Schema, rule, total

    @dataclass
    class Part(Schema):
        n: int = rule(ADD, 0)
        j: float | None = rule(ADD)
        first_s: float | None = rule(MIN)
        peak_w: float | None = rule(MAX)
        later: int | None = rule(LATER)
        whole: int = rule(CELL, 7)
        kept: str = "not summed"
        extra: dict = field(default_factory=dict)

    parts = [Part(n=1, j=1.5, first_s=3.0, peak_w=2.0, later=4), Part(n=2, j=2.5, first_s=1.0, peak_w=5.0)]
    assert total(parts, Part) == {"n": 3, "j": 4.0, "first_s": 1.0, "peak_w": 5.0, "later": None}
    assert total(parts[:1], Part)["later"] == 4 and total([Part(j=None), *parts], Part)["j"] is None
    assert total([], Part) == {"n": 0, "j": None, "first_s": None, "peak_w": None, "later": None}
    assert "later" not in Part().to_dict() and Part(later=1).to_dict()["later"] == 1  # absent while None
