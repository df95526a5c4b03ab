"""Prompt sets: Alpaca, GSM8K (hub name or local JSON/JSONL, via `datasets`) and offline synthetic ones."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
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


PROMPT_SLOT = "{prompt}"  # where dataset.prompt_template puts each dataset prompt


@dataclass(frozen=True)
class Prompt:
    """One prompt of a cell: its row in the source, the text the model sees, the reference answer."""

    id: int  # row index in the file or split (synthetic: position)
    text: str  # with dataset.prompt_template and any k-shot prefix applied
    reference: str | None = None  # GSM8K's answer field; None where nothing can be scored


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


def fill_template(template: str, prompt: str) -> str:
    # replace, not str.format: a template or prompt may hold other braces (code, JSON).
    return template.replace(PROMPT_SLOT, prompt)


def prompt_template(cfg: DictConfig) -> str:
    """dataset.prompt_template; a typed '\\n' is a newline, which a command line cannot pass."""
    return cfg.get("prompt_template", PROMPT_SLOT).replace("\\n", "\n")


def check_template(cfg: DictConfig) -> None:
    """dataset.prompt_template and the k-shot options; no files are read."""
    template = cfg.get("prompt_template", PROMPT_SLOT)
    if PROMPT_SLOT not in template:
        raise ConfigError(
            f"dataset.prompt_template={template!r} has no {PROMPT_SLOT} slot: add it where the "
            "dataset's prompt goes (e.g. 'Question: {prompt}\\nAnswer:')"
        )
    k, path = cfg.get("fewshot_k", 0), cfg.get("fewshot_path")
    if k < 0:
        raise ConfigError(f"dataset.fewshot_k={k}: must be >= 0 (0: zero-shot, as the paper ran)")
    if k and cfg.name != "gsm8k":
        raise ConfigError(f"dataset.fewshot_k={k}: k-shot prefixes are for gsm8k only, not {cfg.name}")
    if k and not path:
        raise ConfigError(f"dataset.fewshot_k={k} needs dataset.fewshot_path: a .jsonl of GSM8K rows to draw shots from")


def fewshot_prefix(cfg: DictConfig) -> str:
    """The first dataset.fewshot_k rows of dataset.fewshot_path, each as the template filled with
    its question followed by its worked answer (which ends in '#### N')."""
    k = cfg.get("fewshot_k", 0)
    if not k:
        return ""
    path = Path(cfg.fewshot_path)
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"dataset.fewshot_path={path}: cannot read it as JSONL: {exc}") from exc
    good = [r for r in rows if isinstance(r, dict) and {"question", "answer"} <= r.keys()]
    if len(good) < k:
        raise ConfigError(
            f"dataset.fewshot_path={path} has {len(good)} rows with question and answer; "
            f"dataset.fewshot_k={k} needs {k}: lower fewshot_k or give a larger file"
        )
    template = prompt_template(cfg)
    return "".join(f"{fill_template(template, r['question'])} {r['answer']}\n\n" for r in good[:k])


def load_prompts(cfg: DictConfig) -> list[str]:
    """The texts of load_prompt_rows."""
    return [p.text for p in load_prompt_rows(cfg)]


def load_prompt_rows(cfg: DictConfig) -> list[Prompt]:
    """cfg.num_prompts prompts sampled without replacement with cfg.seed, in sampled order, with
    the template and k-shot prefix applied (so prompt token counts include them)."""
    check_template(cfg)
    prefix, template = fewshot_prefix(cfg), prompt_template(cfg)
    return [Prompt(p.id, prefix + fill_template(template, p.text), p.reference) for p in _dataset_rows(cfg)]


def _dataset_rows(cfg: DictConfig) -> list[Prompt]:
    if cfg.name == "synthetic":
        return [Prompt(i, text) for i, text in enumerate(synthetic_prompts(cfg.num_prompts, cfg.seed))]
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
        return [Prompt(i, alpaca_prompt(row)) for i, row in zip(picked, subset, strict=True)]
    answers = subset["answer"] if "answer" in subset.column_names else [None] * len(picked)
    return [Prompt(i, q, a) for i, q, a in zip(picked, subset["question"], answers, strict=True)]
