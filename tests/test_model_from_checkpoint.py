"""model=checkpoint: a Meta or Hugging Face checkpoint that matches no preset defines the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from w2w.launch.plan import GIB, make_plan

from tests.conftest import cli
from tests.test_checkpoint import full_state
from w2w.config import compose_cell
from w2w.errors import ConfigError
from w2w.model import ModelArgs, shard_slice
from w2w.records import read_record, record_path
from w2w.tokenizer import TINY_TOKENIZER

# Neither matches a preset; the vocabulary is the bundled tiny tokenizer's, so the model can run.
META = ModelArgs(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=512, multiple_of=32, norm_eps=1e-6,
                 rope_theta=50000.0)
HF = ModelArgs(dim=48, n_layers=1, n_heads=6, n_kv_heads=2, vocab_size=512, multiple_of=160, norm_eps=1e-5,
               rope_theta=20000.0, max_seq_len=128)


def write_meta(directory: Path, args: ModelArgs, shards: int) -> Path:
    directory.mkdir(parents=True)
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": -1, "multiple_of": args.multiple_of, "norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta}
    (directory / "params.json").write_text(json.dumps(params))
    state = full_state(args, seed=5)
    for rank in range(shards):
        torch.save({n: shard_slice(t, n, rank, shards).clone() for n, t in state.items()},
                   directory / f"consolidated.{rank:02d}.pth")
    return directory


def write_hf(directory: Path, args: ModelArgs) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.n_kv_heads, max_position_embeddings=args.max_seq_len,
                         rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, tuple[Path, ModelArgs]]:
    root = tmp_path_factory.mktemp("arch")
    return {"meta": (write_meta(root / "my-meta-model", META, 2), META),
            "hf": (write_hf(root / "my-hf-model", HF), HF)}


@pytest.mark.parametrize("source", ["meta", "hf"])
def test_the_checkpoint_alone_defines_the_model(ckpts, source):
    ckpt, args = ckpts[source]
    cfg = compose_cell(["model=checkpoint", f"model.checkpoint_dir={ckpt}", "max_gen_len=16"])
    found = cfg.model.shapes()
    assert cfg.model.name == ckpt.name
    assert (found.dim, found.n_layers, found.n_heads, found.kv_heads, found.vocab_size, found.ffn_hidden,
            found.norm_eps, found.rope_theta) == (args.dim, args.n_layers, args.n_heads, args.n_kv_heads,
                                                  args.vocab_size, args.ffn_hidden, args.norm_eps, args.rope_theta)
    assert found.max_seq_len == (2048 if source == "meta" else args.max_seq_len)
    # A command-line option still wins over the checkpoint.
    assert compose_cell(["model=checkpoint", f"model.checkpoint_dir={ckpt}", "max_gen_len=16",
                         "model.max_seq_len=96"]).model.max_seq_len == 96


@pytest.mark.parametrize(("source", "shards"), [("meta", 2), ("hf", 2)])
def test_the_planner_sizes_the_real_shapes(ckpts, source, shards):
    ckpt, args = ckpts[source]
    plan = make_plan(["model=checkpoint", f"model.checkpoint_dir={ckpt}", f"model.tokenizer_path={TINY_TOKENIZER}",
                      "gpu=a100", "precision=fp16",
                      "batch_size=4", "max_gen_len=16", "dataset.max_prompt_tokens=32", f"shards=1,{shards}",
                      "cluster=supercloud_a100"])
    assert [job.cell.shards for job in plan.jobs] == [1, shards]
    for cell in plan.cells:
        shards = cell.cell.shards
        assert cell.memory.weights_gib == pytest.approx(args.num_params() * 2 / shards / GIB)
        # fast rounds its static cache up to a multiple of 64 positions (its spec): 32 + 16 -> 64
        kv = 2 * args.n_layers * 4 * 64 * args.kv_heads * args.head_dim * 2 / shards
        assert cell.memory.kv_cache_gib == pytest.approx(kv / GIB)


def test_a_preset_still_checks_the_checkpoint_and_names_every_mismatch(ckpts):
    ckpt, _ = ckpts["meta"]
    with pytest.raises(ConfigError) as info:
        make_plan(["model=tiny", f"model.checkpoint_dir={ckpt}"])
    message = str(info.value)
    for fragment in ("dim=96 where model=tiny gives 64", "n_layers=3", "n_heads=6", "n_kv_heads=2",
                     "feed-forward width", "model=checkpoint"):
        assert fragment in message


def test_without_a_checkpoint_dir_the_error_says_what_to_pass():
    with pytest.raises(ConfigError, match=r"pass model.checkpoint_dir=DIR"):
        compose_cell(["model=checkpoint"])
    with pytest.raises(ConfigError, match=r"model.checkpoint_dir=/nonexistent is not a directory"):
        compose_cell(["model=checkpoint", "model.checkpoint_dir=/nonexistent"])


def test_a_meta_checkpoint_runs_as_model_checkpoint(ckpts, tmp_path):
    ckpt, _ = ckpts["meta"]
    cli("w2w.run_cli", "model=checkpoint", f"model.checkpoint_dir={ckpt}", f"model.tokenizer_path={TINY_TOKENIZER}",
        "precision=fp32", "max_gen_len=4", "dataset.num_prompts=2", "batch_size=2", "energy.idle_seconds=0",
        f"sweep_dir={tmp_path}")
    (cell,) = (tmp_path / "cells").iterdir()
    record = read_record(record_path(tmp_path, cell.name, 0))
    assert record.status == "ok" and record.config["model"]["dim"] == META.dim
