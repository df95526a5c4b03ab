"""Prompt sets: Alpaca, GSM8K (hub name or local JSON/JSONL, via `datasets`) and offline synthetic ones."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from omegaconf import DictConfig

from w2w.config import ConfigError

# Stanford Alpaca's prompt template (tatsu-lab/stanford_alpaca, train.py).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
REQUIRED_FIELDS = {"alpaca": ("instruction",), "gsm8k": ("question",)}
HUB_SUBSETS = {"gsm8k": "main"}

WORDS = (
    "the energy of a model grows with its size and the number of tokens it writes while "
    "cluster nodes share power among many jobs so we measure every device and report what "
    "each answer costs in joules seconds and words for researchers who plan large experiments "
    "explain why a smaller batch may waste power when the accelerator waits for memory "
    "describe how sharding across nodes adds network time and raises the wattage of a run"
).split()


def alpaca_prompt(row: dict) -> str:
    if row.get("input"):
        return ALPACA_WITH_INPUT.format(instruction=row["instruction"], input=row["input"])
    return ALPACA_NO_INPUT.format(instruction=row["instruction"])


def synthetic_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30))) for _ in range(n)]


def check_local_path(cfg: DictConfig) -> Path | None:
    """The local prompt file named by dataset.path (None for a hub name); checked on the login node too."""
    if cfg.path is None:
        return None
    local = Path(cfg.path)
    if local.suffix not in (".json", ".jsonl") and not local.exists():
        return None
    if not local.is_file():
        raise ConfigError(f"dataset.path={cfg.path}: no such file; give a local .json/.jsonl or a hub name")
    if local.stat().st_size == 0:
        raise ConfigError(f"dataset.path={cfg.path}: the file is empty")
    return local


def file_sha256(path: Path) -> str:
    """The file's content hash (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_unchanged(cfg: DictConfig) -> None:
    """The prompt file still holds what the cell id was computed from (a job may start hours later)."""
    expected = cfg.get("content_sha256")
    local = check_local_path(cfg)
    if expected and local is not None and file_sha256(local) != expected:
        raise ConfigError(
            f"dataset.path={cfg.path} was edited after the sweep was planned: re-run w2w-sweep so that "
            f"its cells get new ids (the results would otherwise be filed under the old data's cells)"
        )


def _load_rows(cfg: DictConfig):
    import datasets

    datasets.disable_progress_bars()
    path = cfg.path
    if path is None:
        raise ConfigError(f"dataset.path is empty for dataset {cfg.name}: give a hub name or a local .json/.jsonl")
    local = check_local_path(cfg)
    if local is not None:
        return datasets.load_dataset("json", data_files=str(local), split="train")
    return datasets.load_dataset(path, HUB_SUBSETS.get(cfg.name), split=cfg.split)


def load_prompts(cfg: DictConfig) -> list[str]:
    """cfg.num_prompts prompts sampled without replacement with cfg.seed, in sampled order."""
    if cfg.name == "synthetic":
        return synthetic_prompts(cfg.num_prompts, cfg.seed)
    if cfg.name not in REQUIRED_FIELDS:
        raise ConfigError(f"dataset.name={cfg.name}: valid are synthetic, {', '.join(REQUIRED_FIELDS)}")
    rows = _load_rows(cfg)
    missing = [f for f in REQUIRED_FIELDS[cfg.name] if f not in rows.column_names]
    if missing or len(rows) == 0:
        raise ConfigError(
            f"dataset.path={cfg.path}: {cfg.name} needs rows with field(s) "
            f"{', '.join(REQUIRED_FIELDS[cfg.name])}; found {len(rows)} rows with {rows.column_names}"
        )
    if cfg.num_prompts > len(rows):
        raise ConfigError(
            f"dataset.num_prompts={cfg.num_prompts} but {cfg.path} has {len(rows)} rows: "
            f"lower dataset.num_prompts or use a larger split"
        )
    picked = random.Random(cfg.seed).sample(range(len(rows)), cfg.num_prompts)
    subset = rows.select(picked)
    if cfg.name == "alpaca":
        return [alpaca_prompt(row) for row in subset]
    return list(subset["question"])
