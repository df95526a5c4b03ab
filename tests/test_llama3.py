"""Llama 3 and 3.1: random configurations built with transformers give the same logits and greedy
tokens in w2w at 1 and 2 shards; presets; the planner's memory estimate for 405B."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.parallel import run_parallel
from tests.test_checkpoint import model_cfg
from w2w import checkpoint, distributed, engines
from w2w.config import compose_cell
from w2w.engines.common import SamplingParams
from w2w.errors import ConfigError
from w2w.model import ModelArgs, RopeScaling, build_model, rope_tables, scale_rope

# GQA with 8 KV heads (as every Llama 3), head_dim 8, Llama 3's rope_theta. The 3.1 scaling uses a
# short original context (48) so that the tiny head dims fall in all three bands of Meta's rule.
ARGS = ModelArgs(dim=128, n_layers=2, n_heads=16, n_kv_heads=8, vocab_size=320, multiple_of=32,
                 rope_theta=500000.0, max_seq_len=64)
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 48}
TOKENS = torch.randint(0, ARGS.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
PROMPT = [1, 17, 42, 5, 77, 30, 200, 9]
GEN_LEN = 12


def hf_llama3(directory: Path, scaling: dict | None) -> dict:
    """A random LlamaForCausalLM with Llama 3's shape rules, saved; its logits and greedy tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=ARGS.vocab_size, hidden_size=ARGS.dim, intermediate_size=ARGS.ffn_hidden,
        num_hidden_layers=ARGS.n_layers, num_attention_heads=ARGS.n_heads, num_key_value_heads=ARGS.n_kv_heads,
        max_position_embeddings=ARGS.max_seq_len, rms_norm_eps=ARGS.norm_eps, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, attn_implementation="eager",
    )
    rope = {"rope_type": "default"} | (scaling or {}) | {"rope_theta": ARGS.rope_theta}
    if hasattr(config, "rope_parameters"):  # transformers >= 5
        config.rope_parameters = rope
    else:
        config.rope_theta, config.rope_scaling = ARGS.rope_theta, scaling
    torch.manual_seed(5)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():  # unit-scale weights: argmax is meaningful
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
        logits = model(TOKENS).logits.float()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=GEN_LEN, min_new_tokens=GEN_LEN, do_sample=False)
    model.save_pretrained(directory, safe_serialization=True)
    return {"logits": logits, "greedy": out[0, len(PROMPT):].tolist()}


@pytest.fixture(scope="module")
def hf_ckpts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("llama3")
    out = {name: (root / name, hf_llama3(root / name, scaling)) for name, scaling in
           (("llama3", None), ("llama3_1", SCALING))}
    # Meta's format of the same 3.1 model, written by w2w-reshard (params.json: use_scaled_rope).
    checkpoint.reshard(root / "llama3_1", root / "llama3_1_meta", 2, progress=False)
    return out | {"llama3_1_meta": (root / "llama3_1_meta", out["llama3_1"][1])}


def _w2w_outputs(ckpt_dirs: dict[str, Path], world: int) -> dict:
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(world, world)
    rank = torch.distributed.get_rank()
    out = {}
    for key, ckpt_dir in ckpt_dirs.items():
        cfg = model_cfg(ckpt_dir, ARGS, rope_theta=ARGS.rope_theta)
        args = checkpoint.model_args(cfg)
        model = build_model(args, checkpoint.load_rank_state(cfg, args, rank, world), torch.device("cpu"),
                            torch.float32)
        model.setup_caches(TOKENS.shape[0], TOKENS.shape[1])
        logits = model(TOKENS, 0, torch.arange(TOKENS.shape[1]).expand_as(TOKENS),
                       torch.ones_like(TOKENS, dtype=torch.bool))
        params = SamplingParams(max_gen_len=GEN_LEN, greedy=True, force_max_gen_len=True)
        out[key] = {"logits": logits, "greedy": engines.create("fast", model).generate([PROMPT], params, eos_id=2, pad_id=0).tokens[0],
                    "scaling": args.rope_scaling}
    return out


@pytest.mark.slow
def test_llama3_and_3_1_match_transformers_at_1_and_2_shards(hf_ckpts):
    assert json.loads((hf_ckpts["llama3_1_meta"][0] / "params.json").read_text())["use_scaled_rope"] is True
    dirs = {name: path for name, (path, _) in hf_ckpts.items()}
    # Same weights, rope scaling only: the references differ, so a w2w that ignored it would fail.
    assert (hf_ckpts["llama3"][1]["logits"] - hf_ckpts["llama3_1"][1]["logits"]).abs().max() > 1e-2
    for world in (1, 2):
        for rank_out in run_parallel(world, _w2w_outputs, dirs, world):
            for name, (_, expected) in hf_ckpts.items():
                got = rank_out[name]
                assert (got["logits"] - expected["logits"]).abs().max().item() <= 1e-4, (name, world)
                assert got["greedy"] == expected["greedy"], (name, world)
            assert rank_out["llama3"]["scaling"] is None
            assert rank_out["llama3_1"]["scaling"] == rank_out["llama3_1_meta"]["scaling"] == RopeScaling(8.0, 1.0, 4.0, 48)


def test_rope_scaling_changes_only_long_wavelengths():
    plain = rope_tables(ARGS.head_dim, 64, ARGS.rope_theta, torch.device("cpu"))
    scaled = rope_tables(ARGS.head_dim, 64, ARGS.rope_theta, torch.device("cpu"), RopeScaling(8.0, 1.0, 4.0, 48))
    assert torch.equal(plain[:, 0], scaled[:, 0])  # wavelength 2*pi: below high_freq_wavelen (12)
    assert not torch.allclose(plain[:, 1:], scaled[:, 1:])
    freqs = torch.tensor([1.0, 2 * torch.pi / 30, 2 * torch.pi / 100])  # short, medium, long wavelengths
    out = scale_rope(freqs, RopeScaling(8.0, 1.0, 4.0, 48))
    smooth = (48 / 30 - 1) / 3
    assert out[0] == freqs[0] and torch.isclose(out[2], freqs[2] / 8)
    assert torch.isclose(out[1], (1 - smooth) * freqs[1] / 8 + smooth * freqs[1])


def test_meta_params_json_of_llama_3_1(tmp_path):
    from tests.test_checkpoint import full_state, write_meta

    ckpt = write_meta(tmp_path / "m", full_state(ARGS), 2, ARGS)
    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps(params | {"rope_theta": 500000.0, "use_scaled_rope": True,
                                                            "vocab_size": ARGS.vocab_size}))
    args = checkpoint.model_args(model_cfg(ckpt, ARGS))
    assert args.rope_theta == 500000.0 and args.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    # w2w-reshard writes it back the way Meta's code reads it.
    assert checkpoint._params_json(args)["use_scaled_rope"] is True


@pytest.mark.parametrize(("preset", "ffn", "billions", "scaled"), [
    ("llama3_8b", 14336, 8.03, False), ("llama3_70b", 28672, 70.55, False), ("llama3_1_8b", 14336, 8.03, True),
    ("llama3_1_70b", 28672, 70.55, True), ("llama3_1_405b", 53248, 405.85, True),
])
def test_presets_have_the_published_shapes(preset, ffn, billions, scaled):
    cfg = compose_cell([f"model={preset}"])
    args = checkpoint.model_args(cfg.model)
    assert (args.ffn_hidden, args.kv_heads, args.vocab_size, args.rope_theta) == (ffn, 8, 128256, 500000.0)
    assert abs(args.num_params() / 1e9 - billions) < 0.01
    assert (args.rope_scaling == RopeScaling()) if scaled else args.rope_scaling is None


def test_shards_must_divide_the_8_kv_heads():
    with pytest.raises(ConfigError, match=r"shards=16 does not divide model llama3_1_405b's 128 heads / 8 KV heads: "
                                          r"choose shards from \[1, 2, 4, 8\]"):
        compose_cell(["model=llama3_1_405b", "gpu=h100", "shards=16"])


def test_planner_estimates_405b_across_nodes():
    from w2w.launch.plan import make_plan

    common = ["model=llama3_1_405b", "shards=8", "precision=bf16", "batch_size=64", "cluster=supercloud_a100"]
    on_h200 = make_plan([*common, "gpu=h200"])  # 4 GPUs per node: two nodes
    (job,) = on_h200.jobs
    assert (job.nodes, job.tasks_per_node) == (2, 4)
    (cell,) = job.cells
    assert 94 < cell.memory.weights_gib < 95 and cell.memory.total_gib < 141 and cell.skip_reason is None
    on_a100 = make_plan([*common, "gpu=a100", "skip_unfit=true"])
    (skipped,) = on_a100.skipped
    assert "weights 94.5" in skipped.skip_reason and "gpu=a100 has 80 GiB" in skipped.skip_reason


def test_llama3_h100_is_the_paper_grid_with_llama_3_1_on_h100_nodes(paper_datasets, tmp_path):
    from tests.test_paper_presets import plan_output

    plan = plan_output("+experiment=llama3_h100", f"sweep_dir={tmp_path}", env=paper_datasets)
    shapes = plan["shapes"]
    assert {m for m, _, _ in shapes} == {"llama3_1_8b", "llama3_1_70b"} and {g for _, g, _ in shapes} == {"h100"}
    assert {(m, s) for m, _, s in shapes} == {("llama3_1_8b", 1), ("llama3_1_8b", 2), ("llama3_1_70b", 2),
                                              ("llama3_1_70b", 4), ("llama3_1_70b", 8)}
    assert all(nodes == 1 and tasks == s for (_, _, s), (nodes, tasks, _) in shapes.items())  # 8-GPU nodes
    rows = plan["cell_rows"]
    assert {r[2] for r in rows} == {"64", "128", "256", "512"} and {r[3] for r in rows} == {"256", "512", "1024"}
    assert {r[1] for r in rows} == {"alpaca", "gsm8k"}
    assert {r[4] for r in rows} == {"None", "700.0", "490.0", "420.0"}
    assert plan["skipped"]  # 70B on 2 H100s holds only the smallest batches: listed, not failed
