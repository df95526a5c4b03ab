"""Compose cells from Hydra overrides: the config groups, the grid, and the checks that need no files."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf

from w2w import data
from w2w.arrivals import trace_problem
from w2w.cell import (
    ARRIVALS,
    SCENARIOS,
    SERVING,
    Cell,
    ClusterConfig,
    DatasetConfig,
    GpuConfig,
    ModelConfig,
)
from w2w.engines import ENGINES
from w2w.engines import check_name as check_engine_name
from w2w.engines import prompt_room as engine_prompt_room
from w2w.engines import refusal as engine_refusal
from w2w.engines import scenario_refusal as engine_scenario_refusal
from w2w.errors import ConfigError, divisors

# Site cluster profiles and model presets: folders searched after the packaged configs (os.pathsep-separated).
CONFIG_DIR_ENV = "W2W_CONFIG_DIR"
PRECISIONS = ("fp32", "fp16", "bf16")
ENERGY_BACKENDS = ("auto", "nvml", "none")
# repeats=auto is a flag beside the count: repeats stays an int, the count of runs planned (repeats_max).
AUTO_REPEATS = {"repeats=auto": "repeats_auto=true", "+repeats=auto": "repeats_auto=true"}
# Bounds on the options that size work (issue 28.2): past them planning, w2w-status and w2w-reduce, which
# visit every run of every cell, take minutes, and the statistics gain nothing (an interval narrows as 1/sqrt(n)).
MAX_REPEATS = 100
MAX_NUM_PROMPTS = 100_000  # every rank holds a cell's prompts, and its progress file an entry per batch
MAX_RUNS = 10_000  # cells x repeats of one command


def _writable(schema: type) -> DictConfig:
    """The schema as Hydra composes into it: the frozen dataclass's fields, types and defaults, but
    writable (overrides are applied to it); OmegaConf.to_object turns the result back into `schema`."""
    node = OmegaConf.structured(schema)
    _clear_readonly(node)
    return node


def _clear_readonly(node: DictConfig) -> None:
    OmegaConf.set_readonly(node, None)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _clear_readonly(child)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=_writable(Cell))
    cs.store(group="model", name="base_model", node=_writable(ModelConfig))
    cs.store(group="gpu", name="base_gpu", node=_writable(GpuConfig))
    cs.store(group="dataset", name="base_dataset", node=_writable(DatasetConfig))
    cs.store(group="cluster", name="base_cluster", node=_writable(ClusterConfig))


def package_config_dir() -> Path:
    """The configs installed with w2w: conf/ at the top of the repository, w2w.conf once installed."""
    return Path(str(files("w2w.conf")))


def config_dirs(extra: Sequence[str | Path] = ()) -> list[Path]:
    """Where presets are looked up: the package's, then `extra` (--config-dir), then W2W_CONFIG_DIR."""
    given = [("--config-dir", str(d)) for d in extra]
    given += [(CONFIG_DIR_ENV, d) for d in os.environ.get(CONFIG_DIR_ENV, "").split(os.pathsep) if d]
    dirs = [package_config_dir()]
    for option, value in given:
        path = Path(value).expanduser().resolve()
        if path in dirs:  # the same folder named twice (--config-dir and W2W_CONFIG_DIR): searched once
            continue
        if not path.is_dir():
            raise ConfigError(
                f"{option}={value} is not a directory: point it at a folder of presets laid out like "
                "w2w's own (cluster/NAME.yaml, model/NAME.yaml, ...)"
            )
        _check_no_shadowing(option, path, dirs)
        dirs.append(path)
    return dirs


def _check_no_shadowing(option: str, path: Path, earlier: list[Path]) -> None:
    """Hydra takes a preset from the first folder holding it: a later one of the same name would be ignored."""
    for preset in sorted([*path.glob("*.yaml"), *path.glob("*/*.yaml")]):
        name = preset.relative_to(path)
        for other in earlier:
            if (other / name).is_file():
                raise ConfigError(
                    f"{option}={path}: {name} has the name of {other / name}, which is searched first and "
                    f"would be used instead: give {name} another name"
                )


def split_config_dirs(argv: list[str]) -> tuple[list[str], list[str]]:
    """(--config-dir values, the other arguments), for commands that take Hydra overrides directly."""
    dirs, rest, args = [], [], iter(argv)
    for arg in args:
        if arg == "--config-dir":
            value = next(args, None)
            if value is None:
                raise ConfigError("--config-dir needs a directory: --config-dir DIR")
            dirs.append(value)
        elif arg.startswith("--config-dir="):
            dirs.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return dirs, rest


def group_options(group: str, dirs: Sequence[Path] | None = None) -> list[str]:
    return sorted({p.stem for d in (dirs or config_dirs()) for p in (d / group).glob("*.yaml")})


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
        _check_sweep_kind(override)
        if override.is_sweep_override():
            values = [f"{key}={v}" for v in override.sweep_string_iterator()]
            if not values:
                raise ConfigError(f"{override.input_line}: the sweep has no values (a range(start,stop,step) "
                                  f"whose stop is not past its start, in the step's direction, is empty): give "
                                  f"values, e.g. {key}=range(1,5) or {key}=1,2,4")
        else:
            values = [f"{key}={override.get_value_element_as_str()}"]
        axes.append(values)
    points = math.prod(len(values) for values in axes)
    if points > MAX_RUNS:
        raise ConfigError(f"{' '.join(overrides)}: a grid of {points:,} cells; at most {MAX_RUNS:,} per command "
                          "(w2w-status and w2w-reduce visit each): split it into several commands on one sweep_dir")
    return [list(point) for point in itertools.product(*axes)]


def _check_sweep_kind(override: Override) -> None:
    """w2w expands comma lists and range(); glob() and interval() have no list of values to run."""
    kind = override.value_type
    if kind == ValueType.GLOB_CHOICE_SWEEP:
        raise ConfigError(f"{override.input_line}: glob(...) sweeps are not supported by w2w: list the options, "
                          f"e.g. {override.get_key_element()}=a,b (valid: "
                          f"{', '.join(group_options(override.get_key_element())) or 'see conf/'})")
    if kind == ValueType.INTERVAL_SWEEP:
        raise ConfigError(f"{override.input_line}: interval(...) sweeps are not supported by w2w (it is a range "
                          f"for optimizers, not a list of cells): list the values, e.g. "
                          f"{override.get_key_element()}=0.5,0.8, or use range(start,stop,step)")


def _grid_value(value: Any) -> str:
    if isinstance(value, (list, ListConfig)):
        return ",".join(str(v) for v in value)
    return "null" if value is None else str(value)


def _search_entry(path: Path) -> str:
    """A quoted `file://` entry of hydra.searchpath (a path may hold commas or spaces)."""
    return "'file://" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _yaml_message(exc: yaml.YAMLError) -> str:
    """One line naming the preset file, the line and column, and PyYAML's reason."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{mark.name} line {mark.line + 1} column {mark.column + 1}" if mark is not None else "a preset file"
    reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{where}: not valid YAML ({reason}): fix that line (presets are YAML mappings, e.g. name: mysite)"


class Composer:
    """Hydra composition of many cells.

    Hydra composes the defaults list (config-group choices: model=, gpu=, +experiment=, ...) and
    then applies the plain `key=value` overrides to the result. The first step costs ~70 ms and
    depends on the group choices alone, so it runs once per distinct set of choices; each cell
    copies that base and applies its own values with Hydra's own override code.
    """

    def __init__(self, config_dir: Sequence[str | Path] = ()):
        self.dirs = config_dirs(config_dir)
        self.groups = {p.name for d in self.dirs for p in d.iterdir() if p.is_dir() and not p.name.startswith("_")}
        self._parser = OverridesParser.create()
        self._bases: dict[tuple[tuple[str, ...], bool], DictConfig] = {}
        self._checkpoints: dict[str, dict[str, Any]] = {}
        self._parsed: dict[str, Override] = {}
        self._hashes: dict[str, str] = {}  # each prompt file is read once, however many cells use it

    def _hydra(self, overrides: list[str]) -> DictConfig:
        register_configs()
        search = [f"hydra.searchpath=[{','.join(_search_entry(d) for d in self.dirs[1:])}]"]
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(self.dirs[0]), version_base="1.3"):
                return compose(config_name="config", overrides=overrides + (search if len(self.dirs) > 1 else []))
        except MissingConfigException as exc:
            raise ConfigError(self._missing_option_message(exc, overrides)) from exc
        except ConfigCompositionException as exc:
            raise ConfigError(self._composition_message(exc)) from exc
        except yaml.YAMLError as exc:  # a preset (often a site's own, --config-dir) that is not YAML
            raise ConfigError(_yaml_message(exc)) from None
        finally:
            GlobalHydra.instance().clear()

    def _is_choice(self, override: Override) -> bool:
        key = override.key_or_group
        return override.package is not None or key.split("/")[0] in self.groups or key.startswith("hydra")

    def base(self, choices: tuple[str, ...], grid: bool = True) -> DictConfig:
        """Hydra's config for these group choices; grid=False: without the experiment's grid."""
        if (choices, grid) not in self._bases:
            if grid:
                self._bases[choices, grid] = self._hydra(list(choices))
            else:
                # A cell is one point of the grid: the grid itself would only be copied and resolved again.
                cfg = copy.deepcopy(self.base(choices))
                cfg.grid = None
                self._bases[choices, grid] = cfg
        return self._bases[choices, grid]

    def _parse(self, overrides: list[str]) -> list[Override]:
        """Parsed once per distinct string: the cells of a grid repeat most of their overrides."""
        try:
            for text in overrides:
                if text not in self._parsed:
                    (self._parsed[text],) = self._parser.parse_overrides([AUTO_REPEATS.get(text, text)])
        except OverrideParseException as exc:
            raise ConfigError(f"cannot parse overrides {overrides}: {exc}") from exc
        return [self._parsed[text] for text in overrides]

    def compose(self, overrides: list[str], grid: bool = True) -> DictConfig:
        """What Hydra's compose returns for `overrides`, unvalidated; grid=False: grid set to null."""
        return self._compose(self._parse(overrides), grid)

    def _compose(self, parsed: list[Override], grid: bool) -> DictConfig:
        cfg = copy.deepcopy(self.base(tuple(o.input_line for o in parsed if self._is_choice(o)), grid))
        try:
            ConfigLoaderImpl._apply_overrides_to_config([o for o in parsed if not self._is_choice(o)], cfg)
        except ConfigCompositionException as exc:
            raise ConfigError(self._composition_message(exc)) from exc
        return cfg

    def cell(self, overrides: list[str]) -> Cell:
        """Compose and validate one cell; errors name the option and the fix."""
        parsed = self._parse(overrides)
        cfg = self._compose(parsed, grid=False)
        given = {o.key_or_group.split(".")[1] for o in parsed if o.key_or_group.startswith("model.")}
        self._fill_from_checkpoint(cfg.model, given)
        self._stamp_content_hash(cfg.dataset)
        cell = OmegaConf.to_object(cfg)
        if cell.repeats_auto:  # the job plans up to repeats_max runs; stopping.decide ends them sooner
            cell = dataclasses.replace(cell, repeats=cell.repeats_max)
        validate(cell)
        return cell

    def _stamp_content_hash(self, dataset: DictConfig) -> None:
        """Put the local prompt file's and the few-shot file's content hashes into the cell (hence into its id)."""
        local = data.check_local_path(dataset) if dataset.name != "synthetic" else None
        dataset.content_sha256 = None if local is None else self._file_hash(local)
        fewshot = data.fewshot_file(dataset) if dataset.fewshot_k else None
        dataset.fewshot_sha256 = None if fewshot is None else self._file_hash(fewshot)

    def _file_hash(self, path: Path) -> str:
        key = str(path.resolve())
        if key not in self._hashes:
            self._hashes[key] = data.file_sha256(path)
        return self._hashes[key]

    def _fill_from_checkpoint(self, model: DictConfig, given: set[str]) -> None:
        """model=checkpoint (a model config without dim): the architecture comes from the checkpoint's
        params.json / config.json, except the fields in `given` (set by an override)."""
        if not OmegaConf.is_missing(model, "dim"):
            return
        if OmegaConf.is_missing(model, "checkpoint_dir") or not model.checkpoint_dir:
            raise ConfigError(
                "model.checkpoint_dir is not set, and the model's architecture must be read from a checkpoint: "
                "pass model.checkpoint_dir=DIR (Meta's params.json or Hugging Face's config.json)"
            )
        directory = str(model.checkpoint_dir)
        if directory not in self._checkpoints:
            from w2w.checkpoint import architecture  # torch: only when a checkpoint must be read

            self._checkpoints[directory] = architecture(Path(directory))
        for key, value in self._checkpoints[directory].items():
            if key not in given:
                model[key] = value

    def subgrids(self, overrides: list[str]) -> list[list[str]]:
        """The command line, or one override list per sub-grid of the selected experiment."""
        parsed = self._parse(overrides)
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        grid = self.compose(fixed).get("grid")
        if not grid:
            return [overrides]
        given = {o.get_key_element().lstrip("+~") for o in parsed}
        parts = grid if isinstance(grid, ListConfig) else [grid]
        return [[f"{k}={_grid_value(v)}" for k, v in part.items() if k not in given] + list(overrides)
                for part in parts]

    def grid(self, overrides: list[str]) -> list[Cell]:
        """All cells of a grid (or of an experiment's sub-grids), in order, duplicates removed."""
        cells: dict[str, Cell] = {}
        for part in self.subgrids(overrides):
            for point in expand_overrides(part):
                cell = self.cell(point)
                kept = cells.setdefault(cell.id, cell)
                # repeats is not in the id: two values would make one cell with two counts of runs.
                _check(kept.repeats == cell.repeats, f"repeats={kept.repeats},{cell.repeats}: repeats is the "
                       "number of runs of every cell, not a grid axis: give one value")
        runs = sum(c.repeats for c in cells.values())
        _check(runs <= MAX_RUNS, f"{len(cells):,} cells x repeats = {runs:,} runs; at most {MAX_RUNS:,} per command "
               "(w2w-status and w2w-reduce visit each): lower repeats or split the grid into several commands")
        return list(cells.values())

    def _missing_option_message(self, exc: MissingConfigException, overrides: list[str]) -> str:
        for group in sorted(self.groups):
            for ov in overrides:
                key = ov.lstrip("+~").split("=", 1)[0]
                if key == group:
                    value = ov.split("=", 1)[1]
                    options = group_options(group, self.dirs)
                    if value not in options:
                        return f"unknown {group} '{value}': valid options for {group}= are {', '.join(options)}"
        return str(exc)

    def _composition_message(self, exc: ConfigCompositionException) -> str:
        text = str(exc.__cause__ or exc)
        match = re.search(r"Could not override '([^']+)'", str(exc))
        if match and ("not in struct" in text or "Key '" in text):
            return f"unknown key '{match.group(1)}': valid keys are {', '.join(_valid_keys(self.base(())))}"
        merging = re.search(r"Error merging override (\S+)", str(exc))
        if merging and exc.__cause__ is not None:
            # OmegaConf's reason, without its multi-line "full_key/object_type" trailer.
            reason = str(exc.__cause__).strip().splitlines()[0]
            return f"{merging.group(1)}: {reason}"
        return str(exc)


def compose_cell(overrides: list[str], config_dir: Sequence[str | Path] = ()) -> Cell:
    """Compose and validate one cell's config; errors name the option and the fix."""
    return Composer(config_dir).cell(overrides)


def subgrids(overrides: list[str], config_dir: Sequence[str | Path] = ()) -> list[list[str]]:
    """The command line, or one override list per sub-grid of the selected experiment."""
    return Composer(config_dir).subgrids(overrides)


# Sample values a power_cap_command template is tried with (w2w.energy.powercap fills the real ones).
COMMAND_FIELDS = {"watts": 250, "gpu_index": 0, "gpu_uuid": "GPU-0"}


def check_command(template: str) -> str | None:
    """Why a power_cap_command template is unusable, or None: it must take {watts} and only known fields."""
    try:
        template.format(**COMMAND_FIELDS)
    except (KeyError, IndexError, ValueError) as exc:
        return f"unknown or malformed placeholder ({exc}); known: {{watts}}, {{gpu_index}}, {{gpu_uuid}}"
    if "{watts}" not in template:
        return "it must contain {watts}, the limit to set in W"
    return None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# A check reads one section of a cell and returns its first problem, naming the option and the fix, or
# None; validate() runs them in order (a later check may rely on an earlier one: shards >= 1 before a
# division by shards).
Check = Callable[[Cell], str | None]


def _first(rules: Iterable[tuple[bool, str]]) -> str | None:
    """The message of the first rule whose condition is false."""
    return next((message for ok, message in rules if not ok), None)


def shards_split_heads(cfg: Cell) -> str | None:
    m = cfg.model
    return _first([
        (cfg.shards >= 1, f"shards={cfg.shards}: must be >= 1"),
        (m.n_heads >= 1, f"model.n_heads={m.n_heads}: must be >= 1"),
    ]) or _first([(
        m.n_heads % cfg.shards == 0 and m.kv_heads % cfg.shards == 0,
        f"shards={cfg.shards} does not divide model {m.name}'s {m.n_heads} heads / {m.kv_heads} KV heads: "
        f"choose shards from {divisors(math.gcd(m.n_heads, m.kv_heads))}",
    )])


def model_shapes(cfg: Cell) -> str | None:
    """The model's shapes as the node will build them: each rule here was a reshape or FairScale error there."""
    m = cfg.model
    positive = _first([(getattr(m, key) >= 1, f"model.{key}={getattr(m, key)}: must be >= 1")
                       for key in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len")])
    if positive:
        return positive
    if m.n_kv_heads is not None and m.n_kv_heads < 1:
        return f"model.n_kv_heads={m.n_kv_heads}: must be >= 1, or null"
    if m.dim % m.n_heads:
        return (f"model.n_heads={m.n_heads} does not divide model.dim={m.dim}: each head takes dim / n_heads "
                f"values; choose n_heads from {divisors(m.dim)}")
    return _first([
        (m.head_dim % 2 == 0, f"model.dim={m.dim} / model.n_heads={m.n_heads} = {m.head_dim} values per head, "
         "which rotary embeddings need even: change model.dim or model.n_heads"),
        (m.n_heads % m.kv_heads == 0, f"model.n_kv_heads={m.kv_heads} does not divide model.n_heads={m.n_heads}: "
         f"each KV head serves a group of query heads; choose n_kv_heads from {divisors(m.n_heads)}"),
        *((size % cfg.shards == 0,
           f"shards={cfg.shards} does not divide {name}={size}, which FairScale splits over the shards: "
           f"choose shards from {[d for d in divisors(math.gcd(m.n_heads, m.kv_heads)) if size % d == 0]}")
          for name, size in (("model.dim", m.dim), ("model.vocab_size", m.vocab_size),
                             ("the feed-forward width (from model.dim, multiple_of, ffn_dim_multiplier)",
                              m.ffn_hidden))),
    ])


def lengths(cfg: Cell) -> str | None:
    m = cfg.model
    # LLaMA-1's rule (EngineSpec.runs_to_max_seq_len): max_gen_len may pass max_seq_len, the run stops there.
    room = (engine_prompt_room(cfg.engine, m.max_seq_len, cfg.max_gen_len) if cfg.engine in ENGINES
            else m.max_seq_len - cfg.max_gen_len)
    return _first([
        (cfg.batch_size >= 1, f"batch_size={cfg.batch_size}: must be >= 1"),
        (cfg.max_gen_len >= 1, f"max_gen_len={cfg.max_gen_len}: must be >= 1"),
        (room >= 1, f"max_gen_len={cfg.max_gen_len} leaves no room for the prompt in "
         f"model.max_seq_len={m.max_seq_len}: lower max_gen_len or raise model.max_seq_len"),
        (cfg.eos_check_every >= 1, f"eos_check_every={cfg.eos_check_every}: must be >= 1"),
    ])


def engine_runs_model(cfg: Cell) -> str | None:
    """The engine's name, and the model shapes its spec supports (w2w.engines.SPECS)."""
    try:
        check_engine_name(cfg.engine)  # the registry's own message: the valid names, a renamed one's new name
    except ValueError as exc:
        return str(exc)
    m = cfg.model
    problem = engine_refusal(cfg.engine, m.n_heads, m.kv_heads, m.rope_scaling_factor)
    return f"model {m.name}: {problem}" if problem else None


def precision(cfg: Cell) -> str | None:
    return _first([
        (cfg.precision in PRECISIONS, f"precision={cfg.precision}: valid are {', '.join(PRECISIONS)}"),
        (cfg.precision != "bf16" or cfg.gpu.bf16,
         f"precision=bf16 but gpu={cfg.gpu.name} has no bf16 arithmetic: use precision=fp16"),
    ])


def energy(cfg: Cell) -> str | None:
    e = cfg.energy
    return _first([
        (e.backend in ENERGY_BACKENDS, f"energy.backend={e.backend}: valid are {', '.join(ENERGY_BACKENDS)}"),
        (e.sample_interval_s > 0, f"energy.sample_interval_s={e.sample_interval_s}: must be > 0"),
        (e.backend != "nvml" or cfg.gpu.device == "cuda",
         "energy.backend=nvml needs a GPU: set gpu= to a GPU profile or energy.backend=auto"),
        (0 <= e.idle_seconds <= 600,
         f"energy.idle_seconds={e.idle_seconds}: must be in [0, 600] (0 skips the idle baseline)"),
        (e.min_window_periods >= 0,
         f"energy.min_window_periods={e.min_window_periods}: must be >= 0 (0 flags no window)"),
        (0 <= e.settle_s <= 3600, f"energy.settle_s={e.settle_s}: must be in [0, 3600] (0: no wait before a cell)"),
        (0 <= e.active_s <= 600, f"energy.active_s={e.active_s}: must be in [0, 600] (0: no static/dynamic split)"),
        (cfg.cluster.pue is None or 1 <= cfg.cluster.pue < math.inf, f"cluster.pue={cfg.cluster.pue}: must be finite and >= 1 "
         "(facility energy / IT energy), or null for no facility estimate"),
    ])


def power_cap(cfg: Cell) -> str | None:
    problem = None if cfg.power_cap_command is None else check_command(cfg.power_cap_command)
    return _first([
        (cfg.power_cap_w is None or cfg.power_cap_w > 0,
         f"power_cap_w={cfg.power_cap_w}: must be > 0 W, or null for the GPU's own limit"),
        (problem is None, f"power_cap_command={cfg.power_cap_command!r}: {problem}"),
    ])


def gpu_clock(cfg: Cell) -> str | None:
    mhz = cfg.gpu_clock_mhz
    return _first([
        (mhz is None or (isinstance(mhz, int) and mhz > 0),
         f"gpu_clock_mhz={mhz}: must be a whole number of MHz > 0, or null for the GPU's own clocks"),
        (mhz is None or cfg.gpu.device == "cuda",
         f"gpu_clock_mhz={mhz} needs a GPU: set gpu= to a GPU profile or drop gpu_clock_mhz"),
    ])


def dataset(cfg: Cell) -> str | None:
    """The prompt template (data.check_template raises its own ConfigError), the row counts and cut."""
    data.check_template(cfg.dataset)
    d = cfg.dataset
    return _first([
        (d.max_prompt_tokens is None or d.max_prompt_tokens >= 1,
         f"dataset.max_prompt_tokens={d.max_prompt_tokens}: must be >= 1, or null to keep prompts whole"),
        (d.num_prompts >= 1, f"dataset.num_prompts={d.num_prompts}: must be >= 1"),
        (d.num_prompts <= MAX_NUM_PROMPTS, f"dataset.num_prompts={d.num_prompts}: at most {MAX_NUM_PROMPTS:,} "
         "(every rank holds a cell's prompts and an entry per batch): lower dataset.num_prompts"),
    ])


def sampling(cfg: Cell) -> str | None:
    return _first([
        (0.0 < cfg.top_p <= 1.0, f"top_p={cfg.top_p}: must be in (0, 1]"),
        (cfg.temperature > 0 or cfg.greedy, f"temperature={cfg.temperature}: must be > 0, or set greedy=true"),
    ])


def hardware(cfg: Cell) -> str | None:
    return _first([
        (cfg.gpu.device in ("cuda", "cpu"), f"gpu.device={cfg.gpu.device}: valid are cuda, cpu"),
        (cfg.cluster.backend in ("local", "slurm"), f"cluster.backend={cfg.cluster.backend}: valid are local, slurm"),
        (cfg.power_cap_w is None or cfg.gpu.device == "cuda",
         f"power_cap_w={cfg.power_cap_w} needs a GPU: set gpu= to a GPU profile or drop power_cap_w"),
    ])


def repeats(cfg: Cell) -> str | None:
    return _first([
        (cfg.repeats >= 1, f"repeats={cfg.repeats}: must be >= 1 (runs per cell; 1: each cell once)"),
        (cfg.repeats <= MAX_REPEATS, f"repeats={cfg.repeats}: at most {MAX_REPEATS} runs per cell (an interval "
         "narrows as 1/sqrt(runs), while w2w-status and w2w-reduce read every run): lower repeats"),
        (cfg.repeat == 0, f"repeat={cfg.repeat}: set by w2w for each run, not an option: use repeats=N"),
    ])


def repeats_auto(cfg: Cell) -> str | None:
    """repeats=auto's options; checked whether or not it is on, so a bad value never waits to bite."""
    return _first([
        (cfg.repeats_target_pct > 0, f"repeats_target_pct={cfg.repeats_target_pct}: must be > 0 (the 95% "
         "interval's half-width in % of its center that stops repeats=auto)"),
        (cfg.repeats_min >= 3, f"repeats_min={cfg.repeats_min}: must be >= 3 (normality cannot be checked below)"),
        (cfg.repeats_max >= cfg.repeats_min, f"repeats_max={cfg.repeats_max}: must be >= repeats_min="
         f"{cfg.repeats_min}"),
        (cfg.repeats_max <= MAX_REPEATS, f"repeats_max={cfg.repeats_max}: at most {MAX_REPEATS} runs per cell "
         "(as repeats): lower repeats_max"),
    ])


def serving(cfg: Cell) -> str | None:
    """scenario=serving (issue 24): an engine that serves it, and the serving section's values."""
    if cfg.scenario not in SCENARIOS:
        return f"scenario={cfg.scenario}: valid are {', '.join(SCENARIOS)}"
    if cfg.scenario != SERVING:
        return None
    s = cfg.serving
    slo = [(v is None or v > 0, f"serving.{k}={v}: must be > 0 ms, or null for no target")
           for k, v in (("ttft_slo_ms", s.ttft_slo_ms), ("itl_slo_ms", s.itl_slo_ms))]
    problem = engine_scenario_refusal(cfg.engine, SERVING) or _first([
        (s.rate > 0, f"serving.rate={s.rate}: must be > 0 requests/s, or inf (every request at t = 0)"),
        (s.arrival in ARRIVALS, f"serving.arrival={s.arrival}: valid are {', '.join(ARRIVALS)}"),
        (s.cv > 0, f"serving.cv={s.cv}: must be > 0 (1: Poisson; > 1: burstier)"),
        (s.max_slots >= 1, f"serving.max_slots={s.max_slots}: must be >= 1 (the continuous batch's width)"),
        (s.num_requests is None or s.num_requests >= 1,
         f"serving.num_requests={s.num_requests}: must be >= 1, or null for one per dataset prompt"),
        (s.duration_s is None or s.duration_s > 0, f"serving.duration_s={s.duration_s}: must be > 0 s, or null"),
        (s.warmup_requests >= 0, f"serving.warmup_requests={s.warmup_requests}: must be >= 0"),
        (s.arrival != "trace" or s.trace_path is not None,
         "serving.arrival=trace needs serving.trace_path: a file of lines 'offset_s,row'"),
        *slo,
    ])
    if problem is None and s.arrival == "trace":
        problem = trace_problem(s.trace_path, cfg.dataset.num_prompts)
    return problem


CHECKS: tuple[Check, ...] = (shards_split_heads, model_shapes, lengths, engine_runs_model, precision, energy,
                             power_cap, gpu_clock, dataset, sampling, hardware, repeats, repeats_auto, serving)


def validate(cfg: Cell) -> None:
    """Checks that need no files or hardware, done on the login node before submitting: ConfigError
    with the first problem of the first check (CHECKS) that finds one."""
    for check in CHECKS:
        problem = check(cfg)
        if problem:
            raise ConfigError(problem)


def one_placement(cells: list[Cell]) -> None:
    """w2w-run loads one model on one set of ranks: ConfigError where the grid spans placements."""
    if len({c.placement for c in cells}) != 1:
        raise ConfigError(
            "w2w-run takes cells of one placement (model, gpu, shards, precision, cluster, sweep_dir); "
            "use w2w-sweep for grids over those"
        )


def compose_grid(overrides: list[str], config_dir: Sequence[str | Path] = ()) -> list[Cell]:
    """All cells of a grid (or of an experiment's sub-grids), in order, duplicates removed."""
    return Composer(config_dir).grid(overrides)
