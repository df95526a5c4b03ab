"""Test only: with W2W_TEST_FAKE_NVML=1 and this folder on PYTHONPATH, every rank of a subprocess sweep meters a fake GPU.

The monitor gets tests/fake_nvml.py's autospecced pynvml (8 fake GPUs, rank i draws FAKE_WATTS[i]); nothing
else changes, so a real `w2w-sweep --wait` on the local executor writes records, energy and timelines as on
a GPU node. Patched lazily, when w2w.energy.monitor is first imported, so other processes pay nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

FAKE_WATTS = (150.0, 210.0, 170.0, 230.0, 160.0, 220.0, 180.0, 240.0)
TARGET = "w2w.energy.monitor"


def _patch(module) -> None:
    from tests.fake_nvml import FakeGpu, fake_nvml

    base = module.EnergyMonitor

    class FakeGpuMonitor(base):
        def __init__(self, *args, **kwargs):
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)  # the fake GPUs are numbered by local rank
            gpus = [FakeGpu(uuid=f"GPU-fake-{i}", power_w=w) for i, w in enumerate(FAKE_WATTS)]
            super().__init__(*args, **(kwargs | {"nvml": fake_nvml(gpus)}))

    FakeGpuMonitor.__name__ = FakeGpuMonitor.__qualname__ = "EnergyMonitor"
    module.EnergyMonitor = FakeGpuMonitor


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            _patch(module)

        loader.exec_module = exec_module
        return spec


if os.environ.get("W2W_TEST_FAKE_NVML") == "1":
    sys.meta_path.insert(0, _Finder())
