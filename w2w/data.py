"""Prompt sets: Alpaca, GSM8K (hub name or local JSON/JSONL), offline synthetic ones, and a sweep's snapshots of them."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import random
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from w2w.cell import DatasetConfig
from w2w.errors import ConfigError
from w2w.files import write_atomic

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
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv")
HUB_TIMEOUT_S = 3.0  # one connection attempt: long enough for a slow proxy, not the 25 s of retries
_TRUE = ("1", "true", "yes", "on")

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


def check_local_path(cfg: DatasetConfig) -> Path | None:
    """The local prompt file named by dataset.path (None for a hub name); checked on the login node too."""
    if cfg.path is None:
        return None
    local = Path(cfg.path)
    if local.suffix not in LOCAL_SUFFIXES and not local.exists():
        return None
    if not local.is_file():
        raise ConfigError(f"dataset.path={cfg.path}: no such file; give a local .json/.jsonl/.csv or a hub name")
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


def check_unchanged(cfg: DatasetConfig) -> None:
    """The prompt file still holds what the cell id was computed from (a job may start hours later);
    a cell with a snapshot reads only that (read_snapshot checks it), not the source."""
    if cfg.snapshot:
        return
    expected = cfg.content_sha256
    local = check_local_path(cfg)
    if expected and local is not None and file_sha256(local) != expected:
        raise ConfigError(
            f"dataset.path={cfg.path} was edited after the sweep was planned: re-run w2w-sweep so that "
            f"its cells get new ids (the results would otherwise be filed under the old data's cells)"
        )
    if cfg.fewshot_sha256 and file_sha256(fewshot_file(cfg)) != cfg.fewshot_sha256:
        raise ConfigError(
            f"dataset.fewshot_path={cfg.fewshot_path} was edited after the sweep was planned: re-run w2w-sweep "
            f"so that its cells get new ids (the results would otherwise be filed under the old shots' cells)"
        )


Rows = list[tuple[str, object]]  # (where in the file: "line 3" or "row 3", the row)


def _json_rows(path: Path, option: str = "dataset.path") -> Rows:
    if path.suffix != ".json":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{option}={path}: line {number} is not JSON ({exc.msg}, column "
                                      f"{exc.colno}): fix or remove that line") from None
        return rows
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option}={path}: not valid JSON at line {exc.lineno} column {exc.colno} "
                          f"({exc.msg}); a .json file holds a list of rows, a .jsonl one row per line") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        width = {len(v) for v in data.values()}
        if len(width) != 1:
            raise ConfigError(f"{option}={path}: its columns have different lengths {sorted(width)}")
        data = [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    if not isinstance(data, list):
        raise ConfigError(f"{option}={path}: holds a JSON {type(data).__name__}; give a list of rows "
                          f"(objects) or one object per line in a .jsonl file")
    return [(f"row {number}", row) for number, row in enumerate(data, 1)]


def _csv_rows(path: Path) -> Rows:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        rows = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            if header is None or len(values) != len(header):
                raise ConfigError(f"dataset.path={path}: line {reader.line_num} has {len(values)} fields but the "
                                  f"header has {len(header or [])}: quote fields that hold commas")
            rows.append((f"line {reader.line_num}", dict(zip(header, values, strict=True))))
    return rows


def local_rows(path: Path) -> Rows:
    """The rows of a local prompt file, parsed here: errors name the file and the row."""
    if path.suffix not in LOCAL_SUFFIXES:
        raise ConfigError(f"dataset.path={path}: unknown file type '{path.suffix}': give .json, .jsonl or .csv")
    try:
        return _csv_rows(path) if path.suffix == ".csv" else _json_rows(path)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"dataset.path={path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def check_rows(cfg: DatasetConfig, path: Path, rows: Rows) -> None:
    """Every row holds the dataset's fields, not null; there are enough rows for num_prompts."""
    if not rows:
        raise ConfigError(f"dataset.path={path}: the file has no rows (only blank lines)")
    for where, row in rows:
        if not isinstance(row, dict):
            raise ConfigError(f"dataset.path={path}: {where} is a JSON {type(row).__name__}, not an object")
        for name in REQUIRED_FIELDS[cfg.name]:
            if name not in row:
                raise ConfigError(f"dataset.path={path}: {where} has no field '{name}' ({cfg.name} needs "
                                  f"{', '.join(REQUIRED_FIELDS[cfg.name])}; it has {', '.join(row) or 'none'})")
            value = row[name]
            if value is None or not isinstance(value, str) or not value.strip():
                what = "null" if value is None else "empty" if isinstance(value, str) else f"a {type(value).__name__}"
                raise ConfigError(f"dataset.path={path}: {where} has field '{name}' {what}, not text: "
                                  f"fill it in or remove the row")
        check_answer(f"dataset.path={path}: {where}", cfg.name, row)
    if cfg.num_prompts > len(rows):
        raise ConfigError(
            f"dataset.num_prompts={cfg.num_prompts} but {path} has {len(rows)} rows: "
            f"lower dataset.num_prompts or use a larger split"
        )


# Fields that must be text where a row has them: GSM8K's answer is a worked solution ending in '#### N',
# which scoring and the k-shot prefix read as text (a bare number failed on the node with a TypeError).
TEXT_FIELDS = {"alpaca": ("input",), "gsm8k": ("answer",)}


def check_answer(where: str, name: str, row: dict) -> None:
    """A row's optional text fields (GSM8K's answer) are text or absent; ConfigError naming the row."""
    for field_name in TEXT_FIELDS.get(name, ()):
        value = row.get(field_name)
        if value is not None and not isinstance(value, str):
            example = f'"#### {value}"' if field_name == "answer" else f'"{value}"'
            raise ConfigError(f"{where} has field '{field_name}' {value!r}, a {type(value).__name__}, not text: "
                              f"write it as text, e.g. {example}" + (" (a worked answer ends in '#### N')"
                                                                      if field_name == "answer" else ""))


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _hf_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("HF_HOME") or Path(xdg) / "huggingface").expanduser()


def hub_cached(name: str) -> bool:
    """Whether a hub dataset has a copy that `datasets` can load offline: a prepared one in the datasets
    cache (`NAMESPACE___NAME/CONFIG/VERSION/HASH`, as datasets' own cache lookup globs) or a download
    in the hub cache (`datasets--NAMESPACE--NAME`). Read from the folders: no datasets import."""
    parts = name.split("/")
    # datasets files a name in snake case (camelcase_to_snakecase); for hub names that is lower case.
    parts[-1] = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", parts[-1]).lower()
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or _hf_home() / "datasets").expanduser()
    hub_cache = Path(os.environ.get("HF_HUB_CACHE") or _hf_home() / "hub").expanduser()
    prepared = any(p.is_dir() for p in (datasets_cache / "___".join(parts)).glob("*/*/*"))
    downloaded = (hub_cache / ("datasets--" + name.replace("/", "--")) / "snapshots").is_dir()
    return prepared or downloaded


def check_hub_reachable(cfg: DatasetConfig) -> None:
    """A hub name needs the hub (one quick connection), unless the user runs from the datasets cache."""
    if hub_offline():
        if not hub_cached(str(cfg.path)):
            raise ConfigError(
                f"dataset.path={cfg.path} is a Hugging Face hub name but HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is "
                f"set and the datasets cache ({os.environ.get('HF_DATASETS_CACHE') or _hf_home() / 'datasets'}) "
                f"has no copy: give a local copy, e.g. dataset.path=/data/{cfg.name}.jsonl, or load it once "
                f"online (unset HF_DATASETS_OFFLINE) to fill the cache"
            )
        return
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(
            f"dataset.path={cfg.path} is a Hugging Face hub name but {host} cannot be reached from "
            f"{socket.gethostname()} ({exc}): give a local copy, e.g. dataset.path=/data/{cfg.name}.jsonl "
            f"(.json, .jsonl or .csv), or set HF_DATASETS_OFFLINE=1 to read it from your datasets cache"
        ) from None


def check_dataset(cfg: DatasetConfig) -> None:
    """What would fail on the node, checked before anything is submitted (and again on the node)."""
    if cfg.name == "synthetic":
        return
    if cfg.name not in REQUIRED_FIELDS:
        raise ConfigError(f"dataset.name={cfg.name}: valid are synthetic, {', '.join(REQUIRED_FIELDS)}")
    if cfg.path is None:
        raise ConfigError(f"dataset.path is empty for dataset {cfg.name}: give a hub name or a local .json/.jsonl")
    local = check_local_path(cfg)
    if local is None:
        check_hub_reachable(cfg)
    else:
        check_rows(cfg, local, local_rows(local))
    fewshot_prefix(cfg)  # the k-shot file: exists, parses, has k rows of text (a hub dataset's cells too)


def _load_rows(cfg: DatasetConfig):
    import datasets

    datasets.disable_progress_bars()
    path = cfg.path
    if path is None:
        raise ConfigError(f"dataset.path is empty for dataset {cfg.name}: give a hub name or a local .json/.jsonl")
    local = check_local_path(cfg)
    if local is not None:
        return datasets.load_dataset("csv" if local.suffix == ".csv" else "json", data_files=str(local), split="train")
    return datasets.load_dataset(path, HUB_SUBSETS.get(cfg.name), split=cfg.split)


def fill_template(template: str, prompt: str) -> str:
    # replace, not str.format: a template or prompt may hold other braces (code, JSON).
    return template.replace(PROMPT_SLOT, prompt)


def prompt_template(cfg: DatasetConfig) -> str:
    """dataset.prompt_template; a typed '\\n' is a newline, which a command line cannot pass."""
    return cfg.prompt_template.replace("\\n", "\n")


def check_template(cfg: DatasetConfig) -> None:
    """dataset.prompt_template and the k-shot options; no files are read."""
    template = cfg.prompt_template
    if PROMPT_SLOT not in template:
        raise ConfigError(
            f"dataset.prompt_template={template!r} has no {PROMPT_SLOT} slot: add it where the "
            "dataset's prompt goes (e.g. 'Question: {prompt}\\nAnswer:')"
        )
    k, path = cfg.fewshot_k, cfg.fewshot_path
    if k < 0:
        raise ConfigError(f"dataset.fewshot_k={k}: must be >= 0 (0: zero-shot, as the paper ran)")
    if k and cfg.name != "gsm8k":
        raise ConfigError(f"dataset.fewshot_k={k}: k-shot prefixes are for gsm8k only, not {cfg.name}")
    if k and not path:
        raise ConfigError(f"dataset.fewshot_k={k} needs dataset.fewshot_path: a .jsonl of GSM8K rows to draw shots from")


def fewshot_file(cfg: DatasetConfig) -> Path:
    """dataset.fewshot_path, which must be a file (checked when the cell is composed, and at --plan)."""
    path = Path(str(cfg.fewshot_path))
    if not path.is_file():
        raise ConfigError(f"dataset.fewshot_path={cfg.fewshot_path}: no such file: give a .jsonl of GSM8K rows "
                          f"(question, answer), or drop dataset.fewshot_k for zero-shot prompts")
    return path


SHOT_FIELDS = ("question", "answer")


def check_shot(where: str, line: str, row: object) -> None:
    """A k-shot row is an object whose question and answer are non-empty text (a null or missing answer
    put 'None' or nothing into every prompt); ConfigError naming the row and the field."""
    if not isinstance(row, dict):
        raise ConfigError(f"{where} ({line}) is a JSON {type(row).__name__}, not an object with question and answer")
    for name in SHOT_FIELDS:
        value = row.get(name)
        if not isinstance(value, str) or not value.strip():
            what = ("missing" if name not in row else "null" if value is None
                    else "empty" if isinstance(value, str) else f"{value!r}, a {type(value).__name__}")
            example = ' (a worked answer ending in "#### N")' if name == "answer" else ""
            raise ConfigError(f"{where} has field '{name}' {what}, not text: write it as text{example}, "
                              f"or remove {line}")


def fewshot_prefix(cfg: DatasetConfig) -> str:
    """The first dataset.fewshot_k rows of dataset.fewshot_path, each as the template filled with
    its question followed by its worked answer (which ends in '#### N')."""
    k = cfg.fewshot_k
    if not k:
        return ""
    path = fewshot_file(cfg)
    try:  # .jsonl or .json (a list of rows) as dataset.path is read; a .json used to show "0 rows"
        rows = _json_rows(path, "dataset.fewshot_path")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"dataset.fewshot_path={path}: cannot read it: {exc}") from None
    if len(rows) < k:
        raise ConfigError(
            f"dataset.fewshot_path={path} has {len(rows)} rows with question and answer; "
            f"dataset.fewshot_k={k} needs {k}: lower fewshot_k or give a larger file"
        )
    for number, (line, row) in enumerate(rows[:k], 1):  # every shot is in every prompt: each needs both texts
        check_shot(f"dataset.fewshot_path={path}: shot {number}", line, row)
    template = prompt_template(cfg)
    return "".join(f"{fill_template(template, r['question'])} {r['answer']}\n\n" for _, r in rows[:k])


SNAPSHOTS = "prompts"  # the sweep's folder of prompt snapshots, <dataset>-<sha256 prefix>.jsonl
SNAPSHOT_HASH_CHARS = 16


def snapshot_bytes(rows: list[Prompt]) -> bytes:
    """The prompts as JSONL, one {"id", "text", "reference"} per line, in the order the cell runs them."""
    lines = (json.dumps(dataclasses.asdict(row), ensure_ascii=False, sort_keys=True) for row in rows)
    return "".join(f"{line}\n" for line in lines).encode()


def snapshot_dataset(cfg: DatasetConfig, sweep_dir: Path) -> DatasetConfig:
    """cfg reading its prompts from a snapshot in the sweep (SNAPSHOTS), written once per content.

    Local files are read here without `datasets`; a hub dataset is loaded here, on the login
    node, so that no compute node needs the hub or the datasets cache. Its content hash goes into
    content_sha256 (hence the cell id), as a local file's does; a local file keeps its own hash.
    Synthetic prompts need no file: cfg is returned as it is.
    """
    if cfg.name == "synthetic":
        return cfg
    rows = plan_prompt_rows(cfg)
    blob = snapshot_bytes(load_prompt_rows(cfg) if rows is None else rows)
    sha = hashlib.sha256(blob).hexdigest()
    path = sweep_dir / SNAPSHOTS / f"{cfg.name}-{sha[:SNAPSHOT_HASH_CHARS]}.jsonl"
    if not path.is_file() or file_sha256(path) != sha:
        write_atomic(path, blob)
    return dataclasses.replace(cfg, snapshot=str(path), content_sha256=cfg.content_sha256 or sha)


def read_snapshot(cfg: DatasetConfig) -> list[Prompt]:
    """The prompts of cfg.snapshot, checked against the hash in its name (no hub, no `datasets`)."""
    path = Path(str(cfg.snapshot))
    if not path.is_file():
        raise ConfigError(f"dataset {cfg.name}: its snapshot {path} is gone: re-run w2w-sweep to write it again")
    if not file_sha256(path).startswith(path.stem.rsplit("-", 1)[-1]):
        raise ConfigError(f"dataset {cfg.name}: its snapshot {path} was edited after the sweep was planned: "
                          "delete it and re-run w2w-sweep")
    return [Prompt(**json.loads(line)) for line in path.read_text().splitlines() if line]


def load_prompts(cfg: DatasetConfig) -> list[str]:
    """The texts of load_prompt_rows."""
    return [p.text for p in load_prompt_rows(cfg)]


def load_prompt_rows(cfg: DatasetConfig) -> list[Prompt]:
    """cfg.num_prompts prompts sampled without replacement with cfg.seed, in sampled order, with
    the template and k-shot prefix applied (so prompt token counts include them); from the sweep's
    snapshot where w2w-sweep made one (snapshot_dataset)."""
    if cfg.snapshot:
        return read_snapshot(cfg)
    check_template(cfg)
    prefix, template = fewshot_prefix(cfg), prompt_template(cfg)
    return [Prompt(p.id, prefix + fill_template(template, p.text), p.reference) for p in _dataset_rows(cfg)]


def _row_prompt(name: str, index: int, row: dict) -> Prompt:
    """One picked row as a prompt of dataset `name` (alpaca or gsm8k)."""
    if name == "alpaca":
        return Prompt(index, alpaca_prompt(row))
    return Prompt(index, row["question"], row.get("answer"))


def plan_prompt_rows(cfg: DatasetConfig) -> list[Prompt] | None:
    """load_prompt_rows where the login node can read the prompts without the datasets library
    (synthetic, local files); None for a hub dataset, which only the node loads."""
    local = check_local_path(cfg) if cfg.name != "synthetic" else None
    if cfg.name != "synthetic" and local is None:
        return None
    check_dataset(cfg)
    if cfg.name == "synthetic":
        rows = [Prompt(i, text) for i, text in enumerate(synthetic_prompts(cfg.num_prompts, cfg.seed))]
    else:
        table = [row for _, row in local_rows(local)]
        picked = random.Random(cfg.seed).sample(range(len(table)), cfg.num_prompts)  # as _dataset_rows picks
        rows = [_row_prompt(cfg.name, i, table[i]) for i in picked]
    check_template(cfg)
    prefix, template = fewshot_prefix(cfg), prompt_template(cfg)
    return [Prompt(p.id, prefix + fill_template(template, p.text), p.reference) for p in rows]


def _dataset_rows(cfg: DatasetConfig) -> list[Prompt]:
    if cfg.name == "synthetic":
        return [Prompt(i, text) for i, text in enumerate(synthetic_prompts(cfg.num_prompts, cfg.seed))]
    if cfg.name not in REQUIRED_FIELDS:
        raise ConfigError(f"dataset.name={cfg.name}: valid are synthetic, {', '.join(REQUIRED_FIELDS)}")
    check_dataset(cfg)
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
