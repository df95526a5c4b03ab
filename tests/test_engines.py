"""The engines: same greedy tokens as each other and as the dynamic-cache path; the registry and the phase clock."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.parallel import run_parallel
from w2w import distributed, engines
from w2w.config import compose_cell
from w2w.engines.common import PhaseClock, SamplingParams, new_generator
from w2w.engines.fast import left_pad, prefill
from w2w.engines.fused import FusedDecode
from w2w.model import ModelArgs, Transformer, build_model, random_state_dict

MHA = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=128)
GQA = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=128)
PROMPTS = [[1, 5, 9, 12, 7, 30], [1, 44], [1, 3, 3, 8]]  # ragged: 6, 2 and 4 tokens
GREEDY = SamplingParams(max_gen_len=12, greedy=True, force_max_gen_len=True)
CUT = SamplingParams(max_gen_len=12, greedy=True)
# The engines whose spec runs a model with grouped-query attention (llama1 refuses it: LLaMA-1 had none).
GQA_ENGINES = [name for name, spec in engines.SPECS.items() if spec.grouped_query]


def _serving(args: ModelArgs) -> list[str]:
    return list(engines.ENGINES) if args.kv_heads == args.n_heads else GQA_ENGINES


def _model(args: ModelArgs, world: int) -> Transformer:
    rank = torch.distributed.get_rank()
    return build_model(args, random_state_dict(args, 5, rank, world), torch.device("cpu"), torch.float32)


@torch.inference_mode()
def _dynamic(model: Transformer, prompts: list[list[int]], steps: int, static: bool, fused: bool = False):
    """The pre-engine decode loop (cache prefix sliced at a Python-int slot), or the same loop
    through the static step, or through the fast engine's fused step: (greedy tokens, per-step logits)."""
    fused_step = FusedDecode(model) if fused else None
    width = max(len(p) for p in prompts)
    cache_len = width + steps
    model.setup_caches(len(prompts), cache_len)
    batch = left_pad(prompts, 0, cache_len, model.device)
    token = prefill(model, batch).argmax(-1)
    tokens, logits = [token], []
    for slot in range(width, width + steps - 1):
        batch.key_valid[:, slot] = True
        if fused_step is not None:
            mask = fused_step.mask(batch.key_valid, torch.float32)
            step = fused_step(token, torch.tensor([slot]), batch.next_pos, mask)
        elif static:
            step = model.decode_step(token, torch.tensor([slot]), batch.next_pos, batch.key_valid)
        else:
            step = model(token[:, None], slot, batch.next_pos[:, None], batch.key_valid[:, : slot + 1])[:, -1]
        batch.next_pos += 1
        token = step.argmax(-1)
        tokens.append(token)
        logits.append(step)
    return torch.stack(tokens, 1).tolist(), torch.stack(logits)


def _all_paths(world: int) -> dict:
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(world, world)
    out = {}
    for name, args in (("mha", MHA), ("gqa", GQA)):
        model = _model(args, world)
        dynamic, dynamic_logits = _dynamic(model, PROMPTS, GREEDY.max_gen_len, static=False)
        static, static_logits = _dynamic(model, PROMPTS, GREEDY.max_gen_len, static=True)
        fused, fused_logits = _dynamic(model, PROMPTS, GREEDY.max_gen_len, static=True, fused=True)
        out[name] = {
            "dynamic": dynamic,
            "static": static,
            "fused": fused,
            "logit_gap": (static_logits - dynamic_logits).abs().max().item(),
            "fused_logit_gap": (fused_logits - dynamic_logits).abs().max().item(),
            "gains": [float(layer.ffn_norm.weight.std()) for layer in model.layers],
            **{name: engines.create(name, model).generate(PROMPTS, GREEDY, 2, 0).tokens for name in _serving(args)},
            # not forced: every engine's tokens after the EOS cut (id 2 ends the second row early)
            "cut": {name: engines.create(name, model).generate(PROMPTS, CUT, 2, 0).tokens for name in _serving(args)},
        }
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_engines_give_the_dynamic_paths_greedy_tokens(world):
    for rank_result in run_parallel(world, _all_paths, world):
        for name, paths in rank_result.items():
            assert all(len(row) == GREEDY.max_gen_len for row in paths["dynamic"]), name
            served = GQA_ENGINES if name == "gqa" else engines.ENGINES
            assert all(paths[engine] == paths["dynamic"] == paths["static"] for engine in served), name
            cut = list(paths["cut"].values())
            assert all(tokens == cut[0] for tokens in cut) and len(cut[0][1]) < CUT.max_gen_len, name
            assert paths["logit_gap"] <= 1e-5, name
            # The fused step (F.rms_norm with the gain, merged GEMMs): llama2's tokens, logits within 1e-4 (fp32)
            assert paths["fused"] == paths["dynamic"] == paths["fast"] == paths["llama2"], name
            assert paths["fused_logit_gap"] <= 1e-4, name
            assert all(gain > 0 for gain in paths["gains"]), name  # random gains: a dropped gain would show


@pytest.fixture(scope="module")
def model():
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(1, 1)
    return _model(GQA, 1)


@pytest.mark.parametrize("name", GQA_ENGINES)
def test_same_seed_same_top_p_tokens(model, name):
    engine = engines.create(name, model)

    def run(seed: int) -> list[list[int]]:
        params = SamplingParams(max_gen_len=10, temperature=0.8, top_p=0.95, seed=seed, force_max_gen_len=True)
        return engine.generate(PROMPTS, params, 2, 0).tokens

    assert run(3) == run(3) != run(4)


@pytest.mark.parametrize("name", GQA_ENGINES)  # llama1 keeps a cache of its own: tests/test_llama1.py
def test_a_cache_serves_a_smaller_last_batch_without_reallocating(model, name):
    engine = engines.create(name, model)
    cache_len = 6 + GREEDY.max_gen_len
    engine.generate(PROMPTS, GREEDY, 2, 0, cache_len)
    cache = model.layers[0].attention.cache
    address = cache.k.data_ptr()
    last = engine.generate(PROMPTS[:2], GREEDY, 2, 0, cache_len).tokens
    assert model.layers[0].attention.cache is cache and cache.k.data_ptr() == address
    assert cache.k.shape[0] == len(PROMPTS)
    alone = engine.generate(PROMPTS[:2], GREEDY, 2, 0, cache_len + 64).tokens  # a fresh cache (fast rounds to 64)
    assert model.layers[0].attention.cache.k.shape[0] == 2
    assert last == alone


def test_eos_checked_every_n_steps_counts_the_steps_run_past_it(model):
    fast = engines.create("fast", model)
    forced = fast.generate(PROMPTS[:1], SamplingParams(max_gen_len=20, greedy=True, force_max_gen_len=True), 2, 0)
    row = forced.tokens[0]
    k = next(i for i in range(1, len(row)) if row[i] not in row[:i])  # a token first made at step k
    eos = row[k]
    every = [fast.generate(PROMPTS[:1], SamplingParams(max_gen_len=20, greedy=True, eos_check_every=n), eos, 0)
             for n in (1, k + 2)]
    assert [g.tokens for g in every] == [[row[:k]]] * 2  # tokens after EOS dropped
    assert [g.decode_steps for g in every] == [k, k + 2]  # the second ran 2 steps past EOS: counted
    llama2 = engines.create("llama2", model).generate(PROMPTS[:1], SamplingParams(max_gen_len=20, greedy=True), eos, 0)
    assert llama2.tokens == every[0].tokens and llama2.decode_steps == k


def test_llama2_forces_the_longer_prompts_in_step_by_step(model):
    """Meta's schedule: decoding starts at the shortest prompt, so a ragged batch takes more passes."""
    ragged = engines.create("llama2", model).generate(PROMPTS, GREEDY, 2, 0)
    fast = engines.create("fast", model).generate(PROMPTS, GREEDY, 2, 0)
    assert fast.decode_steps == GREEDY.max_gen_len - 1
    longest, shortest = max(map(len, PROMPTS)), min(map(len, PROMPTS))
    assert ragged.decode_steps == longest - shortest + GREEDY.max_gen_len - 1


def test_positions_count_every_row_of_every_forward_call(model):
    """Work, not output: prompt rows, left padding and rows past EOS are positions computed."""
    bsz, longest, shortest = len(PROMPTS), max(map(len, PROMPTS)), min(map(len, PROMPTS))
    fast = engines.create("fast", model).generate(PROMPTS, GREEDY, 2, 0)
    assert fast.positions == bsz * longest + bsz * fast.decode_steps  # padded prefill, then one row each step
    ragged = engines.create("llama2", model).generate(PROMPTS, GREEDY, 2, 0)
    calls = [shortest] + [1] * ragged.decode_steps  # Meta's: the shortest prompt's slots, then one slot per call
    assert ragged.positions == bsz * sum(calls) == bsz * (longest + GREEDY.max_gen_len - 1)
    early = engines.create("fast", model).generate(PROMPTS[:1], SamplingParams(max_gen_len=20, greedy=True), 2, 0)
    assert early.positions == len(PROMPTS[0]) + early.decode_steps  # one row: its prompt, then a slot per step


def test_one_stream_passed_to_every_batch_draws_on_and_none_restarts_it(model):
    """A cell's batches draw on from one stream (Meta seeds once per process); without one, each batch restarts."""
    params = SamplingParams(max_gen_len=8, temperature=1.5, force_max_gen_len=True)
    for name in GQA_ENGINES:  # the model has grouped-query attention, which llama1 refuses
        engine = engines.create(name, model)
        fresh = [engine.generate(PROMPTS, params, 2, 0).tokens for _ in range(2)]
        assert fresh[0] == fresh[1], name  # generator=None: a fresh stream seeded with params.seed
        stream = new_generator(model.device, params.seed)
        drawn = [engine.generate(PROMPTS, params, 2, 0, generator=stream).tokens for _ in range(2)]
        assert drawn[0] == fresh[0] and drawn[1] != drawn[0], name


def test_an_unknown_engine_is_refused_naming_the_valid_ones(model):
    with pytest.raises(ValueError, match=f"engine=turbo: valid are {', '.join(engines.ENGINES)}$"):
        engines.create("turbo", model)
    with pytest.raises(ValueError, match="engine=reference was renamed llama2"):
        engines.create("reference", model)


def test_the_registry_names_a_module_with_an_engine_for_each_entry(model):
    for name in GQA_ENGINES:  # llama1 over an MHA model: tests/test_llama1.py
        assert isinstance(engines.create(name, model), engines.common.Engine)


def test_importing_the_registry_imports_no_torch():
    code = "import sys, w2w.engines; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_phase_clock_refuses_an_unknown_phase():
    clock = PhaseClock(torch.device("cpu"))
    with pytest.raises(ValueError, match="phase 'decoding': valid are prefill, decode or None"):
        clock.enter("decoding")  # before: silently timed under a name nobody reads
    assert clock.seconds == {"prefill": 0.0, "decode": 0.0}


def test_fast_drops_decoders_built_over_a_reallocated_cache(model):
    """A decoder's CUDA graph points into the KV cache: after setup_caches reallocates it, the
    engine must build a new decoder, and give what a fresh engine gives."""
    cache_len = 6 + GREEDY.max_gen_len
    engine = engines.create("fast", model)
    engine.generate(PROMPTS[:2], GREEDY, 2, 0, cache_len + 64)  # another (rounded) length first, so that
    engine.generate(PROMPTS[:2], GREEDY, 2, 0, cache_len + 2)  # this allocates a cache for 2 rows
    before = dict(engine.decoders)
    generation = model.cache_generation
    engine.generate(PROMPTS, GREEDY, 2, 0, cache_len + 2)  # 3 rows: the cache is reallocated
    assert model.cache_generation > generation
    again = engine.generate(PROMPTS[:2], GREEDY, 2, 0, cache_len + 2).tokens  # fits the new cache: no reallocation
    assert not set(map(id, engine.decoders.values())) & set(map(id, before.values()))
    fresh = engines.create("fast", model).generate(PROMPTS[:2], GREEDY, 2, 0, cache_len + 2).tokens
    assert again == fresh


def test_sampling_params_of_a_cell_reads_its_attributes():
    cell = compose_cell(["max_gen_len=64", "temperature=0.6", "top_p=0.9", "force_max_gen_len=true", "seed=7"])
    assert SamplingParams.of(cell) == SamplingParams(64, 0.6, 0.9, False, True, 7, 8, float(cell.dist_timeout_s))
    assert SamplingParams.of(cell, max_gen_len=4).max_gen_len == 4  # a warm-up's shorter run


def test_a_cells_program_does_not_depend_on_its_job_mates():
    """fast changes no weight of the model, alone or beside llama2: its tokens are the same either way,
    and the model's weights keep their values (fast's merged GEMMs are views of the same storage)."""
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(1, 1)
    tokens = {}
    for names in (["fast"], ["fast", "llama2"]):
        model = _model(GQA, 1)
        before = {name: t.clone() for name, t in model.state_dict().items()}
        tokens[tuple(names)] = engines.create_serving(names, model)["fast"].generate(PROMPTS, GREEDY, 2, 0).tokens
        assert all(torch.equal(before[name], t) for name, t in model.state_dict().items()), names
    assert tokens[("fast",)] == tokens[("fast", "llama2")]


def test_every_engine_names_its_decode_step_from_its_spec(model):
    for name in GQA_ENGINES:
        engine = engines.create(name, model)
        assert engine.spec is engines.SPECS[name] and engine.decode_step == engines.SPECS[name].decode_step


def test_the_fused_norm_before_torch_2_4_is_f_rms_norm(monkeypatch):
    """torch < 2.4 has no F.rms_norm: the fallback computes the same function (x / rms * gain)."""
    from w2w.engines.fused import rms_norm

    x, gain = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)), torch.rand(64) + 0.5
    public = rms_norm(x, gain, 1e-5)
    monkeypatch.delattr(torch.nn.functional, "rms_norm")
    assert torch.allclose(rms_norm(x, gain, 1e-5), public, atol=1e-6)
