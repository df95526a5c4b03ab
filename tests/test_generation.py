"""Generation by every engine: padding, EOS handling, forced lengths, sampling identical across calls and ranks."""

from __future__ import annotations

import pytest
import torch

from tests.parallel import run_parallel
from w2w import distributed, engines
from w2w.engines.common import SamplingParams, sample_top_p
from w2w.model import ModelArgs, build_model, random_state_dict

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=128)


@pytest.fixture(scope="module")
def model():
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(1, 1)
    return build_model(ARGS, random_state_dict(ARGS, seed=5), torch.device("cpu"), torch.float32)


PROMPTS = [[1, 5, 9, 12, 7, 30], [1, 44], [1, 3, 3, 8]]


@pytest.mark.parametrize("name", engines.ENGINES)
def test_padding_does_not_change_greedy_output(model, name):
    engine = engines.create(name, model)
    params = SamplingParams(max_gen_len=12, greedy=True, force_max_gen_len=True)
    batched = engine.generate(PROMPTS, params, eos_id=2, pad_id=0).tokens
    alone = [engine.generate([p], params, eos_id=2, pad_id=0).tokens[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(t) == 12 for t in batched)


def test_eos_ends_each_sequence_and_the_batch_stops_early(model):
    fast = engines.create("fast", model)  # the decode step counts below are fast's schedule
    forced = fast.generate(PROMPTS, SamplingParams(max_gen_len=40, greedy=True, force_max_gen_len=True), 2, 0).tokens
    eos = forced[0][1]  # the second token of the first row, absent from the second row
    assert eos not in forced[1]
    result = fast.generate(PROMPTS, SamplingParams(max_gen_len=40, greedy=True), eos_id=eos, pad_id=0)
    for row, full in zip(result.tokens, forced, strict=True):
        assert row == (full[: full.index(eos)] if eos in full else full)
    assert result.decode_steps == 39  # one row never ends: the batch runs to max_gen_len
    alone = fast.generate([PROMPTS[0]], SamplingParams(max_gen_len=40, greedy=True), eos_id=eos, pad_id=0)
    assert alone.tokens == [forced[0][:1]] and alone.decode_steps == 1  # every row ended: stop at once


@pytest.mark.parametrize("name", engines.ENGINES)
def test_sampling_is_seeded(model, name):
    engine = engines.create(name, model)
    params = SamplingParams(max_gen_len=10, temperature=0.8, top_p=0.95, seed=3, force_max_gen_len=True)
    a = engine.generate(PROMPTS, params, eos_id=2, pad_id=0).tokens
    b = engine.generate(PROMPTS, params, eos_id=2, pad_id=0).tokens
    c = engine.generate(PROMPTS, SamplingParams(max_gen_len=10, seed=4, force_max_gen_len=True), 2, 0).tokens
    assert a == b != c


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    gen = torch.Generator().manual_seed(0)
    draws = {sample_top_p(probs, 0.7, gen).item() for _ in range(200)}
    assert draws == {0, 1}


def _sampled(world: int) -> dict[str, list[list[int]]]:
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(world, world)
    rank = torch.distributed.get_rank()
    m = build_model(ARGS, random_state_dict(ARGS, 5, rank, world), torch.device("cpu"), torch.float32)
    params = SamplingParams(max_gen_len=8, seed=11, force_max_gen_len=True)
    return {name: engines.create(name, m).generate(PROMPTS, params, 2, 0).tokens for name in engines.ENGINES}


def test_every_rank_samples_the_same_tokens():
    per_rank = run_parallel(2, _sampled, 2)
    assert per_rank[0] == per_rank[1]
