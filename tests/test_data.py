"""Prompt sets through the datasets library on local files; synthetic prompts offline."""

from __future__ import annotations

import json

import pytest

from w2w.cell import DatasetConfig
from w2w.data import ALPACA_NO_INPUT, load_prompts, synthetic_prompts
from w2w.errors import ConfigError


def _cfg(name, path, n, seed=0):
    return DatasetConfig(name=name, path=str(path), split="train", num_prompts=n, seed=seed)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_uses_the_template_with_and_without_input(tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Name a colour.", "input": "", "output": "red"}]
    prompts = load_prompts(_cfg("alpaca", _write_jsonl(tmp_path / "a.jsonl", rows), 2))
    by_instruction = {("Add" in p): p for p in prompts}
    assert "### Input:\n2 and 3\n\n### Response:" in by_instruction[True]
    assert by_instruction[False] == ALPACA_NO_INPUT.format(instruction="Name a colour.")


def test_gsm8k_samples_with_a_seed_from_a_json_file(tmp_path):
    rows = [{"question": f"q{i}?", "answer": str(i)} for i in range(50)]
    path = tmp_path / "g.json"
    path.write_text(json.dumps(rows))
    first = load_prompts(_cfg("gsm8k", path, 10, seed=7))
    assert first == load_prompts(_cfg("gsm8k", path, 10, seed=7))
    assert first != load_prompts(_cfg("gsm8k", path, 10, seed=8))
    assert len(set(first)) == 10 and all(p.startswith("q") for p in first)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), ("", "empty"), ('{"text": "x"}\n', "line 1 has no field 'question'"),
     ('{"question": "a"}\n', "num_prompts=5 but")],
)
def test_bad_prompt_files_are_clear(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_prompts(_cfg("gsm8k", path, 5))
    assert "dataset." in str(info.value)


def test_synthetic_prompts_are_deterministic():
    assert synthetic_prompts(5, 1) == synthetic_prompts(5, 1) != synthetic_prompts(5, 2)
