"""Checkpoints: Meta and Hugging Face formats at any shard count, resharding, bad input, host memory."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.parallel import run_parallel
from w2w import checkpoint, distributed, engines, hf, reshard_cli
from w2w.cell import ModelConfig
from w2w.config import compose_cell
from w2w.distributed import DistInfo
from w2w.engines.common import SamplingParams
from w2w.errors import ConfigError
from w2w.model import ModelArgs, build_model, parameter_shapes, random_full_tensor, shard_slice
from w2w.shapes import ffn_width
from w2w.tokenizer import TINY_TOKENIZER

# Grouped-query attention (8 heads, 4 KV heads); ffn width 176, which HF's config states directly.
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=96, multiple_of=16, max_seq_len=64)
SEED = 3
TOKENS = torch.randint(0, ARGS.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
PROMPT = [1, 17, 42, 5, 77, 30]
GEN_LEN = 8


def full_state(args: ModelArgs = ARGS, seed: int = SEED) -> dict[str, torch.Tensor]:
    return {name: random_full_tensor(name, shape, seed) for name, shape in parameter_shapes(args).items()}


def params_json(args: ModelArgs) -> dict:
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "vocab_size": -1,
              "multiple_of": args.multiple_of, "norm_eps": args.norm_eps}
    return params | ({"n_kv_heads": args.n_kv_heads} if args.n_kv_heads else {})


def write_meta(directory: Path, state: dict[str, torch.Tensor], shards: int, args: ModelArgs = ARGS) -> Path:
    """Meta's layout, including LLaMA 1's rope.freqs entry that loaders must skip."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params_json(args)))
    for rank in range(shards):
        part = {name: shard_slice(t, name, rank, shards).clone() for name, t in state.items()}
        torch.save(part | {"rope.freqs": torch.zeros(args.head_dim // 2)}, directory / f"consolidated.{rank:02d}.pth")
    return directory


def model_cfg(ckpt_dir: Path | None, args: ModelArgs = ARGS, **changes) -> ModelConfig:
    fields = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                             "multiple_of", "ffn_dim_multiplier", "norm_eps", "max_seq_len")}
    return ModelConfig(name="test", checkpoint_dir=str(ckpt_dir) if ckpt_dir else None, **(fields | changes))


def load_state(ckpt_dir: Path, rank: int, world: int, args: ModelArgs = ARGS) -> dict[str, torch.Tensor]:
    cfg = model_cfg(ckpt_dir, args)
    return checkpoint.load_rank_state(cfg, checkpoint.model_args(cfg), rank, world)


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints written by transformers itself


def hf_config(tied: bool):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=ARGS.vocab_size, hidden_size=ARGS.dim, intermediate_size=ARGS.ffn_hidden,
        num_hidden_layers=ARGS.n_layers, num_attention_heads=ARGS.n_heads, num_key_value_heads=ARGS.n_kv_heads,
        max_position_embeddings=ARGS.max_seq_len, rms_norm_eps=ARGS.norm_eps, tie_word_embeddings=tied,
        attn_implementation="eager",
    )


def write_hf(directory: Path, tied: bool, max_shard_size: str | None) -> dict:
    """Save a random LlamaForCausalLM; returns its logits on TOKENS and its greedy tokens on PROMPT."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(11)
    model = LlamaForCausalLM(hf_config(tied)).float().eval()
    with torch.no_grad():
        # HF's 0.02-std init gives near-uniform logits; unit-scale weights make argmax meaningful.
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
        logits = model(TOKENS).logits.float()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=GEN_LEN, min_new_tokens=GEN_LEN, do_sample=False)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return {"logits": logits, "greedy": out[0, len(PROMPT):].tolist()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ckpt")
    state = full_state()
    out = {
        "state": state,
        "meta1": write_meta(root / "meta1", state, 1),
        "meta2": write_meta(root / "meta2", state, 2),
        "meta4": write_meta(root / "meta4", state, 4),
    }
    out["hf"], out["hf_ref"] = root / "hf", write_hf(root / "hf", tied=False, max_shard_size=None)
    out["hf_tied"], out["hf_tied_ref"] = root / "hf_tied", write_hf(root / "hf_tied", tied=True, max_shard_size="100KB")
    return out


# ---------------------------------------------------------------------------------------------
# Exact slices, in process


@pytest.mark.parametrize("source", [1, 2, 4])
def test_meta_slices_equal_the_unsharded_tensors(ckpts, source):
    for world in (1, 2, 4):
        for rank in range(world):
            state = load_state(ckpts[f"meta{source}"], rank, world)
            assert set(state) == set(ckpts["state"])
            for name, full in ckpts["state"].items():
                assert torch.equal(state[name], shard_slice(full, name, rank, world)), (source, world, rank, name)


def test_hf_sharded_and_tied_checkpoints_are_read(ckpts):
    assert len(list(ckpts["hf_tied"].glob("*.safetensors"))) > 1
    assert not (ckpts["hf_tied"] / "model.safetensors.index.json").read_text().count("lm_head")
    whole = load_state(ckpts["hf_tied"], 0, 1)
    assert torch.equal(whole["output.weight"], whole["tok_embeddings.weight"])
    halves = [load_state(ckpts["hf_tied"], r, 2) for r in range(2)]
    for name, full in whole.items():
        for rank, half in enumerate(halves):
            assert torch.equal(half[name], shard_slice(full, name, rank, 2)), name


def test_rotary_permutation_round_trip():
    weight = torch.randn(64, 16)
    assert torch.equal(hf.unpermute_rotary(hf.permute_rotary(weight, 8), 8), weight)
    assert not torch.equal(hf.permute_rotary(weight, 8), weight)


def test_hf_args_derive_the_feed_forward_width(ckpts):
    args = hf.read_args(ckpts["hf"])
    assert args.ffn_hidden == ARGS.ffn_hidden and args.kv_heads == ARGS.kv_heads
    # A width that Meta's rule with multiple_of=256 would never give.
    config = json.loads((ckpts["hf"] / "config.json").read_text())
    for width in (100, 170, 171, 1000):
        assert hf._ffn_settings(config["hidden_size"], width, Path("x"))[0] == width
        assert ffn_width(64, width, hf._ffn_settings(64, width, Path("x"))[1]) == width


# ---------------------------------------------------------------------------------------------
# Logits and greedy tokens across processes


def _reference_and_loaded(ckpt_dirs: dict[str, Path], world: int) -> dict:
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(world, world)
    rank = torch.distributed.get_rank()
    out = {}
    for key, ckpt_dir in ckpt_dirs.items():
        if ckpt_dir is None:  # the unsharded model, straight from the tensors
            state = {n: t for n, t in full_state().items()}
        else:
            state = load_state(ckpt_dir, rank, world)
        model = build_model(ARGS, state, torch.device("cpu"), torch.float32)
        model.setup_caches(TOKENS.shape[0], TOKENS.shape[1])
        logits = model(TOKENS, 0, torch.arange(TOKENS.shape[1]).expand_as(TOKENS), torch.ones_like(TOKENS, dtype=torch.bool))
        params = SamplingParams(max_gen_len=GEN_LEN, greedy=True, force_max_gen_len=True)
        out[key] = {"logits": logits, "greedy": engines.create("fast", model).generate([PROMPT], params, eos_id=2, pad_id=0).tokens[0]}
    return out


@pytest.mark.slow
def test_logits_match_at_1_2_4_shards(ckpts):
    dirs = {"meta1": ckpts["meta1"], "meta2": ckpts["meta2"], "hf": ckpts["hf"], "hf_tied": ckpts["hf_tied"]}
    reference = run_parallel(1, _reference_and_loaded, {"full": None}, 1)[0]["full"]["logits"]
    for world in (1, 2, 4):
        for rank_out in run_parallel(world, _reference_and_loaded, dirs, world):
            for key in ("meta1", "meta2"):
                assert (rank_out[key]["logits"] - reference).abs().max().item() <= 1e-4, (key, world)
            for key in ("hf", "hf_tied"):
                expected = ckpts[f"{key}_ref"]
                assert (rank_out[key]["logits"] - expected["logits"]).abs().max().item() <= 1e-4, (key, world)
                assert rank_out[key]["greedy"] == expected["greedy"], (key, world)


# ---------------------------------------------------------------------------------------------
# w2w-reshard


def _all_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return load_state(ckpt_dir, 0, 1)


def test_reshard_round_trip_2_4_1(ckpts, tmp_path, capsys):
    src = _copy(ckpts["meta2"], tmp_path / "two")
    shutil.copyfile(TINY_TOKENIZER, src / "tokenizer.model")
    assert reshard_cli.main([str(src), str(tmp_path / "four"), "--shards", "4"]) == 0
    assert sorted(p.name for p in (tmp_path / "four").glob("*.pth")) == [f"consolidated.{i:02d}.pth" for i in range(4)]
    assert reshard_cli.main([str(tmp_path / "four"), str(tmp_path / "one"), "--shards", "1"]) == 0
    one = torch.load(tmp_path / "one" / "consolidated.00.pth", weights_only=True)
    assert set(one) == set(ckpts["state"])
    for name, tensor in ckpts["state"].items():
        assert torch.equal(one[name], tensor), name
    params = json.loads((tmp_path / "one" / "params.json").read_text())
    assert params["n_kv_heads"] == ARGS.n_kv_heads and params["vocab_size"] == ARGS.vocab_size
    assert "wrote 1 shard(s)" in capsys.readouterr().out
    assert (tmp_path / "one" / "tokenizer.model").read_bytes() == TINY_TOKENIZER.read_bytes()


def test_reshard_hf_to_meta_matches_hf_load(ckpts, tmp_path):
    assert reshard_cli.main([str(ckpts["hf"]), str(tmp_path / "meta"), "--shards", "2", "--dtype", "bf16"]) == 0
    from_hf = load_state(ckpts["hf"], 1, 2)
    from_meta = load_state(tmp_path / "meta", 1, 2)
    for name, tensor in from_hf.items():
        assert from_meta[name].dtype == torch.bfloat16
        assert torch.equal(from_meta[name], tensor.to(torch.bfloat16)), name


def test_reshard_refuses_bad_requests(ckpts, tmp_path, capsys):
    assert reshard_cli.main([str(ckpts["meta2"]), str(tmp_path / "x"), "--shards", "3"]) == 2
    assert "--shards=3 does not divide" in capsys.readouterr().err
    assert reshard_cli.main([str(ckpts["meta2"]), str(ckpts["meta2"]), "--shards", "2"]) == 2
    assert "is SRC" in capsys.readouterr().err


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_reshard_onto_its_own_source_touches_nothing(ckpts, tmp_path, capsys):
    """Issue 10.1: SRC == DST with --force used to delete SRC's params.json (also through dir/ or a link)."""
    src = _copy(ckpts["meta2"], tmp_path / "ck")
    (tmp_path / "link").symlink_to(src)
    before = _tree(src)
    for dst in (str(src), f"{src}/", str(tmp_path / "link"), f"{tmp_path}/ck/../ck"):
        for shards in ("2", "1"):
            assert reshard_cli.main([str(src), dst, "--shards", shards, "--force"]) == 2, dst
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "is SRC" in err and "nothing was changed" in err, err
    assert _tree(src) == before
    assert checkpoint.model_args(model_cfg(src)).n_layers == ARGS.n_layers


def test_reshard_to_a_regular_file_is_one_line(ckpts, tmp_path, capsys):
    dst = tmp_path / "file"
    dst.write_text("keep me")
    assert reshard_cli.main([str(ckpts["meta2"]), str(dst), "--shards", "1", "--force"]) == 2
    err = capsys.readouterr().err
    assert err == f"w2w-reshard: error: DST {dst} is a file, not a folder: give a directory to write the checkpoint into\n"
    assert dst.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# Bad input: a clear message naming the file or option


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_params_and_config(tmp_path):
    with pytest.raises(ConfigError, match=r"neither params\.json .* nor config\.json"):
        checkpoint.model_args(model_cfg(tmp_path))
    with pytest.raises(ConfigError, match="not a directory"):
        checkpoint.model_args(model_cfg(tmp_path / "absent"))


def test_missing_shard_in_the_middle(ckpts, tmp_path):
    ckpt = _copy(ckpts["meta4"], tmp_path / "c")
    (ckpt / "consolidated.02.pth").unlink()
    with pytest.raises(ConfigError, match=r"missing shard file\(s\) consolidated\.02\.pth"):
        checkpoint.model_args(model_cfg(ckpt))


def test_missing_last_shard(ckpts, tmp_path):
    ckpt = _copy(ckpts["meta4"], tmp_path / "c")
    (ckpt / "consolidated.03.pth").unlink()
    with pytest.raises(ConfigError, match=r"found 3 shard files .* consolidated\.03\.pth; missing"):
        checkpoint.model_args(model_cfg(ckpt))


def test_extra_shard(ckpts, tmp_path):
    ckpt = _copy(ckpts["meta2"], tmp_path / "c")
    shutil.copyfile(ckpt / "consolidated.01.pth", ckpt / "consolidated.02.pth")
    with pytest.raises(ConfigError, match=r"found 3 shard files .* extra shard files"):
        checkpoint.model_args(model_cfg(ckpt))


def test_inconsistent_shard_shapes(ckpts, tmp_path):
    ckpt = _copy(ckpts["meta2"], tmp_path / "c")
    part = torch.load(ckpt / "consolidated.01.pth", weights_only=True)
    part["layers.1.attention.wq.weight"] = part["layers.1.attention.wq.weight"][:-8].clone()
    torch.save(part, ckpt / "consolidated.01.pth")
    with pytest.raises(ConfigError, match=r"consolidated\.01\.pth: layers\.1\.attention\.wq\.weight has shape \(24, 64\)"):
        load_state(ckpt, 0, 1)


def test_unsupported_dtype(ckpts, tmp_path):
    ckpt = _copy(ckpts["meta1"], tmp_path / "c")
    part = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    part["layers.0.feed_forward.w2.weight"] = part["layers.0.feed_forward.w2.weight"].to(torch.int8)
    torch.save(part, ckpt / "consolidated.00.pth")
    with pytest.raises(ConfigError, match=r"consolidated\.00\.pth: layers\.0\.feed_forward\.w2\.weight is torch\.int8"):
        load_state(ckpt, 0, 1)


def test_shards_that_do_not_divide_the_heads(ckpts):
    with pytest.raises(ConfigError, match=r"shards=3 does not divide n_heads=8, n_kv_heads=4.*choose shards from \[1, 2, 4\]"):
        load_state(ckpts["meta2"], 0, 3)


def test_preset_that_does_not_match_the_checkpoint(ckpts):
    with pytest.raises(ConfigError, match=r"params\.json does not match model=test: the checkpoint has dim=64 where model=test gives 128 \(model\.dim\)"):
        checkpoint.model_args(model_cfg(ckpts["meta2"], dim=128))
    with pytest.raises(ConfigError, match=r"config\.json does not match model=test: the checkpoint has n_kv_heads=4 .*model\.n_kv_heads"):
        checkpoint.model_args(model_cfg(ckpts["hf"], n_kv_heads=None))


def test_checkpoint_constants_override_the_preset(ckpts):
    args = checkpoint.model_args(model_cfg(ckpts["meta2"], norm_eps=1e-6, max_seq_len=48))
    assert args.norm_eps == ARGS.norm_eps and args.max_seq_len == 48


def test_tokenizer_vocabulary_must_match_the_embedding(ckpts, tmp_path):
    from w2w.runner import load_model

    ckpt = _copy(ckpts["meta2"], tmp_path / "c")
    shutil.copyfile(TINY_TOKENIZER, ckpt / "tokenizer.model")  # 512 pieces, embedding has 96 rows
    cfg = dataclasses.replace(compose_cell(["precision=fp32"]), model=model_cfg(ckpt))
    info = DistInfo(0, 0, 1, "host", "node", torch.device("cpu"))
    with pytest.raises(ConfigError, match="has 512 pieces but model test has vocab_size=96"):
        load_model(cfg, info)


def test_tokenizer_location(ckpts, tmp_path):
    ckpt = _copy(ckpts["meta2"], tmp_path / "llama" / "7B")
    with pytest.raises(ConfigError, match=r"no tokenizer\.model or tokenizer\.json in .*: set model\.tokenizer_path"):
        checkpoint.tokenizer_path(model_cfg(ckpt))
    shutil.copyfile(TINY_TOKENIZER, tmp_path / "llama" / "tokenizer.model")  # Meta's download layout
    assert checkpoint.tokenizer_path(model_cfg(ckpt)) == tmp_path / "llama" / "tokenizer.model"
    assert checkpoint.tokenizer_path(model_cfg(ckpt, tokenizer_path="/x/t.model")) == Path("/x/t.model")
    assert checkpoint.tokenizer_path(model_cfg(None)) == TINY_TOKENIZER


def test_hf_missing_file_and_unsupported_config(ckpts, tmp_path):
    ckpt = _copy(ckpts["hf_tied"], tmp_path / "c")
    victim = sorted(ckpt.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ConfigError, match=f"{victim.name}: listed in .*index.json but missing"):
        checkpoint.model_args(model_cfg(ckpt))
    ckpt = _copy(ckpts["hf"], tmp_path / "d")
    config = json.loads((ckpt / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json: rope scaling 'linear' is not supported"):
        checkpoint.model_args(model_cfg(ckpt))


def test_random_weights_without_checkpoint():
    cfg = model_cfg(None)
    assert checkpoint.model_args(cfg) == ARGS
    state = checkpoint.load_rank_state(cfg, ARGS, 1, 2)
    assert state["layers.0.attention.wk.weight"].shape == (16, 64)


@pytest.mark.parametrize(
    ("preset", "ffn", "billions"),
    [("llama_7b", 11008, 6.7), ("llama_13b", 13824, 13.0), ("llama_30b", 17920, 32.5),
     ("llama_65b", 22016, 65.3), ("llama2_7b", 11008, 6.7), ("llama2_13b", 13824, 13.0),
     ("llama2_70b", 28672, 69.0)],
)
def test_presets_have_the_published_shapes(preset, ffn, billions):
    cfg = compose_cell([f"model={preset}", "shards=4"])
    args = checkpoint.model_args(cfg.model)
    assert cfg.model.checkpoint_dir is None
    assert args.ffn_hidden == ffn
    assert abs(args.num_params() / 1e9 - billions) < 0.1


# ---------------------------------------------------------------------------------------------
# Host memory of one rank while it loads its slice


BIG = ModelArgs(dim=1024, n_layers=6, n_heads=8, vocab_size=8192, multiple_of=256, max_seq_len=128)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _measure_load(ckpt_dir: Path, rank: int, world: int) -> dict:
    """Resident memory growth of a fresh process while load_rank_state runs (file pages included)."""
    before = _rss_kib("VmRSS")
    with contextlib.suppress(OSError):  # reset the high-water mark, where the kernel allows it
        Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    state = load_state(ckpt_dir, rank, world, BIG)
    seconds = time.perf_counter() - start
    # Not ru_maxrss: Linux carries the parent's high-water mark across exec into the child.
    peak = _rss_kib("VmHWM")
    return {"peak_growth": (peak - before) * 1024, "seconds": seconds,
            "slice": sum(t.nbytes for t in state.values())}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_one_rank_holds_about_its_slice_while_loading(tmp_path):
    state = full_state(BIG, seed=1)
    full_bytes = sum(t.nbytes for t in state.values())
    write_meta(tmp_path / "four", state, 4, BIG)
    write_meta(tmp_path / "one", state, 1, BIG)
    del state
    results = {}
    for source in ("four", "one"):
        results[source] = run_parallel(1, _measure_load, tmp_path / source, 1, 4)[0]
        r = results[source]
        print(f"\n{source}-shard checkpoint of {full_bytes / 2**20:.0f} MiB, rank 1 of 4: slice "
              f"{r['slice'] / 2**20:.0f} MiB, peak RSS growth {r['peak_growth'] / 2**20:.0f} MiB "
              f"({r['peak_growth'] / full_bytes:.0%} of the model), load {r['seconds']:.2f} s")
        assert r["slice"] < 0.3 * full_bytes
        assert r["peak_growth"] < 0.45 * full_bytes
    if os.environ.get("W2W_MEMORY_REPORT"):
        Path(os.environ["W2W_MEMORY_REPORT"]).write_text(json.dumps(results | {"full_bytes": full_bytes}))
