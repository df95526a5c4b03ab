"""The GPU acceptance run's plumbing: a step's output as it comes, its own timeout, a hang killed."""

from __future__ import annotations

import sys
import time

from w2w.gpu_accept import BUDGET_S, CPU_SLACK, Step, main, run_step, steps


def test_a_step_that_hangs_is_killed_at_its_timeout_with_what_it_printed(capsys):
    start = time.monotonic()
    result = run_step(Step("hang", [sys.executable, "-c", "print('first', flush=True); import time; time.sleep(60)"], 2))
    assert result.status == "timeout" and result.tail == "first\n"
    assert time.monotonic() - start < 15
    assert "   hang| first" in capsys.readouterr().out  # echoed as it came


def test_a_failing_step_is_reported_and_the_run_fails(tmp_path, capsys):
    assert run_step(Step("bad", [sys.executable, "-c", "raise SystemExit(3)"], 30)).status == "failed"
    assert main(["--device", "cpu", "--out", str(tmp_path), "--only", "power-cap", "gpu-check"]) == 0
    out = capsys.readouterr().out
    assert "gpu-check: skipped" in out and (tmp_path / "summary.json").exists()


def test_the_steps_fit_eight_minutes_on_a_gpu_and_the_dry_run_gets_slack(tmp_path):
    on_gpu = steps("cuda", "h100", tmp_path)
    assert sum(step.timeout_s for step in on_gpu) < BUDGET_S == 480
    dry = steps("cpu", "h100", tmp_path)
    assert [s.timeout_s for s in dry] == [CPU_SLACK * s.timeout_s for s in on_gpu]
