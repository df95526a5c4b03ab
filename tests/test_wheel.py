"""The built wheel, installed non-editably in a fresh venv, runs from any folder with its packaged configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import ROOT

SITE_PROFILE = """\
defaults:
  - base_cluster
name: mysite
backend: slurm
gpus_per_node: 4
max_nodes: 8
partition: gpu
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A wheel built from a copy of the sources, installed into a fresh venv whose dependencies
    come from this test's venv by a path entry (its editable-install hook is not run there)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "W2W_", "VIRTUAL_ENV"))}
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(root / "dist"), str(src)], root, env)
    (wheel,) = (root / "dist").glob("w2w-*.whl")
    fresh = root / "venv"
    venv.create(fresh, system_site_packages=True, with_pip=False)
    python = fresh / "bin" / "python"
    site = Path(_run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     root, env).stdout.strip())
    (site / "deps_from_test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
          str(wheel)], root, env)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return {"bin": fresh / "bin", "python": python, "cwd": elsewhere, "env": env, "site": site}


def test_the_installed_package_is_not_the_checkout(installed):
    out = _run([str(installed["python"]), "-I", "-c", "import w2w.config as c; print(c.__file__); "
                "print(c.package_config_dir())"], installed["cwd"], installed["env"]).stdout.split()
    assert all(Path(p).is_relative_to(installed["site"]) for p in out), out
    assert (Path(out[1]) / "model" / "llama_65b.yaml").is_file()
    # The benchmarks ship in the wheel: a GPU node with only the wheel runs `python -m w2w.bench.gpu_engines`.
    assert (Path(out[0]).parent / "bench" / "gpu_engines.py").is_file()


def test_plan_and_one_run_to_a_table_from_another_folder(installed):
    bin_, cwd, env = installed["bin"], installed["cwd"], installed["env"]
    plan = _run([str(bin_ / "w2w-sweep"), "--plan", "model=llama_7b,llama_13b", "gpu=a100", "shards=1"], cwd, env)
    assert "model=llama_7b" in plan.stdout and "2 cell(s)" in plan.stdout, plan.stdout
    bad = subprocess.run([str(bin_ / "w2w-sweep"), "--plan", "model=llama_3b"], cwd=cwd, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "valid options for model= are" in bad.stderr and "llama_65b" in bad.stderr

    sweep = cwd / "runs" / "tiny"
    _run([str(bin_ / "w2w-run"), "precision=fp32", "max_gen_len=4", "dataset.num_prompts=2", "batch_size=2",
          "energy.idle_seconds=0", f"sweep_dir={sweep}"], cwd, env)
    _run([str(bin_ / "w2w-reduce"), str(sweep)], cwd, env)
    table = (sweep / "results" / "cells.md").read_text()
    assert "| tiny |" in table and "| ok |" in table, table


def test_a_site_config_dir_adds_presets(installed, tmp_path):
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "mysite.yaml").write_text(SITE_PROFILE)
    bin_, cwd = installed["bin"], installed["cwd"]
    args = [str(bin_ / "w2w-sweep"), "--plan", "model=llama_65b", "gpu=a100", "shards=8", "cluster=mysite"]
    by_flag = _run([*args[:2], "--config-dir", str(tmp_path), *args[2:]], cwd, installed["env"])
    by_env = _run(args, cwd, installed["env"] | {"W2W_CONFIG_DIR": str(tmp_path)})
    for out in (by_flag.stdout, by_env.stdout):
        assert "2 node(s) x 4 task(s)" in out, out
