"""make bench-gpu's logic, dry-run on the CPU with a tiny model (the GPU run itself needs an H100)."""

from __future__ import annotations

import contextlib
import io

import pytest

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
            # No rated bandwidth for a CPU: the roof is the measured copy bandwidth's, and says so.
            assert "x vs transformers, decode step " in line and "of the copy roof" in line
            assert "no rated bandwidth for gpu profile none" in line
            assert "no energy meter" in line  # no NVML on a CPU: no invented watts
            path = "eager (no CUDA graph on cpu)" if engine == "fast" else "eager (a Python loop"
            assert f"decode path: {path}" in line
    # The targets are an H100's: on a dry run they are shown, not judged (no MISS, and exit 0).
    assert "DRY  fast at batch 1: " in text and "of the copy roof (no rated bandwidth) (target >= 60%)" in text
    assert text.count("DRY  llama2 at batch ") == 2 and "a dry run" in text and "MISS" not in text
    assert "CUDA kernels per decode step: not counted without a GPU" in text  # never a made-up count


def test_the_roof_reads_the_weights_but_the_embedding_and_the_rated_bandwidth_comes_from_conf_gpu():
    from w2w.bench import gpu_engines as bench

    assert bench.gpu_profile("NVIDIA H100 80GB HBM3") == "h100" and bench.gpu_profile("NVIDIA H200") == "h200"
    assert bench.gpu_profile("NVIDIA GeForce RTX 4090") is None and bench.rated_gbs(None) is None
    assert bench.rated_gbs("h100") == 3350.0
    args = bench.SEVEN_B
    weights = 2 * (args.num_params() - args.vocab_size * args.dim)
    assert bench.step_bytes(args, 1, 0, 2) == weights  # 12.95 GB of a 13.5 GB fp16 model
    kv = 2 * 32 * 256 * 4096 * 2  # K and V, 32 layers, 256 positions, fp16
    assert bench.step_bytes(args, 1, 256, 2) == weights + kv
    assert bench.kv_read_len("fast", 128, 128, 256) == 256 and bench.kv_read_len("llama2", 128, 128, 256) == 192
    roof = bench.Roof(weights + kv, 3350.0, 3000.0)
    assert roof.share(roof.rated_s / 0.5) == pytest.approx(0.5)


def test_a_missed_target_is_a_miss_and_a_non_zero_exit_on_a_gpu_and_only_shown_on_a_dry_run(capsys):
    from w2w.bench import gpu_engines as bench

    def run(tokens_per_s: float, step_s: float | None = None) -> bench.Run:
        return bench.Run(tokens_per_s, step_s, None, 1.0, 1, [[1]])

    results = {1: {"transformers": run(100.0), "llama1": run(90.0), "llama2": run(100.0), "fast": run(150.0, 0.02)}}
    roofs = {1: bench.Roof(13e9, 3350.0, 3000.0)}  # 3.9 ms of a 20 ms step: 19% of the roof
    judged = bench.targets(results, roofs, judged=True)
    assert judged == ["MISS fast at batch 1: 19% of the HBM roof (target >= 60%)",
                      "MISS fast at batch 1: 1.50x transformers (target >= 2x)",
                      "PASS llama2 at batch 1: 1.00x transformers (target within ±20%)"]
    assert bench.verdict(judged) == 1 and "bench-gpu: 2 target(s) missed" in capsys.readouterr().out
    shown = bench.targets(results, roofs, judged=False)
    assert all(line.startswith("DRY ") for line in shown) and bench.verdict(shown) == 0
