"""w2w-generate: one prompt's completion from a checkpoint, at one and at two shards."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.parallel import run_parallel
from tests.test_checkpoint import write_meta
from w2w.config import compose_cell
from w2w.generate_cli import main, split_prompt
from w2w.model import parameter_shapes, random_full_tensor
from w2w.tokenizer import TINY_TOKENIZER

PROMPT = "the energy of a model grows with"
COMMON = ["gpu=cpu", "precision=fp32", "greedy=true", "max_gen_len=12", "force_max_gen_len=true"]


def _run_main(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The tiny preset's random weights (init_seed 0) saved as a 2-shard Meta checkpoint."""
    from w2w.checkpoint import model_args

    cfg = compose_cell(["model=tiny"])
    args = model_args(cfg.model)
    state = {n: random_full_tensor(n, s, cfg.model.init_seed) for n, s in parameter_shapes(args).items()}
    ckpt = write_meta(tmp_path_factory.mktemp("gen") / "tiny", state, 2, args)
    shutil.copyfile(TINY_TOKENIZER, ckpt / "tokenizer.model")
    return ckpt


def test_split_prompt_keeps_commas_and_equals():
    prompt, rest = split_prompt(["shards=2", "prompt=a, b = c", "greedy=true"])
    assert prompt == "a, b = c" and rest == ["shards=2", "greedy=true"]


def test_usage_errors(capsys):
    assert main(["greedy=true"]) == 2
    assert "no prompt given" in capsys.readouterr().err
    assert main(["batch_size=1,2", "prompt=x"]) == 2
    assert "one configuration" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "prompt=" in capsys.readouterr().out


@pytest.mark.slow
def test_checkpoint_at_1_and_2_shards_matches_random_weights(tiny_ckpt):
    random_code, random_text = run_parallel(1, _run_main, [*COMMON, f"prompt={PROMPT}"])[0]
    assert random_code == 0 and random_text.strip()
    one = run_parallel(1, _run_main, [*COMMON, f"model.checkpoint_dir={tiny_ckpt}", f"prompt={PROMPT}"])[0]
    assert one == (0, random_text)
    two = run_parallel(2, _run_main, [*COMMON, "shards=2", f"model.checkpoint_dir={tiny_ckpt}", f"prompt={PROMPT}"])
    assert two[0] == (0, random_text)
    assert two[1] == (0, "")  # only rank 0 prints


@pytest.mark.slow
def test_console_script_samples_and_reports_bad_checkpoints(tiny_ckpt, tmp_path):
    base = [sys.executable, "-m", "w2w.generate_cli", "gpu=cpu", "precision=fp32", "max_gen_len=6"]
    sampled = subprocess.run([*base, "temperature=0.9", f"model.checkpoint_dir={tiny_ckpt}", f"prompt={PROMPT}"],
                             capture_output=True, text=True, timeout=120)
    assert sampled.returncode == 0, sampled.stderr
    assert "loaded at 1 shard(s)" in sampled.stderr
    broken = shutil.copytree(tiny_ckpt, tmp_path / "broken")
    (broken / "consolidated.01.pth").unlink()
    failed = subprocess.run([*base, f"model.checkpoint_dir={broken}", f"prompt={PROMPT}"],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    assert "w2w-generate: error:" in failed.stderr and "missing shard files" in failed.stderr
