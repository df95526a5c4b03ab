"""The llama1 engine: Meta's LLaMA-1 operators (a golden trace of llama_v1), schedule, logits, cache and tokens."""

from __future__ import annotations

import json

import pytest
import torch

from tests.aten_trace import (
    ARGS,
    EOS,
    GOLDEN,
    MAX_BATCH,
    PREFILL_LEN,
    PROMPTS,
    SEED,
    TRACE_TOKENS,
    prefill_and_decode,
    trace,
)
from w2w import distributed, engines
from w2w.config import compose_cell
from w2w.engines import fused
from w2w.engines.common import SamplingParams
from w2w.engines.llama1 import next_token
from w2w.errors import ConfigError
from w2w.model import ModelArgs, Transformer, build_model, random_state_dict
from w2w.shapes import ModelArgs as Shapes

GREEDY = SamplingParams(max_gen_len=12, greedy=True)
FORCED = SamplingParams(max_gen_len=12, greedy=True, force_max_gen_len=True)


@pytest.fixture(scope="module")
def model() -> Transformer:
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(1, 1)
    return build_model(ARGS, random_state_dict(ARGS, SEED), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def _llama1(model: Transformer) -> engines.common.Engine:
    return engines.create("llama1", model)


def _calls(model: Transformer, engine: engines.common.Engine, monkeypatch) -> list[tuple[int, int, int]]:
    """(start position, positions, batch) of every forward call the engine makes from now on."""
    calls: list[tuple[int, int, int]] = []

    def spy(owner, method: str, start_of) -> None:
        inner = getattr(owner, method)
        monkeypatch.setattr(owner, method, lambda t, s, *a, **k: calls.append((start_of(s), t.shape[1], t.shape[0]))
                            or inner(t, s, *a, **k))

    if hasattr(engine, "table"):  # llama1 runs its own forward over the model's weights
        spy(engine, "forward", int)
    else:  # llama2 and fast's prefill call the model; fast's decode steps call its fused step (a (B,) token)
        spy(model, "forward", int)
        inner = fused.FusedDecode.__call__
        monkeypatch.setattr(fused.FusedDecode, "__call__", lambda self, t, slot, *a: calls.append(
            (int(slot), 1, t.shape[0])) or inner(self, t, slot, *a))
    return calls


def test_llama1_runs_the_aten_operators_of_meta_llama_v1(model, golden):
    engine = _llama1(model)
    engine.prepare(MAX_BATCH, ARGS.max_seq_len)  # the shape of Meta's cache in the golden run
    ours = prefill_and_decode(engine.forward)
    assert (len(ours["prefill"]), len(ours["decode"])) == (len(golden["prefill"]), len(golden["decode"])) == (174, 167)
    assert ours["prefill"] == golden["prefill"]
    assert ours["decode"] == golden["decode"]


def test_llama1_gives_meta_llama_v1_greedy_tokens(model, golden):
    assert _llama1(model).generate(PROMPTS, GREEDY, EOS, 0).tokens == golden["meta_greedy"]["12"]


def test_llama1_logits_are_batch_by_vocab(model):
    engine = _llama1(model)
    engine.prepare(3, ARGS.max_seq_len)
    with torch.inference_mode():
        logits = engine.forward(torch.tensor([p[:2] for p in PROMPTS]), 0)
    assert logits.shape == (3, ARGS.vocab_size) and logits.dtype == torch.float32


@pytest.mark.parametrize("name", engines.ENGINES)
def test_forward_call_schedule_of_a_ragged_batch(model, monkeypatch, name):
    """Prompts of 6, 2 and 4 tokens, 12 new tokens: Meta's programs start at the shortest prompt and
    force the longer ones in; fast prefills the longest prompt, then decodes one slot per call."""
    engine = engines.create(name, model)
    calls = _calls(model, engine, monkeypatch)
    gen = engine.generate(PROMPTS, FORCED, EOS, 0)
    if name == "fast":
        expected = [(0, 6, 3)] + [(slot, 1, 3) for slot in range(6, 17)]
    else:
        expected = [(0, 2, 3)] + [(start, 1, 3) for start in range(2, 17)]  # total_len = 6 + 12 = 18
    assert calls == expected
    assert gen.decode_steps == len(expected) - 1
    assert gen.positions == sum(length * batch for _, length, batch in expected) == 51


def test_llama1_runs_to_total_len_when_every_row_has_ended(model, monkeypatch):
    first = _llama1(model).generate(PROMPTS[:1], FORCED, EOS, 0).tokens[0][0]  # EOS = the first new token
    llama1 = _llama1(model)
    calls = _calls(model, llama1, monkeypatch)
    ended = llama1.generate(PROMPTS[:1], GREEDY, first, 0)
    assert ended.tokens == [[]] and ended.decode_steps == 11 and len(calls) == 12  # cur 6 .. 17: no early stop
    assert calls[-1] == (16, 1, 1) and ended.positions == 6 + 11
    llama2 = engines.create("llama2", model).generate(PROMPTS[:1], GREEDY, first, 0)
    assert llama2.tokens == [[]] and llama2.decode_steps == 0  # Llama 2's code stops


def test_greedy_tokens_agree_across_engines_after_the_eos_cut(model, golden):
    tokens = {name: engines.create(name, model).generate(PROMPTS, GREEDY, EOS, 0).tokens for name in engines.ENGINES}
    assert all(t == golden["meta_greedy"]["12"] for t in tokens.values()), tokens
    assert len(tokens["llama1"][1]) < GREEDY.max_gen_len  # the EOS cut did cut a row


def test_llama1_allocates_metas_cache_once_per_cell(model):
    """Meta's load: (max_batch_size, max_seq_len, heads, head_dim), whatever the prompts; here the
    cell's batch size (cache_batch) and model.max_seq_len, once for every batch of the cell."""
    engine = _llama1(model)
    engine.generate(PROMPTS[:2], FORCED, EOS, 0, cache_len=20, cache_batch=3)  # a warm-up's smaller batch first
    cache = engine.cache[0][0]
    assert cache.shape == (3, ARGS.max_seq_len, ARGS.n_heads, ARGS.head_dim)
    assert engine.kv_cache.shape == tuple(cache.shape)
    assert engine.kv_cache.bytes == 2 * ARGS.n_layers * 3 * ARGS.max_seq_len * ARGS.dim * 4  # K and V, fp32
    engine.generate(PROMPTS, FORCED, EOS, 0, cache_len=24, cache_batch=3)  # the cell's batches: the same cache
    assert engine.cache[0][0].data_ptr() == cache.data_ptr()
    assert engine.table.shape[0] == 2 * ARGS.max_seq_len  # Meta's rotary table: 2 x max_seq_len positions


def test_other_engines_report_the_models_cache(model):
    engine = engines.create("llama2", model)
    engine.generate(PROMPTS, FORCED, EOS, 0, cache_batch=8)  # cache_batch sizes only a cache allocated at load
    assert engine.kv_cache.shape == (3, ARGS.n_heads, 6 + FORCED.max_gen_len, ARGS.head_dim)


def meta_sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """LLaMA-1's sample_top_p (llama_v1 llama/generation.py), rewritten here from its published
    source as the reference: sort, cumulative sum, the mask assigned 0 in place, div_, multinomial
    on the global generator, gather."""
    ordered, index = torch.sort(probs, dim=-1, descending=True)
    total = torch.cumsum(ordered, dim=-1)
    mask = total - ordered > p
    ordered[mask] = 0.0
    ordered.div_(ordered.sum(dim=-1, keepdim=True))
    picked = torch.multinomial(ordered, num_samples=1)
    return torch.gather(index, -1, picked)


def meta_next_token(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """What LLaMA-1's generate does with the last position's logits when temperature > 0."""
    probs = torch.softmax(logits / temperature, dim=-1)
    return meta_sample_top_p(probs, top_p).reshape(-1)


def test_a_sampled_llama1_decode_step_runs_metas_sample_top_p(model, golden):
    """The whole decode step (forward, then sampling): Meta's forward operators (the golden trace),
    then those of Meta's sampling (the boolean-mask index_put_ and multinomial included), and the
    same token from the same draws."""
    engine = _llama1(model)
    engine.prepare(MAX_BATCH, ARGS.max_seq_len)
    params = SamplingParams(max_gen_len=4, temperature=0.8, top_p=0.95)
    tokens = torch.tensor(TRACE_TOKENS)
    with torch.inference_mode():
        engine.forward(tokens[:, :PREFILL_LEN], 0)
        logits = engine.forward(tokens[:, PREFILL_LEN:], PREFILL_LEN)
        generator = torch.Generator().manual_seed(SEED)
        step = trace(lambda: next_token(engine.forward(tokens[:, PREFILL_LEN:], PREFILL_LEN), params, generator))
        torch.manual_seed(SEED)  # Meta draws from the global generator, seeded alike
        meta = trace(lambda: meta_next_token(logits, params.temperature, params.top_p))
        ours = next_token(logits, params, torch.Generator().manual_seed(SEED))
        torch.manual_seed(SEED)
        theirs = meta_next_token(logits, params.temperature, params.top_p)
    assert step == golden["decode"] + meta
    assert "aten.index_put_.default" in meta and "aten.multinomial.default" in meta
    assert "aten.masked_fill.Scalar" not in step
    assert torch.equal(ours, theirs)


def test_llama1_refuses_grouped_query_attention():
    gqa = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(1, 1)
    model = build_model(gqa, random_state_dict(gqa, SEED), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"n_kv_heads=2 != n_heads=4; use engine=fast or llama2$"):
        engines.create("llama1", model)
    with pytest.raises(ConfigError, match=r"engine=llama1 has no grouped-query attention .* model.n_kv_heads=8"):
        compose_cell(["model=llama2_70b", "engine=llama1"])


def test_engine_reference_is_refused_naming_llama2_and_llama1():
    with pytest.raises(ConfigError, match=r"engine=reference was renamed llama2 .* the paper's program is llama1"):
        compose_cell(["engine=reference"])


def test_the_plan_counts_a_mixed_jobs_two_caches():
    """llama1 keeps its cache while fast or llama2 run, and the model keeps theirs while llama1 runs."""
    from launch.plan import estimate_memory

    shapes = Shapes(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256)
    llama1 = compose_cell(["engine=llama1", "batch_size=4", "max_gen_len=64", "dataset.max_prompt_tokens=128"])
    per_token = 2 * 32 * 4096 * 2 / 1024**3  # K and V, 32 layers, dim 4096, fp16
    alone = estimate_memory(llama1, shapes).kv_cache_gib
    assert alone == pytest.approx(4 * llama1.model.max_seq_len * per_token)  # Meta's (batch, max_seq_len)
    fast = compose_cell(["engine=fast", "batch_size=4", "max_gen_len=64", "dataset.max_prompt_tokens=128"])
    assert estimate_memory(fast, shapes).kv_cache_gib == pytest.approx(4 * (128 + 64) * per_token)
    assert estimate_memory(llama1, shapes, resident_positions=1000).kv_cache_gib == pytest.approx(
        alone + 1000 * per_token)


def test_llama1_runs_to_max_seq_len_where_a_prompt_leaves_less_than_max_gen_len(model):
    """Meta's total_len = min(max_seq_len, longest prompt + max_gen_len): rows end at max_seq_len."""
    long = SamplingParams(max_gen_len=ARGS.max_seq_len - 3, greedy=True, force_max_gen_len=True)
    gen = _llama1(model).generate(PROMPTS, long, EOS, 0)
    assert [len(row) for row in gen.tokens] == [min(long.max_gen_len, ARGS.max_seq_len - len(p)) for p in PROMPTS]
    with pytest.raises(ValueError, match="exceeds"):  # Meta's later programs need prompt + max_gen_len to fit
        engines.create("llama2", model).generate(PROMPTS, long, EOS, 0)


def test_each_engine_reads_its_rules_from_its_spec(model):
    """One home per engine fact: the Engine class points at its registry row, which the login node reads."""
    for name in engines.ENGINES:
        engine = engines.create(name, model)
        assert engine.spec is engines.SPECS[name], name
        # own_cache tells the planner a second cache stays allocated: true where the engine keeps one itself
        assert (type(engine).prepare is not engines.common.Engine.prepare) == engine.spec.own_cache, name
    assert [n for n, s in engines.SPECS.items() if s.runs_to_max_seq_len] == ["llama1"]


def test_llama1_refuses_rope_scaling_at_composition():
    with pytest.raises(ConfigError, match=r"engine=llama1 has no rope scaling \(LLaMA-1 had none\): "
                                          r"model.rope_scaling_factor=8.0; use engine=fast or llama2$"):
        compose_cell(["model=llama3_1_8b", "engine=llama1", "model.n_kv_heads=null"])

