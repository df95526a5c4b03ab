"""Checks made when planning (w2w-sweep --plan), before anything is submitted: data, tokenizer, data hash."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from w2w.launch.plan import make_plan

from tests.conftest import cli
from w2w.errors import ConfigError
from w2w.tokenizer import TINY_TOKENIZER


def _gsm8k_file(path: Path, n: int) -> Path:
    path.write_text("".join(f'{{"question": "q{i}?"}}\n' for i in range(n)))
    return path


def test_editing_the_prompt_file_changes_the_cell_ids_and_it_is_read_once(tmp_path, monkeypatch):
    import w2w.data

    data = _gsm8k_file(tmp_path / "g.jsonl", 8)
    grid = ["dataset=gsm8k", f"dataset.path={data}", "dataset.num_prompts=4", "batch_size=1,2,4",
            f"sweep_dir={tmp_path / 'sweep'}"]
    reads: list[Path] = []
    real = w2w.data.file_sha256
    monkeypatch.setattr(w2w.data, "file_sha256", lambda path: reads.append(path) or real(path))
    before = [cell.id for cell in make_plan(grid).cells]
    assert len(before) == 3 and len(reads) == 1  # one dataset, three cells: hashed once
    assert make_plan(grid).cells[0].cell.dataset.content_sha256 == real(data)
    assert [cell.id for cell in make_plan(grid).cells] == before  # same bytes, same ids
    data.write_text(data.read_text().replace("q3?", "q3 edited?"))
    after = [cell.id for cell in make_plan(grid).cells]
    assert not set(after) & set(before)


def test_a_job_refuses_a_prompt_file_edited_after_planning(tmp_path):
    from w2w.data import check_unchanged

    data = _gsm8k_file(tmp_path / "g.jsonl", 4)
    (cell,) = make_plan(["dataset=gsm8k", f"dataset.path={data}", "dataset.num_prompts=2"]).cells
    check_unchanged(cell.cell.dataset)
    data.write_text(data.read_text() + '{"question": "new?"}\n')
    with pytest.raises(ConfigError, match=r"g.jsonl was edited after the sweep was planned: re-run w2w-sweep"):
        check_unchanged(cell.cell.dataset)


def test_synthetic_cells_carry_no_content_hash():
    (cell,) = make_plan(["dataset=synthetic"]).cells
    assert cell.cell.dataset.content_sha256 is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the with ends: connections are refused


@pytest.fixture
def no_hub(monkeypatch):
    """A hub that refuses connections, as on a node or laptop without network."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def _plan(path: Path, *extra: str):
    return make_plan(["dataset=gsm8k", f"dataset.path={path}", "dataset.num_prompts=2", *extra])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [("p.jsonl", '{"question": "a?"}\n{"question": "b?",\n', r"p.jsonl: line 2 is not JSON \(Expecting"),
     ("p.jsonl", "\n  \n\n", r"p.jsonl: the file has no rows \(only blank lines\)"),
     ("p.jsonl", '{"question": "a?"}\n\n{"text": "b?"}\n', r"p.jsonl: line 3 has no field 'question' \(gsm8k needs "
                                                             r"question; it has text\)"),
     ("p.json", '[{"question": "a?"}, {"question": null}]', r"p.json: row 2 has field 'question' null, not text"),
     ("p.json", '{"question": "a?"', r"p.json: not valid JSON at line 1 column 18"),
     ("p.csv", 'question,answer\n"a?",1\nb?,2,3\n', r"p.csv: line 3 has 3 fields but the header has 2"),
     ("p.csv", "question,answer\na?,1\n,2\n", r"p.csv: line 3 has field 'question' empty, not text"),
     ("p.jsonl", '{"question": "a?"}\n', r"dataset.num_prompts=2 but .*p.jsonl has 1 rows: lower dataset.num_prompts")],
)
def test_bad_prompt_files_are_named_by_file_row_and_field_at_plan_time(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        _plan(path)


def test_a_csv_prompt_file_plans_and_loads(tmp_path):
    from w2w.data import load_prompts

    path = tmp_path / "g.csv"
    path.write_text('question,answer\n"How many, in all?",3\nWhat is 2+2?,4\n')
    (cell,) = _plan(path).cells
    assert sorted(load_prompts(cell.cell.dataset)) == ["How many, in all?", "What is 2+2?"]


def test_bad_prompt_file_is_one_line_from_w2w_sweep_plan(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "a?"}\n{"question": "b?"\n')
    out = cli("w2w.launch.sweep", "--plan", "dataset=gsm8k", f"dataset.path={path}", "dataset.num_prompts=2",
              check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"w2w-sweep: error: dataset.path={path}: line 2 is not JSON " \
                                 "(Expecting ',' delimiter, column 18): fix or remove that line"


def test_an_unreachable_hub_fails_fast_and_says_to_give_a_local_file(no_hub, monkeypatch):
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"dataset.path=openai/gsm8k is a Hugging Face hub name but 127.0.0.1 "
                                          r"cannot be reached .*: give a local copy, e.g. dataset.path=/data/gsm8k.jsonl"):
        make_plan(["dataset=gsm8k"])
    assert time.monotonic() - start < 5  # one refused connection, not 25 s of retries
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the user reads it from the datasets cache
    assert len(make_plan(["dataset=gsm8k"]).cells) == 1


def test_the_node_also_fails_fast_on_an_unreachable_hub(no_hub):
    from w2w.config import compose_cell
    from w2w.data import load_prompts

    cfg = compose_cell(["dataset=alpaca"])
    with pytest.raises(ConfigError, match="tatsu-lab/alpaca is a Hugging Face hub name"):
        load_prompts(cfg.dataset)


def test_tokenizer_vocab_is_checked_against_the_model_at_plan_time():
    with pytest.raises(ConfigError, match=r"tiny_tokenizer.model has 512 pieces but model tiny has vocab_size=96: "
                                          r"set model.tokenizer_path"):
        make_plan(["model.vocab_size=96", f"model.tokenizer_path={TINY_TOKENIZER}"])
    assert make_plan([f"model.tokenizer_path={TINY_TOKENIZER}"]).cells  # 512 == 512
    with pytest.raises(ConfigError, match=r"tokenizer model /nonexistent/t.model not found"):
        make_plan(["model.tokenizer_path=/nonexistent/t.model"])


def test_a_prompt_that_cannot_fit_fails_at_plan_naming_its_row_and_the_ways_out(tmp_path):
    """Prompts are kept whole by default: one longer than max_seq_len - max_gen_len is refused before any job."""
    data = tmp_path / "g.jsonl"
    questions = ["q0?", "q1?", " ".join(["how many apples are left"] * 4) + "?", "q3?"]
    data.write_text("".join(f'{{"question": "{q}"}}\n' for q in questions))
    grid = ["dataset=gsm8k", f"dataset.path={data}", "dataset.num_prompts=4", "model.max_seq_len=64", "max_gen_len=32"]
    with pytest.raises(ConfigError, match=r"dataset=gsm8k row 3: its prompt is 54 tokens but model.max_seq_len=64 "
                                          r"- max_gen_len=32 leaves 32 \(engine=fast\): lower max_gen_len to 10 or less, raise "
                                          r"model.max_seq_len to 86 or more, or set dataset.max_prompt_tokens=N"):
        make_plan(grid)
    (cut,) = make_plan([*grid, "dataset.max_prompt_tokens=16"]).cells  # asked for: cut on the node, BOS first
    assert cut.memory.kv_cache_gib > 0


def test_llama1_runs_a_prompt_that_leaves_less_than_max_gen_len_as_meta_did(tmp_path):
    """LLaMA-1's code runs to min(max_seq_len, prompt + max_gen_len): the 54-token prompt that fast and
    llama2 cannot run whole in 64 - 32 positions runs under llama1, and its cache is max_seq_len long."""
    from w2w.launch.plan import cache_positions

    data = tmp_path / "g.jsonl"
    questions = ["q0?", "q1?", " ".join(["how many apples are left"] * 4) + "?", "q3?"]
    data.write_text("".join(f'{{"question": "{q}"}}\n' for q in questions))
    grid = ["dataset=gsm8k", f"dataset.path={data}", "dataset.num_prompts=4", "model.max_seq_len=64", "max_gen_len=32",
            "batch_size=2"]
    with pytest.raises(ConfigError, match=r"row 3: its prompt is 54 tokens .* leaves 32 \(engine=llama2\)"):
        make_plan([*grid, "engine=llama2"])
    (planned,) = make_plan([*grid, "engine=llama1"]).cells
    assert cache_positions(planned.cell, 54) == 2 * 64  # batch x max_seq_len, not x (54 + 32)


def test_the_memory_estimate_takes_the_longest_prompt_kept_whole():
    from w2w.launch.plan import estimate_memory

    from w2w.config import compose_cell
    from w2w.data import load_prompts
    from w2w.tokenizer import Tokenizer

    grid = ["dataset.num_prompts=16", "batch_size=4", "max_gen_len=8"]
    (planned,) = make_plan(grid).cells
    longest = max(len(Tokenizer(TINY_TOKENIZER).encode(p)) for p in load_prompts(compose_cell(grid).dataset))
    shapes = planned.cell.model.shapes()
    assert planned.memory == estimate_memory(planned.cell, shapes, longest)
    # fast (the default engine) allocates a multiple of 64 positions: one more row of 64 is more memory
    assert planned.memory != estimate_memory(planned.cell, shapes, longest + 64)


def test_the_memory_estimate_allocates_what_the_engine_does():
    """The planner's cache length is the engine's own rule (EngineSpec.cache_len): fast rounds up to 64,
    llama1 allocates model.max_seq_len whatever the prompts (Meta's), llama2 takes prompt + max_gen_len as it is."""
    from w2w.launch.plan import cache_positions

    from w2w.config import compose_cell

    grid = ["batch_size=2", "max_gen_len=8", "model.max_seq_len=100"]
    assert [cache_positions(compose_cell([*grid, f"engine={e}"]), 90) for e in ("fast", "llama1", "llama2")] == [
        2 * 100, 2 * 100, 2 * 98]
    assert [cache_positions(compose_cell([*grid, f"engine={e}"]), 5) for e in ("fast", "llama1")] == [2 * 64, 2 * 100]
    assert [cache_positions(compose_cell([*grid, f"engine={e}"]), 95) for e in ("fast", "llama1")] == [2 * 103, 2 * 100]


def test_a_cut_keeps_bos_first_and_counts_the_prompts_cut():
    from w2w.tokenizer import Tokenizer, cut_prompt, encode_prompts

    tokenizer = Tokenizer(TINY_TOKENIZER)
    long_text, short_text = " ".join(["the cat sat on the mat"] * 10), "a cat"
    whole = tokenizer.encode(long_text)
    encoded, cut = encode_prompts([long_text, short_text], tokenizer, 8)
    assert cut == 1 and encoded[0] == [tokenizer.bos_id, *whole[-7:]] and encoded[1] == tokenizer.encode(short_text)
    assert encode_prompts([long_text], tokenizer, None) == ([whole], 0)  # the default: kept whole
    assert cut_prompt(whole, 1, tokenizer.bos_id) == [tokenizer.bos_id]
    with pytest.raises(ValueError, match=r"set dataset\.max_prompt_tokens"):
        encode_prompts([long_text], tokenizer, None, fits=len(whole) - 1)
    # issue 28.10: the row is named from 1, and a shorter generation is not offered where it cannot help
    with pytest.raises(ValueError, match=r"^dataset row 8: its prompt of \d+ tokens does not fit the 4 that "
                                         r"model.max_seq_len - max_gen_len leaves: raise model.max_seq_len"):
        encode_prompts([short_text, long_text], tokenizer, None, fits=4, rows=[0, 7], max_seq_len=len(whole))
    with pytest.raises(ValueError, match=r"leaves: lower max_gen_len, raise"):
        encode_prompts([long_text], tokenizer, None, fits=4, rows=[0], max_seq_len=len(whole) + 1)
