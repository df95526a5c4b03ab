"""Model weights for one rank: random (seeded), or a Meta / Hugging Face checkpoint resharded on load."""

from __future__ import annotations

import ctypes
import json
import logging
import math
import mmap
import os
import pickle
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from w2w import hf
from w2w.cell import ModelConfig
from w2w.errors import ConfigError, divisors
from w2w.model import DTYPES, ModelArgs, parameter_shapes, random_state_dict, shard_dim
from w2w.tokenizer import TINY_TOKENIZER

log = logging.getLogger("w2w.checkpoint")

PARAMS_JSON = "params.json"
TOKENIZER = "tokenizer.model"  # SentencePiece (LLaMA 1, 2) or tiktoken BPE (Llama 3)
HF_TOKENIZER = "tokenizer.json"
_META_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
_IGNORED_META_KEYS = {"rope.freqs"}  # LLaMA 1 stores its rotary table; it is recomputed
_FLOAT_DTYPES = set(DTYPES.values())
# What decides the tensors' shapes: a checkpoint must agree with its preset on all of these.
_SHAPE_KEYS = {  # ModelArgs attribute -> (what the message calls it, the preset options behind it)
    "dim": ("dim", "model.dim"),
    "n_layers": ("n_layers", "model.n_layers"),
    "n_heads": ("n_heads", "model.n_heads"),
    "kv_heads": ("n_kv_heads", "model.n_kv_heads"),
    "vocab_size": ("vocab_size", "model.vocab_size"),
    "ffn_hidden": ("feed-forward width", "model.multiple_of, model.ffn_dim_multiplier"),
}


# ---------------------------------------------------------------------------------------------
# What the runner calls


def model_args(model: ModelConfig) -> ModelArgs:
    """The preset's shapes; with checkpoint_dir set, the checkpoint's, which must match the preset."""
    preset = model.shapes()
    if not model.checkpoint_dir:
        return preset
    ckpt = open_checkpoint(Path(model.checkpoint_dir), load=False)
    found = ckpt.args
    mismatches = [
        f"{label}={getattr(found, attr)} where model={model.name} gives {getattr(preset, attr)} ({options})"
        for attr, (label, options) in _SHAPE_KEYS.items() if getattr(found, attr) != getattr(preset, attr)
    ]
    if mismatches:
        raise ConfigError(
            f"{ckpt.config_file} does not match model={model.name}: the checkpoint has "
            f"{'; '.join(mismatches)}. Use model=checkpoint to take the architecture from the checkpoint, "
            "choose the preset of this checkpoint, or override the options"
        )
    for attr in ("norm_eps", "rope_theta"):
        if getattr(found, attr) != getattr(preset, attr):
            log.info("%s: %s=%s from the checkpoint (preset: %s)", ckpt.config_file, attr,
                     getattr(found, attr), getattr(preset, attr))
    if isinstance(ckpt, hf.HfCheckpoint) and preset.max_seq_len > found.max_seq_len:
        log.warning("model.max_seq_len=%d exceeds the checkpoint's max_position_embeddings=%d",
                    preset.max_seq_len, found.max_seq_len)
    # Trained-in constants come from the checkpoint; the cache length is the run's choice.
    return replace(preset, norm_eps=found.norm_eps, rope_theta=found.rope_theta, **rope_scaling_fields(found))


_ROPE_SCALING_FIELDS = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_pos")
# Meta's code hard-codes Llama 3.1's scaling; its params.json says only use_scaled_rope (and, from
# Llama 3.2 on, rope_scaling_factor).
META_ROPE_SCALING = {"rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_pos": 8192}
META_ROPE_FACTOR = 8.0


def rope_scaling_fields(args: ModelArgs) -> dict:
    return {name: getattr(args, name) for name in _ROPE_SCALING_FIELDS}


def architecture(ckpt_dir: Path) -> dict[str, Any]:
    """model=checkpoint: the model config fields a checkpoint states (params.json or config.json).

    The name is the checkpoint folder's; max_seq_len is Hugging Face's max_position_embeddings,
    and for Meta's format (which does not state it) the default 2048 of the LLaMA presets.
    """
    ckpt = open_checkpoint(ckpt_dir, load=False)
    return asdict(ckpt.args) | {"name": ckpt_dir.resolve().name}


def tokenizer_path(model: ModelConfig) -> Path:
    if model.tokenizer_path:
        return Path(model.tokenizer_path)
    if not model.checkpoint_dir:
        return TINY_TOKENIZER
    found = find_tokenizer(Path(model.checkpoint_dir))
    if found is None:
        ckpt = Path(model.checkpoint_dir)
        raise ConfigError(
            f"no {TOKENIZER} or {HF_TOKENIZER} in {ckpt} or {ckpt.parent}: set model.tokenizer_path to the "
            "checkpoint's tokenizer"
        )
    return found


def find_tokenizer(ckpt_dir: Path) -> Path | None:
    # Meta's downloads keep tokenizer.model beside the size folders (llama/65B/, llama/tokenizer.model).
    # Hugging Face folders ship tokenizer.json (Llama 3: the only tokenizer there).
    candidates = [d / name for d in (ckpt_dir, ckpt_dir.parent) for name in (TOKENIZER, HF_TOKENIZER)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def load_rank_state(model: ModelConfig, args: ModelArgs, rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's slice of every parameter, in Meta's names, in the checkpoint's dtype."""
    if not model.checkpoint_dir:
        return random_state_dict(args, model.init_seed, rank, world)
    return dict(iter_rank_state(Path(model.checkpoint_dir), args, rank, world))


def check_precision(precision: str, device: torch.device) -> None:
    """Fail before any weights reach the device if it cannot compute in `precision`."""
    # Emulated bf16 (pre-Ampere) runs, but far slower than the hardware could: not a fair measurement.
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"precision=bf16 but {name} has no bf16 arithmetic: set precision=fp16 "
            "(bf16 checkpoints are converted on load)"
        )


# ---------------------------------------------------------------------------------------------
# Formats


def open_checkpoint(ckpt_dir: Path, load: bool = True, option: str = "model.checkpoint_dir") -> MetaCheckpoint | hf.HfCheckpoint:
    """A checkpoint directory of either format; load=False reads only its shapes."""
    if not ckpt_dir.is_dir():
        raise ConfigError(f"{option}={ckpt_dir} is not a directory")
    if (ckpt_dir / PARAMS_JSON).is_file():
        return MetaCheckpoint(ckpt_dir, load)
    if (ckpt_dir / hf.CONFIG_JSON).is_file():
        return hf.HfCheckpoint(ckpt_dir)
    raise ConfigError(
        f"{ckpt_dir}: neither {PARAMS_JSON} (Meta format) nor {hf.CONFIG_JSON} (Hugging Face) found"
    )


def check_world(args: ModelArgs, world: int, where: Path, option: str = "shards") -> None:
    """Every split dimension must divide evenly into `world` slices."""
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.kv_heads, "dim": args.dim,
             "vocab_size": args.vocab_size, "ffn_hidden": args.ffn_hidden}
    bad = [f"{k}={v}" for k, v in sizes.items() if v % world]
    if bad:
        gcd = 0
        for value in sizes.values():
            gcd = math.gcd(gcd, value)
        raise ConfigError(
            f"{option}={world} does not divide {', '.join(bad)} of {where}: choose {option} from {divisors(gcd)}"
        )


def iter_rank_state(ckpt_dir: Path, args: ModelArgs, rank: int, world: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, slice) for every parameter, one tensor at a time."""
    ckpt = open_checkpoint(ckpt_dir)
    try:
        check_world(ckpt.args, world, ckpt.config_file)
        shapes = parameter_shapes(ckpt.args)
        if shapes != parameter_shapes(args):
            raise ConfigError(f"{ckpt.config_file}: shapes differ from the model being built")
        for name in shapes:
            yield name, ckpt.read_slice(name, rank, world)
    finally:
        ckpt.close()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Meta's format: params.json + consolidated.NN.pth, each a torch.save'd slice of every tensor


_MADV_DONTNEED = 4
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _file_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps `path` (empty where /proc is not readable)."""
    target = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == target:
                    start, end = parts[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return ranges


def _drop_pages(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
    """Unmap the pages of a memory-mapped tensor once it has been copied.

    A mapped page that was read stays resident in this process until the mapping goes; a
    row-parallel slice touches every row of the source tensor, so without this a rank
    would end up holding whole source shards. The mapping is private and never written,
    so a dropped page is simply read from the file again if it is needed. Outside the
    file's mapping (a copy made by torch.load) nothing is dropped: that would zero memory.
    """
    if _LIBC is None or tensor.numel() == 0:
        return
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    start = tensor.data_ptr()
    aligned, end = start - start % mmap.PAGESIZE, start + span * tensor.element_size()
    if any(lo <= aligned and end <= hi for lo, hi in ranges):
        _LIBC.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(end - aligned), _MADV_DONTNEED)


def meta_shard_files(ckpt_dir: Path) -> list[Path]:
    """consolidated.00.pth ... in index order; a gap in the numbering is an error."""
    found = {}
    for path in ckpt_dir.iterdir():
        match = _META_SHARD.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise ConfigError(f"{ckpt_dir}: {PARAMS_JSON} but no consolidated.NN.pth shard files")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        raise ConfigError(
            f"{ckpt_dir}: missing shard file(s) {', '.join(f'consolidated.{i:02d}.pth' for i in missing)} "
            f"(found {len(found)} of {max(found) + 1})"
        )
    return [found[i] for i in range(len(found))]


def _mmap_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, OSError, EOFError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot memory-map this checkpoint shard: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ConfigError(f"{path}: not a state dict of tensors")
    return state


def _meta_args(params: dict, path: Path, vocab_size: int) -> ModelArgs:
    scaling = {}
    if params.get("use_scaled_rope"):
        scaling = META_ROPE_SCALING | {k: params[k] for k in META_ROPE_SCALING if k in params}
        scaling["rope_scaling_factor"] = float(params.get("rope_scaling_factor") or META_ROPE_FACTOR)
    try:
        return ModelArgs(
            dim=int(params["dim"]),
            n_layers=int(params["n_layers"]),
            n_heads=int(params["n_heads"]),
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=vocab_size,
            multiple_of=int(params.get("multiple_of", 256)),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            **scaling,
        )
    except KeyError as exc:
        raise ConfigError(f"{path}: missing key {exc}") from exc


class MetaCheckpoint:
    """Meta's shards, memory-mapped: a slice is copied out of the shards that overlap it."""

    def __init__(self, ckpt_dir: Path, load: bool = True):
        self.dir = ckpt_dir
        self.config_file = ckpt_dir / PARAMS_JSON
        params = _read_json(self.config_file)
        self.files = meta_shard_files(ckpt_dir)
        first = _mmap_load(self.files[0])
        embedding = first.get("tok_embeddings.weight")
        if embedding is None or embedding.dim() != 2:
            raise ConfigError(f"{self.files[0]}: no 2-d tok_embeddings.weight")
        vocab = int(params.get("vocab_size", -1))
        # LLaMA 1 and 2 write vocab_size=-1: the embedding has the real count.
        self.args = _meta_args(params, self.config_file, vocab if vocab > 0 else embedding.shape[0])
        self._check_shard_count(embedding)
        self.shards: list[dict[str, torch.Tensor]] = []
        self.ranges: list[list[tuple[int, int]]] = []
        if load:
            self.shards = [first] + [_mmap_load(path) for path in self.files[1:]]
            self.ranges = [_file_ranges(path) for path in self.files]
            self._check_shards()

    def _check_shard_count(self, embedding: torch.Tensor) -> None:
        width, dim, count = embedding.shape[1], self.args.dim, len(self.files)
        if width * count == dim:
            return
        if width and dim % width == 0:
            raise ConfigError(
                f"{self.dir}: found {count} shard files but {self.files[0].name} holds 1/{dim // width} of "
                f"the model (tok_embeddings.weight {tuple(embedding.shape)}, dim={dim}): expected "
                f"consolidated.00.pth ... consolidated.{dim // width - 1:02d}.pth; "
                f"{'extra' if count > dim // width else 'missing'} shard files"
            )
        raise ConfigError(
            f"{self.files[0]}: tok_embeddings.weight {tuple(embedding.shape)} does not fit dim={dim} "
            f"of {self.config_file}"
        )

    def _check_shards(self) -> None:
        count = len(self.files)
        expected = {}
        for name, shape in parameter_shapes(self.args).items():
            dim = shard_dim(name)
            shape = list(shape)
            if dim is not None:
                shape[dim] //= count
            expected[name] = tuple(shape)
        for path, state in zip(self.files, self.shards, strict=True):
            keys = set(state) - _IGNORED_META_KEYS
            missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing or extra:
                raise ConfigError(
                    f"{path}: tensors do not match {self.config_file}: missing {missing[:4]}, unexpected {extra[:4]}"
                )
            for name, shape in expected.items():
                tensor = state[name]
                if tuple(tensor.shape) != shape:
                    raise ConfigError(
                        f"{path}: {name} has shape {tuple(tensor.shape)}, expected {shape} for "
                        f"{count} shards of {self.config_file}"
                    )
                if tensor.dtype not in _FLOAT_DTYPES:
                    raise ConfigError(f"{path}: {name} is {tensor.dtype}; only fp32, fp16 and bf16 weights load")

    def read_slice(self, name: str, rank: int, world: int) -> torch.Tensor:
        dim = shard_dim(name)
        if dim is None:
            source = self.shards[0][name]
            out = source.clone()
            _drop_pages(source, self.ranges[0])
            return out
        per_shard = self.shards[0][name].shape[dim]
        full = per_shard * len(self.shards)
        start, stop = rank * full // world, (rank + 1) * full // world
        shape = list(self.shards[0][name].shape)
        shape[dim] = stop - start
        out = torch.empty(shape, dtype=self.shards[0][name].dtype)
        # Source shard i holds [i * per_shard, (i + 1) * per_shard) along `dim`.
        for index in range(start // per_shard, (stop - 1) // per_shard + 1):
            source = self.shards[index][name]
            lo, hi = max(start, index * per_shard), min(stop, (index + 1) * per_shard)
            piece = source.narrow(dim, lo - index * per_shard, hi - lo)
            out.narrow(dim, lo - start, hi - lo).copy_(piece)
            _drop_pages(source, self.ranges[index])
        return out

    def close(self) -> None:
        self.shards, self.ranges = [], []


# ---------------------------------------------------------------------------------------------
# w2w-reshard


def _params_json(args: ModelArgs) -> dict:
    """Meta's params.json; optional keys only when set, so Meta's LLaMA 1 code reads it too."""
    params: dict = {"dim": args.dim, "multiple_of": args.multiple_of, "n_heads": args.n_heads,
                    "n_layers": args.n_layers, "norm_eps": args.norm_eps, "vocab_size": args.vocab_size}
    if args.n_kv_heads is not None and args.n_kv_heads != args.n_heads:
        params["n_kv_heads"] = args.n_kv_heads
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    if args.rope_theta != 10000.0:
        params["rope_theta"] = args.rope_theta
    if args.rope_scaling_factor is not None:
        params["use_scaled_rope"] = True
        if args.rope_scaling_factor != META_ROPE_FACTOR:
            params["rope_scaling_factor"] = args.rope_scaling_factor
        # Meta's code has these fixed; written only where they differ, for w2w to read back.
        params |= {k: getattr(args, k) for k, v in META_ROPE_SCALING.items() if getattr(args, k) != v}
    return params


def reshard(src: Path, dst: Path, shards: int, dtype: torch.dtype | None = None, progress: bool = True) -> list[Path]:
    """Write `src` (either format) to `dst` as a Meta checkpoint of `shards` files."""
    from tqdm import tqdm

    ckpt = open_checkpoint(src, load=False, option="SRC")
    args = ckpt.args
    check_world(args, shards, ckpt.config_file, option="--shards")
    if dst.resolve() == src.resolve():
        raise ConfigError(f"DST {dst} is SRC: write the resharded checkpoint to a new directory")
    dst.mkdir(parents=True, exist_ok=True)
    # Replicated tensors (norms) are written once per shard.
    total = sum(torch.Size(s).numel() * (1 if shard_dim(n) is not None else shards)
                for n, s in parameter_shapes(args).items())
    written = []
    with tqdm(total=total, unit="param", unit_scale=True, disable=not progress, desc="reshard") as bar:
        for rank in range(shards):
            bar.set_postfix_str(f"consolidated.{rank:02d}.pth")
            state = {}
            for name, tensor in iter_rank_state(src, args, rank, shards):
                state[name] = tensor if dtype is None else tensor.to(dtype)
                bar.update(tensor.numel())
            path = dst / f"consolidated.{rank:02d}.pth"
            tmp = path.with_name(path.name + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)
            written.append(path)
            del state
    tokenizer = find_tokenizer(src)
    if tokenizer is not None and not (dst / TOKENIZER).exists():
        shutil.copyfile(tokenizer, dst / TOKENIZER)
    # params.json last: a directory without it is an unfinished reshard, not a checkpoint.
    (dst / PARAMS_JSON).write_text(json.dumps(_params_json(args), indent=2) + "\n")
    return written


def stale_shards(dst: Path, shards: int) -> list[Path]:
    if not dst.is_dir():
        return []
    return [p for p in dst.iterdir() if _META_SHARD.fullmatch(p.name) and int(p.name.split(".")[1]) >= shards]
