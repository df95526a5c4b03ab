"""Shared fixtures: the local SLURM (provisioned by launch/slurm_local.sh), CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# No network in tests: hub dataset names (the paper presets') plan from the datasets cache, as a
# user without network would run them; tests of the unreachable-hub error unset this.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
IN_CI = os.environ.get("CI") == "true"


def cli(module: str, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a w2w command-line entry point as a user would, in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def local_slurm() -> None:
    """A running two-node local SLURM; skipped without root, except in CI where it must run."""
    script = ROOT / "launch" / "slurm_local.sh"
    if subprocess.run(["bash", str(script), "status"], capture_output=True).returncode == 0:
        return
    if os.geteuid() != 0:
        reason = "the local SLURM needs root (make slurm-up as root)"
        if IN_CI:
            pytest.fail(f"CI=true requires the SLURM tests to run: {reason}")
        pytest.skip(reason)
    up = subprocess.run(["bash", str(script), "up"], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail(f"make slurm-up failed:\n{up.stdout}\n{up.stderr}")
