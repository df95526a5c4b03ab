"""The GPU acceptance run's plumbing: a step's output as it comes, its own timeout, a hang killed,
a plan that fits a short loan, three outcomes, a power cap only when asked."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from tests.fake_nvml import FakeGpu, fake_nvml
from w2w import gpu_accept
from w2w.gpu_accept import (
    BUDGET_S,
    COULD_NOT_RUN,
    CPU_SLACK,
    HEADROOM,
    INSTALL_S,
    MET,
    MISSED,
    SKIPPED,
    Result,
    Step,
    main,
    outcome,
    planned_s,
    run_step,
    steps,
)


def test_a_step_that_hangs_is_killed_at_its_timeout_with_what_it_printed(capsys):
    start = time.monotonic()
    result = run_step(Step("hang", [sys.executable, "-c", "print('first', flush=True); import time; time.sleep(60)"], 2, 1))
    assert result.status == "timeout" and result.tail == "first\n"
    assert time.monotonic() - start < 15
    assert "   hang| first" in capsys.readouterr().out  # echoed as it came


def test_a_failing_step_is_reported_and_the_run_fails(tmp_path, capsys):
    assert run_step(Step("bad", [sys.executable, "-c", "raise SystemExit(4)"], 30, 1)).status == "failed"
    assert main(["--device", "cpu", "--out", str(tmp_path), "--only", "gpu-check"]) == MET
    out = capsys.readouterr().out
    assert "gpu-check: skipped" in out and json.loads((tmp_path / "summary.json").read_text())["status"] == "met"


def test_the_steps_fit_eight_minutes_on_a_gpu_with_headroom_and_the_dry_run_gets_slack(tmp_path):
    on_gpu = steps("cuda", None, tmp_path, power_cap=True)
    assert [s.name for s in on_gpu] == ["fallback", "gpu-check", "bench-gpu", "power-cap"]
    assert planned_s(on_gpu) == INSTALL_S + sum(s.timeout_s for s in on_gpu) < BUDGET_S == 480
    assert all(s.timeout_s >= HEADROOM * s.expected_s for s in on_gpu)
    measured = {s.name: s.expected_s for s in on_gpu if s.measured}
    assert measured == {"gpu-check": 125}  # H100, 2026-11-27; bench-gpu ran more there (110-160 s):
    assert next(s for s in on_gpu if s.name == "bench-gpu").timeout_s > 160  # even that fits its timeout
    dry = steps("cpu", None, tmp_path, power_cap=True)
    assert [s.timeout_s for s in dry] == [CPU_SLACK * s.timeout_s for s in on_gpu]
    # Nothing on the device changes unless asked; the tiny sweep is opt-in and says it is over the plan.
    assert "power-cap" not in [s.name for s in steps("cuda", None, tmp_path)]
    assert planned_s(steps("cuda", None, tmp_path, sweep=True)) >= BUDGET_S


def test_the_sweep_names_the_gpu_profile_from_nvml(tmp_path):
    gpu = gpu_accept.Gpu("NVIDIA H100 80GB HBM3", "GPU-1", "h100")
    sweep = next(s for s in steps("cuda", gpu, tmp_path, sweep=True) if s.name == "sweep")
    assert "gpu=h100" in sweep.argv and "gpu.name=NVIDIA_H100_80GB_HBM3" in sweep.argv


def test_three_outcomes_each_miss_named():
    ok = Result("bench-gpu", "ok", 1.0, 0, "", misses=[])
    assert outcome([ok, Result("gpu-check", "skipped", 0.0, None, "")]) == (MET, [])
    missed = Result("bench-gpu", "failed", 1.0, 1, "", misses=["MISS fast at batch 1: 40% of the HBM roof (target >= 60%)"])
    code, misses = outcome([missed, Result("gpu-check", "timeout", 188.0, None, "")])
    assert code == MISSED and misses == ["bench-gpu: failed (exit 1)",
                                         "bench-gpu: MISS fast at batch 1: 40% of the HBM roof (target >= 60%)",
                                         "gpu-check: timeout"]


def test_without_a_gpu_it_could_not_run_and_says_so_under_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([]) == COULD_NOT_RUN
    summary = json.loads((tmp_path / "gpu_accept" / "summary.json").read_text())
    assert summary["status"] == "could not run" and "no NVIDIA GPU visible" in summary["reason"]
    assert "gpu-accept: could not run: no NVIDIA GPU visible" in capsys.readouterr().out


@pytest.mark.parametrize("root", [False, True])
def test_the_power_cap_step_needs_root_or_restores_the_limit(root, capsys):
    gpu = FakeGpu(may_set_limit=root, limit_w=400.0)
    code = gpu_accept.check_power_cap(torch.device("cpu"), nvml=fake_nvml([gpu]))
    out = capsys.readouterr().out
    if not root:
        assert code == SKIPPED and out.startswith("skipped: needs root") and gpu.set_calls == []
    else:
        assert code == MET and gpu.set_calls == [300_000, 400_000] and gpu.limit_w == 400.0
        assert "limit 400 W -> set 300 W, enforced 300 W -> restored 400 W" in out
