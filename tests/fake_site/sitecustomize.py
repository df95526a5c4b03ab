"""Test only: with this folder on PYTHONPATH, subprocesses of a test meter fake GPUs or hold at a barrier.

W2W_TEST_FAKE_NVML=1: every rank of a subprocess sweep meters a fake GPU. The monitor gets
tests/fake_nvml.py's autospecced pynvml (8 fake GPUs, rank i draws FAKE_WATTS[i]); nothing else changes,
so a real `w2w-sweep --wait` on the local executor writes records, energy and timelines as on a GPU node.

W2W_TEST_BARRIER=FILE with W2W_TEST_BARRIER_AFTER=cells:N or batches:N: a process of a SLURM job, once it
has written its N-th cell record (this process's count) or saved a cell's N-th batch, touches
FILE.held.PID and waits until FILE exists (tests/conftest.py's Barrier). A test thus signals a job while
exactly the cells or batches before the barrier are done, however loaded the machine is.

Modules are patched lazily, when first imported, so other processes pay nothing.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

FAKE_WATTS = (150.0, 210.0, 170.0, 230.0, 160.0, 220.0, 180.0, 240.0)
BARRIER_TIMEOUT_S = 900  # a job whose test died does not hold its nodes for ever


def _fake_nvml(module) -> None:
    from tests.fake_nvml import FakeGpu, fake_nvml

    base = module.EnergyMonitor

    class FakeGpuMonitor(base):
        def __init__(self, *args, **kwargs):
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)  # the fake GPUs are numbered by local rank
            gpus = [FakeGpu(uuid=f"GPU-fake-{i}", power_w=w) for i, w in enumerate(FAKE_WATTS)]
            super().__init__(*args, **(kwargs | {"nvml": fake_nvml(gpus)}))

    FakeGpuMonitor.__name__ = FakeGpuMonitor.__qualname__ = "EnergyMonitor"
    module.EnergyMonitor = FakeGpuMonitor


def _hold(barrier: Path) -> None:
    """Wait until the test creates the barrier file; the marker file tells it this process waits."""
    if not os.environ.get("SLURM_JOB_ID"):  # only the job's ranks hold, never the test's own commands
        return
    (barrier.parent / f"{barrier.name}.held.{os.getpid()}").touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while not barrier.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"test barrier {barrier} not opened within {BARRIER_TIMEOUT_S} s")
        time.sleep(0.1)  # polls a file; the test, not this loop, decides when the job goes on


def _barrier_after_cells(module, barrier: Path, count: int) -> None:
    """Hold after this process wrote its count-th cell record (a requeued job counts afresh)."""
    write_record = module.write_record
    written = 0

    @functools.wraps(write_record)
    def holding(*args, **kwargs):
        nonlocal written
        path = write_record(*args, **kwargs)
        written += 1
        if written == count:
            _hold(barrier)
        return path

    module.write_record = holding


def _barrier_after_batches(module, barrier: Path, count: int) -> None:
    """Hold once a cell's count-th batch is saved (a resumed cell starts past it and does not hold)."""
    add_batch = module.CellProgress.add_batch

    @functools.wraps(add_batch)
    def holding(self, *args, **kwargs):
        add_batch(self, *args, **kwargs)
        if self.done == count:
            _hold(barrier)

    module.CellProgress.add_batch = holding


class _Finder(importlib.abc.MetaPathFinder):
    """Runs patches[name](module) right after the module named name is first executed."""

    def __init__(self, patches: dict[str, Callable]):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        patch = self.patches.pop(name, None)
        if patch is None:
            return None
        if not self.patches:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # name is no longer ours: the real finders answer
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            patch(module)

        loader.exec_module = exec_module
        return spec


def _patches() -> dict[str, Callable]:
    patches: dict[str, Callable] = {}
    if os.environ.get("W2W_TEST_FAKE_NVML") == "1":
        patches["w2w.energy.monitor"] = _fake_nvml
    if os.environ.get("W2W_TEST_BARRIER"):
        barrier = Path(os.environ["W2W_TEST_BARRIER"])
        kind, _, count = os.environ.get("W2W_TEST_BARRIER_AFTER", "cells:1").partition(":")
        if kind == "cells":
            patches["w2w.records"] = functools.partial(_barrier_after_cells, barrier=barrier, count=int(count))
        elif kind == "batches":
            patches["w2w.progress"] = functools.partial(_barrier_after_batches, barrier=barrier, count=int(count))
        else:
            raise ValueError(f"W2W_TEST_BARRIER_AFTER={kind}:{count}: expected cells:N or batches:N")
    return patches


_PATCHES = _patches()
if _PATCHES:
    sys.meta_path.insert(0, _Finder(_PATCHES))
