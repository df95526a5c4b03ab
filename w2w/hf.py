"""Hugging Face Llama checkpoints (config.json + safetensors) read as Meta-named, Meta-layout slices."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from w2w.errors import ConfigError
from w2w.model import ModelArgs, parameter_shapes, shard_dim
from w2w.shapes import ffn_width

CONFIG_JSON = "config.json"
INDEX_JSON = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

_GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
# Older transformers saved the rotary table as a buffer; it is recomputed, never loaded.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def hf_name(meta_name: str) -> str:
    if meta_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[meta_name]
    match = _LAYER.fullmatch(meta_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise KeyError(meta_name)
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo convert_llama_weights_to_hf's `permute` for the rows of `heads` whole heads.

    HF stores each head's rows as [real halves; imaginary halves] (rotate-half rotary);
    Meta interleaves them in pairs. The permutation stays inside a head, so a slice of
    whole heads can be converted on its own.
    """
    rows, cols = weight.shape
    return weight.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta layout -> HF layout (the converter's `permute`); used by tests."""
    rows, cols = weight.shape
    return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _ffn_settings(dim: int, intermediate: int, path: Path) -> tuple[int, float | None]:
    """multiple_of and ffn_dim_multiplier that make Meta's width rule give `intermediate`."""
    base = int(2 * 4 * dim / 3)
    # Rounding up to a multiple of `intermediate` lands on it from anywhere in (0, intermediate].
    multiplier = None if base <= intermediate else intermediate / base
    if ffn_width(dim, intermediate, multiplier) != intermediate:
        raise ConfigError(f"{path}: intermediate_size={intermediate} cannot be expressed as a LLaMA feed-forward width")
    return intermediate, multiplier


def _rope(config: dict, path: Path) -> dict:
    """rope_theta and Llama 3.1's scaling as ModelArgs fields."""
    # transformers < 5 writes rope_theta + rope_scaling; 5.x writes rope_parameters.
    params = config.get("rope_parameters") or {}
    scaling = params or config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    if kind == "default":
        return {"rope_theta": theta}
    if kind != "llama3":
        raise ConfigError(f"{path}: rope scaling '{kind}' is not supported (plain rotary embeddings or llama3)")
    try:
        return {
            "rope_theta": theta,
            "rope_scaling_factor": float(scaling["factor"]),
            "rope_low_freq_factor": float(scaling["low_freq_factor"]),
            "rope_high_freq_factor": float(scaling["high_freq_factor"]),
            "rope_original_max_pos": int(scaling["original_max_position_embeddings"]),
        }
    except KeyError as exc:
        raise ConfigError(f"{path}: rope scaling llama3 lacks {exc}") from exc


def read_args(ckpt_dir: Path) -> ModelArgs:
    path = ckpt_dir / CONFIG_JSON
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the Hugging Face config: {exc}") from exc
    if config.get("model_type") != "llama":
        raise ConfigError(f"{path}: model_type={config.get('model_type')!r}; only Hugging Face 'llama' checkpoints load")
    for key, supported in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, supported) != supported:
            raise ConfigError(f"{path}: {key}={config[key]!r} is not LLaMA's ({supported!r})")
    try:
        dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        if config.get("head_dim") not in (None, dim // heads):
            raise ConfigError(f"{path}: head_dim={config['head_dim']} differs from hidden_size / num_attention_heads")
        multiple_of, multiplier = _ffn_settings(dim, int(config["intermediate_size"]), path)
        return ModelArgs(
            dim=dim,
            n_layers=int(config["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=None if kv_heads == heads else kv_heads,
            vocab_size=int(config["vocab_size"]),
            multiple_of=multiple_of,
            ffn_dim_multiplier=multiplier,
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            **_rope(config, path),
            max_seq_len=int(config.get("max_position_embeddings", 2048)),
        )
    except KeyError as exc:
        raise ConfigError(f"{path}: missing key {exc}") from exc


def tied_embeddings(ckpt_dir: Path) -> bool:
    return bool(json.loads((ckpt_dir / CONFIG_JSON).read_text()).get("tie_word_embeddings", False))


def _weight_files(ckpt_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index or from the files' own headers."""
    index = ckpt_dir / INDEX_JSON
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: ckpt_dir / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise ConfigError(f"{file}: listed in {index} but missing")
        return files
    found = sorted(ckpt_dir.glob("*.safetensors"))
    if not found:
        raise ConfigError(
            f"{ckpt_dir}: no *.safetensors files (pytorch_model.bin is not read: "
            "re-save with save_pretrained(..., safe_serialization=True))"
        )
    files: dict[str, Path] = {}
    for file in found:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name in files:
                    raise ConfigError(f"{name} is in both {files[name]} and {file}: remove the stray file")
                files[name] = file
    return files


class HfCheckpoint:
    """A Hugging Face Llama directory; slices are read per tensor with safetensors' get_slice."""

    def __init__(self, ckpt_dir: Path):
        self.dir = ckpt_dir
        self.config_file = ckpt_dir / CONFIG_JSON
        self.args = read_args(ckpt_dir)
        self.tied = tied_embeddings(ckpt_dir)
        self.files = _weight_files(ckpt_dir)
        self._check_tensors()

    def source(self, meta_name: str) -> str:
        name = hf_name(meta_name)
        if meta_name == "output.weight" and name not in self.files and self.tied:
            return hf_name("tok_embeddings.weight")
        return name

    def _check_tensors(self) -> None:
        shapes = parameter_shapes(self.args)
        wanted = {self.source(name): name for name in shapes}
        for name, file in self.files.items():
            if name not in wanted and not _IGNORED.fullmatch(name):
                raise ConfigError(f"{file}: unexpected tensor {name} for {self.config_file}")
        for name, meta_name in wanted.items():
            if name not in self.files:
                raise ConfigError(f"{self.dir}: no file holds {name} (the model's {meta_name})")
        for file in sorted(set(self.files.values())):
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if name not in wanted:
                        continue
                    view = handle.get_slice(name)
                    shape, dtype = tuple(view.get_shape()), view.get_dtype()
                    if shape != shapes[wanted[name]]:
                        raise ConfigError(f"{file}: {name} has shape {shape}, {self.config_file} implies {shapes[wanted[name]]}")
                    if dtype not in SAFETENSORS_DTYPES:
                        raise ConfigError(f"{file}: {name} is {dtype}; only F32, F16 and BF16 weights load")

    def read_slice(self, meta_name: str, rank: int, world: int) -> torch.Tensor:
        """This rank's slice of one parameter, in Meta's layout."""
        name = self.source(meta_name)
        dim = shard_dim(meta_name)
        # One open per tensor: closing drops the file mapping, so the pages read for one
        # tensor do not stay resident while the next one is read.
        with safe_open(self.files[name], framework="pt") as handle:
            view = handle.get_slice(name)
            full = view.get_shape()
            if dim is None:
                piece = view[:]
            else:
                start, stop = rank * full[dim] // world, (rank + 1) * full[dim] // world
                piece = view[start:stop] if dim == 0 else view[:, start:stop]
        if meta_name.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = self.args.n_heads if meta_name.endswith("wq.weight") else self.args.kv_heads
            piece = unpermute_rotary(piece, heads // world)
        return piece.contiguous()

    def close(self) -> None:
        pass
