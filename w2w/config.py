"""Structured config schemas, composition of cells from Hydra overrides, and validation."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PRECISIONS = ("fp32", "fp16", "bf16")
ENERGY_BACKENDS = ("auto", "nvml", "none")


class ConfigError(ValueError):
    """Bad user input, reported before any work starts."""


@dataclass
class ModelConfig:
    name: str = MISSING
    dim: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads == n_heads)
    vocab_size: int = MISSING
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    # Llama 3.1's rope scaling (rope_type llama3); null: none. A checkpoint's own values win.
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_pos: int = 8192
    checkpoint_dir: str | None = None  # None: random weights drawn from init_seed
    # None: tokenizer.model or tokenizer.json in checkpoint_dir (or one level up), or the bundled tiny one
    tokenizer_path: str | None = None
    eos_token: str | None = None  # None: the family's (</s>, <|end_of_text|>); instruct Llama 3: <|eot_id|>
    init_seed: int = 0


@dataclass
class GpuConfig:
    name: str = MISSING
    device: str = "cuda"  # torch device type: cuda or cpu
    memory_gib: float = 0.0  # per GPU, for the fit check; 0 = unknown, no check
    bf16: bool = True  # native bf16 arithmetic (Ampere and newer)
    tdp_w: float | None = None


@dataclass
class DatasetConfig:
    name: str = MISSING
    path: str | None = None  # hub name or local .json/.jsonl; None for synthetic
    split: str = "train"
    num_prompts: int = 4096
    seed: int = 0
    # Longer prompts keep their last tokens; also the prompt length the memory-fit check assumes.
    max_prompt_tokens: int = 128
    # Each prompt as the model sees it: "{prompt}" is the dataset's prompt (zero-shot, as the paper).
    prompt_template: str = "{prompt}"
    fewshot_path: str | None = None  # GSM8K rows (question, answer) whose first fewshot_k prefix each prompt
    fewshot_k: int = 0


@dataclass
class ClusterConfig:
    name: str = MISSING
    backend: str = "local"  # local (submitit LocalExecutor) or slurm
    gpus_per_node: int = 1
    max_nodes: int = 1
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gres: str | None = None  # e.g. gpu:volta:2; None: gpu:<gpus per node used>
    timeout_min: int = 60
    cpus_per_task: int = 1
    mem_gb: float | None = None
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    array_parallelism: int = 64
    python: str | None = None  # interpreter on the nodes; None: the one running w2w-sweep


@dataclass
class EnergyConfig:
    backend: str = "auto"  # auto | nvml | none
    sample_interval_s: float = 0.1  # power/telemetry sampler period
    sampler: bool = True  # false: no timelines, utilization or integrated fallback
    instant_power: bool = True  # sample NVML's instant power field where the GPU offers it
    idle_seconds: float = 5.0  # idle baseline before the first cell; 0: none
    rapl: bool = True  # CPU energy from RAPL, read by local rank 0 of each node


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    gpu: GpuConfig = MISSING
    dataset: DatasetConfig = MISSING
    cluster: ClusterConfig = MISSING
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    shards: int = 1
    precision: str = "fp16"
    batch_size: int = 1
    max_gen_len: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    greedy: bool = False
    force_max_gen_len: bool = False  # ignore EOS: every response is exactly max_gen_len tokens
    seed: int = 1
    warmup: bool = True
    power_cap_w: float | None = None
    # Where users may not call NVML's setter: a site wrapper run as
    # power_cap_command.format(watts=..., gpu_index=..., gpu_uuid=...); None: NVML.
    power_cap_command: str | None = None
    sweep_dir: str = "runs/default"
    dist_timeout_s: int = 600
    skip_unfit: bool = False  # cells that do not fit the GPUs' memory: skipped (true) or an error
    save_responses: bool = False  # rank 0 writes the cell's prompts and responses beside its records
    # An experiment's grid: {key: "a,b"} or a list of such sub-grids, unioned; the command line wins.
    grid: Any = None


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="gpu", name="base_gpu", node=GpuConfig)
    cs.store(group="dataset", name="base_dataset", node=DatasetConfig)
    cs.store(group="cluster", name="base_cluster", node=ClusterConfig)


# The keys that decide which job (and model load) a cell belongs to.
PLACEMENT_KEYS = ("model", "gpu", "shards", "precision", "cluster")
# Result-neutral keys left out of the cell id, so moving a sweep does not redo its cells.
_ID_EXCLUDED = ("sweep_dir", "cluster", "dist_timeout_s", "skip_unfit", "grid", "power_cap_command")
# Options added after sweeps were run, per config section: at their defaults they leave the cell id as it was.
_ID_NEW_DEFAULTS = {
    "": {"save_responses": False},
    "dataset": {"prompt_template": "{prompt}", "fewshot_path": None, "fewshot_k": 0},
    "model": {"eos_token": None, "rope_scaling_factor": None, "rope_low_freq_factor": 1.0,
              "rope_high_freq_factor": 4.0, "rope_original_max_pos": 8192},
}


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _valid_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, DictConfig) and len(value):
            keys.extend(_valid_keys(value, name + "."))
        else:
            keys.append(name)
    return keys


def expand_overrides(overrides: list[str]) -> list[list[str]]:
    """Hydra multirun grammar (`a=1,2 b=x,y`) -> one override list per grid point."""
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except OverrideParseException as exc:
        raise ConfigError(f"cannot parse overrides {overrides}: {exc}") from exc
    axes = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            values = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            values = [f"{key}={override.get_value_element_as_str()}"]
        axes.append(values)
    return [list(point) for point in itertools.product(*axes)]


def _compose(overrides: list[str]) -> DictConfig:
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except MissingConfigException as exc:
        raise ConfigError(_missing_option_message(exc, overrides)) from exc
    except ConfigCompositionException as exc:
        raise ConfigError(_composition_message(exc)) from exc
    finally:
        GlobalHydra.instance().clear()


def compose_cell(overrides: list[str]) -> DictConfig:
    """Compose and validate one cell's config; errors name the option and the fix."""
    cfg = _compose(overrides)
    validate(cfg)
    return cfg


def _grid_value(value: Any) -> str:
    if isinstance(value, (list, ListConfig)):
        return ",".join(str(v) for v in value)
    return "null" if value is None else str(value)


def subgrids(overrides: list[str]) -> list[list[str]]:
    """The command line, or one override list per sub-grid of the selected experiment."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    grid = _compose(fixed).get("grid")
    if not grid:
        return [overrides]
    given = {o.get_key_element().lstrip("+~") for o in parsed}
    parts = grid if isinstance(grid, ListConfig) else [grid]
    return [[f"{k}={_grid_value(v)}" for k, v in part.items() if k not in given] + list(overrides)
            for part in parts]


def _missing_option_message(exc: MissingConfigException, overrides: list[str]) -> str:
    for group in ("model", "gpu", "dataset", "cluster", "experiment"):
        for ov in overrides:
            key = ov.lstrip("+~").split("=", 1)[0]
            if key == group:
                value = ov.split("=", 1)[1]
                if value not in group_options(group):
                    return (
                        f"unknown {group} '{value}': valid options for {group}= are "
                        f"{', '.join(group_options(group))}"
                    )
    return str(exc)


def _composition_message(exc: ConfigCompositionException) -> str:
    text = str(exc.__cause__ or exc)
    match = re.search(r"Could not override '([^']+)'", str(exc))
    if match and ("not in struct" in text or "Key '" in text):
        return f"unknown key '{match.group(1)}': valid keys are {', '.join(_valid_keys(_compose([])))}"
    return str(exc)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: DictConfig) -> None:
    """Checks that need no files or hardware: done on the login node before submitting."""
    m = cfg.model
    n_kv = m.n_kv_heads or m.n_heads
    _check(cfg.shards >= 1, f"shards={cfg.shards}: must be >= 1")
    _check(
        m.n_heads % cfg.shards == 0 and n_kv % cfg.shards == 0,
        f"shards={cfg.shards} does not divide model {m.name}'s {m.n_heads} heads / {n_kv} KV heads: "
        f"choose shards from {divisors(math.gcd(m.n_heads, n_kv))}",
    )
    _check(cfg.batch_size >= 1, f"batch_size={cfg.batch_size}: must be >= 1")
    _check(cfg.max_gen_len >= 1, f"max_gen_len={cfg.max_gen_len}: must be >= 1")
    _check(
        cfg.max_gen_len < m.max_seq_len,
        f"max_gen_len={cfg.max_gen_len} leaves no room for the prompt in "
        f"model.max_seq_len={m.max_seq_len}: lower max_gen_len or raise model.max_seq_len",
    )
    _check(cfg.precision in PRECISIONS, f"precision={cfg.precision}: valid are {', '.join(PRECISIONS)}")
    _check(
        cfg.precision != "bf16" or cfg.gpu.bf16,
        f"precision=bf16 but gpu={cfg.gpu.name} has no bf16 arithmetic: use precision=fp16",
    )
    _check(
        cfg.energy.backend in ENERGY_BACKENDS,
        f"energy.backend={cfg.energy.backend}: valid are {', '.join(ENERGY_BACKENDS)}",
    )
    _check(
        cfg.energy.sample_interval_s > 0,
        f"energy.sample_interval_s={cfg.energy.sample_interval_s}: must be > 0",
    )
    _check(
        cfg.dataset.max_prompt_tokens >= 1,
        f"dataset.max_prompt_tokens={cfg.dataset.max_prompt_tokens}: must be >= 1",
    )
    _check(
        cfg.energy.backend != "nvml" or cfg.gpu.device == "cuda",
        "energy.backend=nvml needs a GPU: set gpu= to a GPU profile or energy.backend=auto",
    )
    _check(
        0 <= cfg.energy.idle_seconds <= 600,
        f"energy.idle_seconds={cfg.energy.idle_seconds}: must be in [0, 600] (0 skips the idle baseline)",
    )
    _check(
        cfg.power_cap_w is None or cfg.power_cap_w > 0,
        f"power_cap_w={cfg.power_cap_w}: must be > 0 W, or null for the GPU's own limit",
    )
    if cfg.power_cap_command is not None:
        from w2w.energy.powercap import check_command

        problem = check_command(cfg.power_cap_command)
        _check(problem is None, f"power_cap_command={cfg.power_cap_command!r}: {problem}")
    from w2w.data import check_template

    check_template(cfg.dataset)
    _check(cfg.dataset.num_prompts >= 1, f"dataset.num_prompts={cfg.dataset.num_prompts}: must be >= 1")
    _check(0.0 < cfg.top_p <= 1.0, f"top_p={cfg.top_p}: must be in (0, 1]")
    _check(cfg.temperature > 0 or cfg.greedy, f"temperature={cfg.temperature}: must be > 0, or set greedy=true")
    _check(
        cfg.gpu.device in ("cuda", "cpu"), f"gpu.device={cfg.gpu.device}: valid are cuda, cpu"
    )
    _check(
        cfg.cluster.backend in ("local", "slurm"),
        f"cluster.backend={cfg.cluster.backend}: valid are local, slurm",
    )
    _check(
        cfg.power_cap_w is None or cfg.gpu.device == "cuda",
        f"power_cap_w={cfg.power_cap_w} needs a GPU: set gpu= to a GPU profile or drop power_cap_w",
    )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def cell_id(cfg: DictConfig) -> str:
    """Stable hash of the cell's resolved config (result-neutral keys excluded)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in _ID_EXCLUDED:
        data.pop(key, None)
    for section, defaults in _ID_NEW_DEFAULTS.items():
        table = data.get(section, {}) if section else data
        for key, default in defaults.items():
            if key in table and table[key] == default:
                del table[key]
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def placement_key(cfg: DictConfig) -> str:
    data = {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig)
            else cfg[k] for k in PLACEMENT_KEYS}
    data["sweep_dir"] = cfg.sweep_dir
    return json.dumps(data, sort_keys=True)


def compose_grid(overrides: list[str]) -> list[DictConfig]:
    """All cells of a grid (or of an experiment's sub-grids), in order, duplicates removed."""
    try:
        parts = subgrids(overrides)
    except OverrideParseException as exc:
        raise ConfigError(f"cannot parse overrides {overrides}: {exc}") from exc
    cells, seen = [], set()
    for part in parts:
        for point in expand_overrides(part):
            cfg = compose_cell(point)
            cid = cell_id(cfg)
            if cid not in seen:
                seen.add(cid)
                cells.append(cfg)
    return cells
