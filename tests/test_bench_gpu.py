"""make bench-gpu's logic, dry-run on the CPU with a tiny model (the GPU run itself needs an H100)."""

from __future__ import annotations

import contextlib
import io

from tests.parallel import run_parallel


def _dry_run() -> str:
    from w2w.bench import gpu_engines

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = gpu_engines.main(["--device", "cpu", "--tiny", "--batches", "1", "3", "--prompt-len", "8",
                                 "--new-tokens", "6", "--repeats", "1", "--copy-mb", "8"])
    assert code == 0
    return out.getvalue()


def test_dry_run_reports_every_engine_batch_and_target():
    text = run_parallel(1, _dry_run)[0]
    for batch, tokens in ((1, 6), (3, 18)):
        assert f"batch {batch}: transformers " in text
        for engine in ("llama1", "llama2", "fast"):
            line = next(x for x in text.splitlines() if x.startswith(f"batch {batch}: w2w {engine} "))
            # Same weights, fp32: both engines make transformers' greedy tokens, every one.
            assert f"greedy tokens equal transformers' {tokens}/{tokens}" in line
            assert "x vs transformers, decode step " in line and "of the HBM roof" in line
            assert "no energy meter" in line  # no NVML on a CPU: no invented watts
    assert "fast at batch 1: " in text and "of the HBM roof (target >= 60%)" in text
    assert text.count("llama2 at batch ") == 2 and "a dry run" in text
    assert "CUDA kernels per decode step: not counted without a GPU" in text  # never a made-up count
