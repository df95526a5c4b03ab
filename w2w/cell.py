"""The typed cell: one frozen dataclass per config section, the schema Hydra composes into."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from w2w.shapes import ModelArgs

# Frozen: a cell is built once, when composed (w2w.config), and then only read. Hydra composes
# into writable copies of these classes; OmegaConf.to_object turns the result into these instances.


@dataclass(frozen=True)
class ModelConfig(ModelArgs):
    """A model preset: its shapes (ModelArgs) and what a run needs beside them."""

    name: str = MISSING
    checkpoint_dir: str | None = None  # None: random weights drawn from init_seed
    # None: tokenizer.model or tokenizer.json in checkpoint_dir (or one level up), or the bundled tiny one
    tokenizer_path: str | None = None
    eos_token: str | None = None  # None: the family's (</s>, <|end_of_text|>); instruct Llama 3: <|eot_id|>
    init_seed: int = 0


@dataclass(frozen=True)
class GpuConfig:
    name: str = MISSING
    device: str = "cuda"  # torch device type: cuda or cpu
    memory_gib: float = 0.0  # per GPU, for the fit check; 0 = unknown, no check
    bf16: bool = True  # native bf16 arithmetic (Ampere and newer)
    tdp_w: float | None = None
    hbm_gbs: float | None = None  # rated memory bandwidth (GB/s): make bench-gpu's decode roof
    peak_tflops: float | None = None  # rated dense fp16/bf16 tensor TFLOP/s: the roof's ridge (analysis/roof.py)


@dataclass(frozen=True)
class DatasetConfig:
    name: str = MISSING
    path: str | None = None  # hub name or local .json/.jsonl; None for synthetic
    split: str = "train"
    num_prompts: int = 4096
    seed: int = 0
    # None: prompts are kept whole (one that cannot fit model.max_seq_len - max_gen_len fails at --plan).
    # N: a longer prompt keeps BOS and its last N-1 tokens (the record counts the prompts cut).
    max_prompt_tokens: int | None = None
    # Each prompt as the model sees it: "{prompt}" is the dataset's prompt (zero-shot, as the paper).
    prompt_template: str = "{prompt}"
    fewshot_path: str | None = None  # GSM8K rows (question, answer) whose first fewshot_k prefix each prompt
    fewshot_k: int = 0
    # Set by w2w, not an option: sha256 of the local prompt file, so that editing it changes the cell id.
    content_sha256: str | None = None
    # Set by w2w, not an option: sha256 of dataset.fewshot_path where fewshot_k > 0 (the shots are in every prompt).
    fewshot_sha256: str | None = None
    # Set by w2w-sweep, not an option: the sweep's file of this cell's prompts as the job runs them
    # (w2w.data.snapshot_dataset), which the job reads instead of the file or the hub; None: read the source.
    snapshot: str | None = None


@dataclass(frozen=True)
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
    gres_gpu: bool = True  # the scheduler hands out GPUs (gres/gpu); false: CPU-only nodes, gpu=cpu only
    timeout_min: int = 60
    cpus_per_task: int = 1
    mem_gb: float | None = None
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    array_parallelism: int = 64
    python: str | None = None  # interpreter on the nodes; None: the one running w2w-sweep
    # The facility's power usage effectiveness: the node figure x pue is the facility estimate; None: no estimate.
    pue: float | None = None


@dataclass(frozen=True)
class EnergyConfig:
    backend: str = "auto"  # auto | nvml | none
    sample_interval_s: float = 0.1  # power/telemetry sampler period
    sampler: bool = True  # false: no timelines, utilization or integrated fallback
    instant_power: bool = True  # sample NVML's instant power field where the GPU offers it
    idle_seconds: float = 5.0  # idle baseline before the first cell; 0: none
    rapl: bool = True  # CPU energy from RAPL, read by local rank 0 of each node
    # A batch window shorter than this many update periods of its energy source is flagged on its cell.
    min_window_periods: float = 10.0
    settle_s: float = 0.0  # before each cell, wait up to this long for the GPU's temperature to hold still
    # After each cell's warm-up: this long with the model loaded and no work, the GPU's active-state
    # power (static energy = that power x the cell's time; issue 27). 0: no split.
    active_s: float = 0.5


# scenario=serving (w2w/serving_cell.py): a server under load inside one cell.
OFFLINE, SERVING = "offline", "serving"
SCENARIOS = (OFFLINE, SERVING)
ARRIVALS = ("poisson", "gamma", "trace")


@dataclass(frozen=True)
class ServingConfig:
    """scenario=serving: requests arriving at `rate` into a continuous batch of `max_slots` rows."""

    rate: float = float("inf")  # requests per second; inf: every request arrives at t = 0 (the throughput limit)
    arrival: str = "poisson"  # poisson | gamma (burstiness cv) | trace (trace_path)
    cv: float = 1.0  # gamma: coefficient of variation of the gaps (1: Poisson; > 1: bursts)
    # trace: a file of lines "offset_s,row" (JSON lines {"offset_s":..,"row":..} too), sorted by offset;
    # row indexes the dataset's prompts. Replaces rate and num_requests.
    trace_path: str | None = None
    max_slots: int = 8  # the continuous batch's width (in place of batch_size)
    num_requests: int | None = None  # None: one request per dataset prompt (dataset.num_prompts)
    duration_s: float | None = None  # None: serve every request; N: only those arriving in the first N s
    warmup_requests: int = 0  # the first N requests are served and metered but left out of the latency figures
    ttft_slo_ms: float | None = None  # time-to-first-token target; None: none
    itl_slo_ms: float | None = None  # inter-token-latency target (per request, its p90 ITL); None: none


@dataclass(frozen=True)
class Cell:
    """One cell of a grid: every setting of one measurement (the root of the config schema)."""

    model: ModelConfig = MISSING
    gpu: GpuConfig = MISSING
    dataset: DatasetConfig = MISSING
    cluster: ClusterConfig = MISSING
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    scenario: str = OFFLINE  # offline (batches run to their end, the paper's) | serving (ServingConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    shards: int = 1
    precision: str = "fp16"
    batch_size: int = 1
    max_gen_len: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    greedy: bool = False
    force_max_gen_len: bool = False  # ignore EOS: every response is exactly max_gen_len tokens
    seed: int = 1
    engine: str = "fast"  # a name of w2w.engines.ENGINES
    eos_check_every: int = 8  # fast engine: decode steps between checks that every row has ended
    warmup: bool = True
    power_cap_w: float | None = None
    # Where users may not call NVML's setter: a site wrapper run as
    # power_cap_command.format(watts=..., gpu_index=..., gpu_uuid=...); None: NVML.
    power_cap_command: str | None = None
    # SM clock locked through NVML for the cell (MHz; min = max), restored after; None: the GPU's own (issue 27).
    gpu_clock_mhz: int | None = None
    sweep_dir: str = "runs/default"
    dist_timeout_s: int = 600
    skip_unfit: bool = False  # cells that do not fit the GPUs' memory: skipped (true) or an error
    save_responses: bool = False  # rank 0 writes the cell's prompts and responses beside its records
    # Runs of the cell, interleaved over the job's cells in cycles (w2w/order.py); the reducer reports
    # mean, standard deviation, n and a 95% interval. Not part of the cell id: raising it adds runs.
    repeats: int = 1
    # repeats=auto (config turns it into repeats_auto=true, repeats=repeats_max): a cell runs at least
    # repeats_min and at most repeats_max times, and stops once the 95% interval of its J per token is
    # within ±repeats_target_pct of its center (w2w/stopping.py). Not part of the cell id either.
    repeats_auto: bool = False
    repeats_target_pct: float = 2.0
    repeats_min: int = 3
    repeats_max: int = 10
    # Which run this is (0 .. repeats-1): set by the runner, never an option. Run 0 writes to
    # cells/<id>/ as before repeats existed; run K >= 1 to cells/<id>/repeat-K/ (records.run_dir).
    repeat: int = 0
    # An experiment's grid: {key: "a,b"} or a list of such sub-grids, unioned; the command line wins.
    # Always None in a composed cell (a cell is one point of the grid).
    grid: Any = None

    def to_dict(self) -> dict[str, Any]:
        """Every setting as plain JSON data (the record's `config`)."""
        return dataclasses.asdict(self)

    def params(self) -> dict[str, Any]:
        """The settings every table may show, flat, by column (AXES): the record's `params` (all of them
        are in `config`)."""
        return {axis.column: axis.of(self) for axis in AXES}

    @functools.cached_property
    def id(self) -> str:
        """Stable hash of the cell's settings, result-neutral keys excluded: its folder's name."""
        data = {k: v for k, v in self.to_dict().items() if k not in ID_EXCLUDED}
        for section, keys in ID_EXCLUDED_IN.items():
            for key in keys:
                data[section].pop(key, None)
        for section, defaults in ID_NEW_DEFAULTS.items():
            table = data.get(section, {}) if section else data
            for key, default in defaults.items():
                if key in table and table[key] == default:
                    del table[key]
        for section in ID_NEW_SECTIONS:  # all at its defaults: left out, as before it existed
            if data.get(section) == {}:
                del data[section]
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def placement(self) -> str:
        """The keys that decide which job (and model load) the cell belongs to, as JSON."""
        data = {k: _plain(getattr(self, k)) for k in PLACEMENT_KEYS} | {"sweep_dir": self.sweep_dir}
        return json.dumps(data, sort_keys=True)


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


@dataclass(frozen=True)
class Axis:
    """A setting of a cell that the tables name: its column, its dotted config key, where it shows."""

    column: str  # its name in a record's params and in every table
    key: str  # its dotted config key: the path of attributes on a Cell
    shown: bool = False  # a column of every cells table, and an axis of Pareto, repeats and the report
    table: bool = False  # in the printed cells table (cells.md) even where every cell has the same value
    sort: bool = False  # the cells table's rows are sorted by it, in this order
    short: str = ""  # its prefix in a Pareto point's label (b=8); "": the value alone

    def of(self, cell: Cell) -> Any:
        return functools.reduce(getattr, self.key.split("."), cell)

    @property
    def placement(self) -> bool:
        """Whether it decides the job (PLACEMENT_KEYS): shown on the job's line, not each cell's."""
        return self.key.split(".", 1)[0] in PLACEMENT_KEYS


# The cell axes, in the order of a record's params and of every table's columns. Every list of axes
# (launch.axes.CELL_AXES, the reducer's columns, Pareto, repeats, the report) is derived from this one.
AXES = (
    Axis("model", "model.name", shown=True, table=True, sort=True),
    Axis("gpu", "gpu.name", shown=True, table=True, sort=True),
    Axis("dataset", "dataset.name", shown=True, table=True, sort=True),
    Axis("shards", "shards", shown=True, table=True, sort=True, short="s"),
    Axis("precision", "precision", shown=True),
    Axis("engine", "engine", shown=True, table=True),
    Axis("eos_check_every", "eos_check_every"),
    Axis("batch_size", "batch_size", shown=True, table=True, sort=True, short="b"),
    Axis("max_gen_len", "max_gen_len", shown=True, table=True, sort=True, short="len"),
    Axis("num_prompts", "dataset.num_prompts"),
    Axis("power_cap_w", "power_cap_w", shown=True, short="cap"),
    Axis("gpu_clock_mhz", "gpu_clock_mhz", short="clk"),
    Axis("temperature", "temperature"),
    Axis("top_p", "top_p"),
    Axis("greedy", "greedy"),
    Axis("force_max_gen_len", "force_max_gen_len"),
    Axis("seed", "seed"),
    Axis("save_responses", "save_responses"),
    # scenario=serving (issue 24): shown where they vary.
    Axis("scenario", "scenario"),
    Axis("rate", "serving.rate", short="r"),
    Axis("arrival", "serving.arrival"),
    Axis("max_slots", "serving.max_slots", short="slots"),
)
# The axes every table shows, whether they vary or not (the others show where they vary).
SHOWN_AXES = tuple(axis for axis in AXES if axis.shown)

# The keys that decide which job (and model load) a cell belongs to.
PLACEMENT_KEYS = ("model", "gpu", "shards", "precision", "cluster")
# Result-neutral keys left out of the cell id, so moving a sweep does not redo its cells.
ID_EXCLUDED = ("sweep_dir", "cluster", "dist_timeout_s", "skip_unfit", "grid", "power_cap_command", "repeats", "repeat",
               "repeats_auto", "repeats_target_pct", "repeats_min", "repeats_max")
# Facts about the hardware, and options that only flag or report (they change no figure), per config
# section: left out of the cell id, so changing them measures nothing again. The snapshot's content is in
# content_sha256.
ID_EXCLUDED_IN = {"gpu": ("hbm_gbs", "peak_tflops"), "dataset": ("snapshot",), "energy": ("min_window_periods",)}
# Options added after sweeps were run, per config section: at their defaults they leave the cell id as it was.
ID_NEW_DEFAULTS = {
    "": {"save_responses": False, "gpu_clock_mhz": None, "scenario": OFFLINE},
    "serving": {f.name: f.default for f in dataclasses.fields(ServingConfig)},
    # settle_s: at 0 no wait, as before it existed; active_s is measured outside the cell's window.
    "energy": {"settle_s": 0.0, "active_s": 0.5},
    # content_sha256 is None for hub and synthetic data: they keep their earlier ids.
    # max_prompt_tokens: None (nothing cut) became the default after 128; a cell that sets it keeps its id.
    "dataset": {"prompt_template": "{prompt}", "fewshot_path": None, "fewshot_k": 0, "content_sha256": None,
                "max_prompt_tokens": None, "fewshot_sha256": None},
    "model": {"eos_token": None, "rope_scaling_factor": None, "rope_low_freq_factor": 1.0,
              "rope_high_freq_factor": 4.0, "rope_original_max_pos": 8192},
}
# Sections added after sweeps were run: left out of the id where every key is at its default.
ID_NEW_SECTIONS = ("serving",)
