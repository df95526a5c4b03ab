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
