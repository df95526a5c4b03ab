"""The GPU check's code path on CPU with a fake NVML (no GPU here), and its clear refusal without a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.fake_nvml import FakeGpu, fake_nvml
from tests.parallel import run_parallel
from w2w import distributed, gpu_check
from w2w.model import ModelArgs

TINY = gpu_check.Workload(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, multiple_of=16, max_seq_len=64),
                          batch=2, prompt_len=8, gen_len=8, dtype=torch.float32)


def _checks_on_cpu() -> list[gpu_check.Check]:
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(1, 1)
    nvml = fake_nvml([FakeGpu(power_w=150.0)])
    settings = gpu_check.Settings(idle_s=0.1, long_window_s=0.3, rounds=2, interval_s=0.01)
    return gpu_check.run_checks(torch.device("cpu"), TINY, settings, nvml=nvml, runner=False)


def test_checks_run_through_on_a_fake_gpu():
    checks = {c.name: c for c in run_parallel(1, _checks_on_cpu)[0]}
    assert list(checks) == ["GPU", "model", "idle power", "counter vs integrated", "sampler cost", "fast vs llama1 vs llama2"]
    assert checks["idle power"].ok and "plausible: 5 W to 240 W" in checks["idle power"].detail
    # A constant draw: counter and integrated samples agree, but the load draws no more than idle: a FAIL.
    long = checks["counter vs integrated"]
    assert long.ok is False and "counter" in long.detail and "(limit ±5%)" in long.detail
    assert abs(float(long.detail.split(": ")[1].split("%")[0])) < 2.0
    assert "tokens/s" in checks["sampler cost"].detail
    text = gpu_check.report(list(checks.values()), 1.0)
    assert text.splitlines()[-1].startswith("gpu-check: ") and "FAIL  counter vs integrated" in text


def test_sizes_a_7b_shape_to_the_gpu_memory():
    big = gpu_check.size_workload(80 * 2**30)
    assert (big.args.n_layers, big.args.dim, big.batch) == (32, 4096, 64)
    small = gpu_check.size_workload(16 * 2**30)
    assert 1 <= small.args.n_layers < 32 and small.batch >= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the refusal without one cannot be shown")
def test_no_gpu_exits_non_zero_with_a_clear_message(capsys):
    assert gpu_check.main([]) == 2
    assert "no NVIDIA GPU" in capsys.readouterr().err


def _checks_with_a_raising_idle_check() -> tuple[list[gpu_check.Check], list[gpu_check.Check]]:
    from unittest import mock

    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(1, 1)
    nvml = fake_nvml([FakeGpu(power_w=150.0)])
    settings = gpu_check.Settings(idle_s=0.1, long_window_s=0.3, rounds=2, interval_s=0.01)
    emitted: list[gpu_check.Check] = []
    with mock.patch.object(gpu_check, "check_idle", autospec=True, side_effect=RuntimeError("meter gone")):
        checks = gpu_check.run_checks(torch.device("cpu"), TINY, settings, nvml=nvml, runner=False,
                                      emit=emitted.append)
    return checks, emitted


def test_a_raising_check_fails_and_the_later_checks_still_report():
    checks, emitted = run_parallel(1, _checks_with_a_raising_idle_check)[0]
    assert emitted == checks  # each one handed out as it finished, in order
    by_name = {c.name: c for c in checks}
    assert list(by_name) == ["GPU", "model", "idle power", "counter vs integrated", "sampler cost",
                             "fast vs llama1 vs llama2"]
    assert by_name["idle power"].ok is False
    assert by_name["idle power"].detail == "raised RuntimeError: meter gone"
    assert "tokens/s" in by_name["sampler cost"].detail
    engines = by_name["fast vs llama1 vs llama2"].detail
    for part in ("batch 1 llama1", "batch 1 llama2", "batch 1 fast", "batch 2 llama2", "batch 2 fast", "J/token", " W, "):
        assert part in engines
    assert "FAIL  idle power: raised RuntimeError" in gpu_check.report(checks, 1.0)


def _built_and_reallocated_inside_the_long_window() -> tuple[int, int]:
    """The long window's warm-up, then one measured decode: decoders built and caches allocated in it."""
    from dataclasses import replace

    from w2w import engines
    from w2w.energy.monitor import EnergyMonitor

    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(1, 1)
    # 8 + 120 tokens: a cache of 128, where the 4-token warm-up alone would allocate 64.
    workload = replace(TINY, args=replace(TINY.args, max_seq_len=256), gen_len=120)
    device = torch.device("cpu")
    engine = engines.create("fast", gpu_check.build_random_model(workload, device))
    monitor = EnergyMonitor("auto", device, sampler=False, nvml=fake_nvml([FakeGpu()]))
    gpu_check.warm_up(engine, workload, monitor)
    built, generation = engine.decoders_built, engine.model.cache_generation
    gpu_check.decode_run(engine, workload, monitor)
    monitor.close()
    return engine.decoders_built - built, engine.model.cache_generation - generation


def test_the_long_window_warm_up_uses_the_measured_cache_so_nothing_is_allocated_or_captured_inside():
    assert run_parallel(1, _built_and_reallocated_inside_the_long_window)[0] == (0, 0)
