"""save_responses, prompt templates and k-shot prefixes through w2w-run, and response scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from w2w.analysis.reduce import reduce_sweep

from tests.conftest import cli
from w2w.cell import DatasetConfig
from w2w.data import Prompt, load_prompt_rows
from w2w.errors import ConfigError
from w2w.records import read_record
from w2w.responses import Responses
from w2w.tokenizer import TINY_TOKENIZER, Tokenizer

ROWS = Path(__file__).parent / "data" / "gsm8k_rows.jsonl"
TEMPLATE = "Question: {prompt}\nAnswer:"


def _dataset(**extra):
    return DatasetConfig(**{"name": "gsm8k", "path": str(ROWS), "split": "train", "num_prompts": 4, "seed": 0} | extra)


def test_template_and_kshot_prefix_wrap_every_prompt(tmp_path):
    plain = load_prompt_rows(_dataset())
    shots = tmp_path / "shots.jsonl"
    shots.write_text(json.dumps({"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}) + "\n"
                     + json.dumps({"question": "What is 2+2?", "answer": "#### 4"}) + "\n")
    wrapped = load_prompt_rows(_dataset(prompt_template=TEMPLATE, fewshot_path=str(shots), fewshot_k=1))
    assert [p.id for p in wrapped] == [p.id for p in plain]  # same rows, same order
    for before, after in zip(plain, wrapped, strict=True):
        assert after.text == f"Question: What is 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: {before.text}\nAnswer:"
        assert after.reference == before.reference and "####" in after.reference


@pytest.mark.parametrize(("extra", "fragment"), [
    ({"prompt_template": "Q: {question}"}, "dataset.prompt_template='Q: {question}' has no {prompt} slot"),
    ({"fewshot_k": 2}, "dataset.fewshot_k=2 needs dataset.fewshot_path"),
    ({"fewshot_k": 3, "fewshot_path": str(ROWS)}, None),
    ({"fewshot_k": 7, "fewshot_path": str(ROWS)}, "has 6 rows with question and answer; dataset.fewshot_k=7"),
    ({"name": "alpaca", "fewshot_k": 1, "fewshot_path": str(ROWS)}, "k-shot prefixes are for gsm8k only"),
])
def test_bad_template_options_name_the_option(extra, fragment):
    if fragment is None:
        assert len(load_prompt_rows(_dataset(**extra))) == 4
        return
    with pytest.raises(ConfigError) as err:
        load_prompt_rows(_dataset(**extra))
    assert fragment in str(err.value)


def test_responses_score_gsm8k_and_say_how_each_ended():
    rows = [Prompt(0, "q", "x\n#### 1,200"), Prompt(1, "q", "#### -3"), Prompt(2, "q", "#### 3")]
    responses = Responses("gsm8k", keep=True)
    responses.add(rows, [5, 6, 7], [[1, 2], [1, 2, 3], []], ["$1,200.", "it is 3", ""],
                  ["eos", "max_gen_len", "max_seq_len"])
    assert (responses.scored, responses.correct, responses.unscorable) == (3, 1, 0)
    assert [line["ended_by"] for line in responses.lines] == ["eos", "max_gen_len", "max_seq_len"]
    assert responses.ended == {"eos": 1, "max_gen_len": 1, "max_seq_len": 1}
    assert [line["correct"] for line in responses.lines] == [True, False, False]
    unscored = Responses("alpaca")
    unscored.add([Prompt(0, "q")], [5], [[1]], ["5"], ["eos"])
    assert (unscored.scored, unscored.lines) == (0, [])


def test_an_answer_that_cannot_be_scored_is_counted_apart_never_as_wrong():
    # Issue 28: a GSM8K answer "" or "42" (no '####') was scored, always wrong, and lowered accuracy.
    rows = [Prompt(0, "q", ""), Prompt(1, "q", "42"), Prompt(2, "q", "#### 7")]
    responses = Responses("gsm8k", keep=True)
    responses.add(rows, [1, 1, 1], [[1], [1], [1]], ["42", "42", "7"], ["eos"] * 3)
    assert (responses.scored, responses.correct, responses.unscorable) == (1, 1, 2)
    assert [line["correct"] for line in responses.lines] == [None, None, True]


def test_llama1_says_a_row_cut_by_max_seq_len_ended_there_not_at_eos():
    # Issue 28: a llama1 row cut at max_seq_len (shorter than max_gen_len, no EOS) said "eos".
    import torch

    from tests.aten_trace import ARGS, PROMPTS, SEED
    from w2w import distributed, engines
    from w2w.engines.common import SamplingParams
    from w2w.model import build_model, random_state_dict

    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(1, 1)
    model = build_model(ARGS, random_state_dict(ARGS, SEED), torch.device("cpu"), torch.float32)
    params = SamplingParams(max_gen_len=ARGS.max_seq_len - 3, greedy=True)
    gen = engines.create("llama1", model).generate(PROMPTS, params, -1, 0)  # an EOS id never sampled
    # total_len = min(32, 6 + 29): the 6- and 4-token prompts' rows end at max_seq_len, the 2-token one's at 29
    assert [len(row) for row in gen.tokens] == [26, 29, 28]
    assert gen.ended_by == ["max_seq_len", "max_gen_len", "max_seq_len"]
    eos = gen.tokens[1][0]  # an EOS the 2-token row samples first: it ends there
    assert engines.create("llama1", model).generate(PROMPTS, params, eos, 0).ended_by[1] == "eos"


def test_w2w_run_saves_responses_on_rank_0_and_the_reducer_adds_accuracy(tmp_path):
    cli("w2w.run_cli", "dataset=gsm8k", f"dataset.path={ROWS}", "dataset.num_prompts=6", "dataset.max_prompt_tokens=400",
        f"dataset.prompt_template={TEMPLATE!r}", "save_responses=true", "precision=fp32", "max_gen_len=6",
        "batch_size=4", "greedy=true", f"sweep_dir={tmp_path}")
    (folder,) = (tmp_path / "cells").iterdir()
    record = read_record(folder / "rank-00000.json")
    assert record.responses == {"requested": True, "saved": True, "file": "responses.jsonl", "score_reason": None}
    assert record.params["save_responses"] is True
    lines = [json.loads(line) for line in (folder / "responses.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and record.counts.scored == 6
    assert record.counts.correct == sum(line["correct"] for line in lines)
    tokenizer = Tokenizer(TINY_TOKENIZER)
    for line in lines:
        assert line["prompt"].startswith("Question: ") and line["prompt"].endswith("\nAnswer:")
        assert line["prompt_tokens"] == len(tokenizer.encode(line["prompt"]))  # the template counts
        assert line["ended_by"] in ("eos", "max_gen_len") and set(line) >= {"prompt_id", "response", "output_tokens"}
    assert record.counts.prompt_tokens == sum(line["prompt_tokens"] for line in lines)
    ended = {how: sum(line["ended_by"] == how for line in lines) for how in ("eos", "max_gen_len", "max_seq_len")}
    assert (record.counts.ended_eos, record.counts.ended_max_gen_len, record.counts.ended_max_seq_len) == (
        ended["eos"], ended["max_gen_len"], ended["max_seq_len"])
    assert record.counts.unscorable == 0
    (row,) = reduce_sweep(tmp_path).to_dict("records")
    assert row["scored"] == 6 and row["accuracy"] == row["correct"] / 6 and row["responses_saved"]
    assert row["ended_eos"] + row["ended_max_gen_len"] + row["ended_max_seq_len"] == 6


def test_alpaca_cells_have_no_accuracy_and_say_why(tmp_path):
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": str(i)}) + "\n"
                              for i in range(3)))
    cli("w2w.run_cli", "dataset=alpaca", f"dataset.path={alpaca}", "dataset.num_prompts=3", "precision=fp32",
        "max_gen_len=4", f"sweep_dir={tmp_path}")
    assert not list(tmp_path.glob("cells/*/responses.jsonl"))  # off by default
    (row,) = reduce_sweep(tmp_path).to_dict("records")
    assert pd.isna(row["accuracy"]) and pd.isna(row["energy_per_correct_j"]) and not row["responses_saved"]
    assert "dataset alpaca has no reference answers" in row["score_note"]


def test_new_options_at_their_defaults_keep_the_cell_ids_of_older_sweeps():
    import hashlib

    from w2w.cell import ID_EXCLUDED, ID_EXCLUDED_IN, ID_NEW_DEFAULTS, ID_NEW_SECTIONS
    from w2w.config import compose_cell

    cfg = compose_cell(["dataset.num_prompts=4"])
    data = cfg.to_dict()
    for key in ID_EXCLUDED:
        data.pop(key, None)
    for section, keys in ID_EXCLUDED_IN.items():  # facts of the hardware (gpu.hbm_gbs), not settings
        for key in keys:
            data[section].pop(key)
    for section, defaults in ID_NEW_DEFAULTS.items():  # what a config from before these options held
        for key in defaults:
            (data[section] if section else data).pop(key)
    for section in ID_NEW_SECTIONS:  # a section newer than the sweep (serving): absent from it
        assert data.pop(section) == {}
    older = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]
    assert cfg.id == older
    changed = [["save_responses=true"], ["dataset.prompt_template='Q: {prompt}'"], ["model.eos_token='</s>'"],
               ["model.rope_scaling_factor=8"]]
    ids = {compose_cell(["dataset.num_prompts=4", *extra]).id for extra in changed}
    assert older not in ids and len(ids) == len(changed)
    h100 = compose_cell(["dataset.num_prompts=4", "gpu=h100"])
    assert h100.gpu.hbm_gbs == 3350 and compose_cell(["dataset.num_prompts=4", "gpu=h100", "gpu.hbm_gbs=1"]).id == h100.id
