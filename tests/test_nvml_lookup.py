"""NVML finds a CUDA rank's GPU by UUID, or the rank fails with the reason; an index only where no GPU UUID exists."""

from __future__ import annotations

import pytest
import torch

from tests.fake_nvml import FakeGpu, fake_nvml
from w2w.energy import nvml as nvml_mod
from w2w.energy.errors import GpuNotFoundError

CUDA1 = torch.device("cuda", 1)  # a device object only: no CUDA needed to look it up


def test_a_cuda_rank_is_located_by_its_uuid(monkeypatch):
    gpus = [FakeGpu(uuid=f"GPU-{i}") for i in range(3)]
    monkeypatch.setattr(nvml_mod, "_torch_uuid", lambda device: "GPU-2")
    handle, located_by = nvml_mod.find_handle(fake_nvml(gpus), CUDA1, 0)
    assert handle is gpus[2] and located_by == "GPU-2"


def test_an_unknown_gpu_uuid_fails_the_rank_instead_of_guessing_an_index(monkeypatch):
    nvml = fake_nvml([FakeGpu(uuid=f"GPU-{i}") for i in range(3)])
    monkeypatch.setattr(nvml_mod, "_torch_uuid", lambda device: "GPU-gone")
    with pytest.raises(GpuNotFoundError, match="NVML has no GPU with the CUDA runtime's UUID GPU-gone"):
        nvml_mod.find_handle(nvml, CUDA1, 0)
    nvml.nvmlDeviceGetHandleByIndex.assert_not_called()


@pytest.mark.parametrize("uuid", ["MIG-7", None])  # a MIG instance, or torch without UUIDs
def test_an_index_only_where_no_gpu_uuid_exists_and_located_by_says_so(monkeypatch, uuid):
    gpus = [FakeGpu(uuid=f"GPU-{i}") for i in range(3)]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(nvml_mod, "_torch_uuid", lambda device: uuid)
    handle, located_by = nvml_mod.find_handle(fake_nvml(gpus), CUDA1, 0)
    assert handle is gpus[1] and located_by == 1


class _Props:  # torch's device properties: a bare UUID, as the CUDA runtime gives it
    uuid = "7f3c0000-0000-0000-0000-00000000000a"


def test_a_mig_instance_is_found_by_its_uuid_and_refused_with_the_reason(monkeypatch):
    """torch spells no prefix: the bare UUID is tried as NVML's GPU-... and then MIG-..., so a MIG
    slice reaches its branch, which refuses it (NVML has no per-instance energy or power)."""
    from w2w.energy.errors import GpuNotSupportedError

    mig = FakeGpu(uuid=f"MIG-{_Props.uuid}")
    nvml = fake_nvml([FakeGpu(uuid="GPU-0"), mig])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Props())
    handle, located_by = nvml_mod.find_handle(nvml, CUDA1, 0)
    assert handle is mig and located_by == f"MIG-{_Props.uuid}"
    with pytest.raises(GpuNotSupportedError, match="is a MIG instance or runs in MIG mode: NVML reports no energy"):
        nvml_mod.open_gpu_meter(nvml, CUDA1, 0, instant_power=True)
    nvml.nvmlDeviceGetHandleByIndex.assert_not_called()


def test_a_bare_uuid_of_a_whole_gpu_is_found_as_gpu_and_an_unknown_one_fails_naming_both(monkeypatch):
    gpu = FakeGpu(uuid=f"GPU-{_Props.uuid}")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Props())
    assert nvml_mod.find_handle(fake_nvml([gpu]), CUDA1, 0) == (gpu, f"GPU-{_Props.uuid}")
    with pytest.raises(GpuNotFoundError, match=f"UUID GPU-{_Props.uuid} or MIG-{_Props.uuid}"):
        nvml_mod.find_handle(fake_nvml([FakeGpu(uuid="GPU-0")]), CUDA1, 0)
