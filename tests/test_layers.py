"""The import layers of pyproject.toml hold, and an import that runs upward breaks `make lint`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "lint_imports.sh"
LINT = str(Path(sys.executable).parent / "lint-imports")


def _lint(repo: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"LINT_IMPORTS": LINT}
    return subprocess.run(["bash", str(SCRIPT), str(repo)], capture_output=True, text=True, env=env, timeout=300)


def test_the_layers_hold():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def _copy(tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    for part in ("w2w", "launch", "analysis"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    return copy


def test_an_upward_import_breaks_the_layers(tmp_path):
    copy = _copy(tmp_path)
    records = copy / "w2w" / "records.py"
    records.write_text(records.read_text() + "\nfrom w2w.launch import sweep  # noqa: E402, F401\n")
    result = _lint(copy)
    assert result.returncode != 0
    assert "w2w imports only downward BROKEN" in result.stdout
    assert "w2w.records -> w2w.launch.sweep" in result.stdout


def test_an_import_cycle_inside_a_layer_is_refused(tmp_path):
    copy = _copy(tmp_path)  # model and tokenizer may import each other by the layers, not in a cycle
    model = copy / "w2w" / "model.py"
    model.write_text(model.read_text() + "\nfrom w2w import tokenizer  # noqa: E402, F401\n")
    tokenizer = copy / "w2w" / "tokenizer.py"
    tokenizer.write_text(tokenizer.read_text() + "\nfrom w2w import model  # noqa: E402, F401\n")
    result = _lint(copy)
    assert result.returncode != 0 and "no import cycles BROKEN" in result.stdout
