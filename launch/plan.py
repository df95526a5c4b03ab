"""Plan a sweep: expand the grid into cells, group them by placement into jobs, check each fits."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from w2w.config import ConfigError, cell_id, compose_grid, divisors, placement_key
from w2w.data import check_dataset
from w2w.records import cell_done
from w2w.shapes import PRECISION_BYTES, ModelArgs, preset_args

GIB = 1024**3
# Activations, allocator slack and the CUDA context: a margin on top of weights + KV cache.
MEMORY_OVERHEAD = 1.10
CONTEXT_GIB = 1.0


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float  # per GPU
    kv_cache_gib: float  # per GPU, for the cell's batch x (prompt + max_gen_len)

    @property
    def total_gib(self) -> float:
        return (self.weights_gib + self.kv_cache_gib) * MEMORY_OVERHEAD + CONTEXT_GIB


def estimate_memory(cfg: DictConfig, args: ModelArgs) -> MemoryEstimate:
    """From the shapes alone; nothing is loaded on the login node."""
    width = PRECISION_BYTES[cfg.precision]
    weights = args.num_params() * width / cfg.shards
    tokens = cfg.batch_size * (cfg.dataset.max_prompt_tokens + cfg.max_gen_len)
    kv = 2 * args.n_layers * tokens * args.kv_heads * args.head_dim * width / cfg.shards
    return MemoryEstimate(weights / GIB, kv / GIB)


@dataclass
class Cell:
    cfg: DictConfig
    id: str
    memory: MemoryEstimate
    skip_reason: str | None = None


@dataclass
class Job:
    """One submitit job: the cells of one placement, sharing one model load."""

    index: int
    cells: list[Cell]
    nodes: int
    tasks_per_node: int
    skipped: list[Cell] = field(default_factory=list)

    @property
    def cfg(self) -> DictConfig:
        return self.cells[0].cfg

    @property
    def key(self) -> str:
        """Stable across re-plans of the same sweep: the placement's hash."""
        return hashlib.sha256(placement_key(self.cfg).encode()).hexdigest()[:8]

    @property
    def gpus(self) -> int:
        return self.nodes * self.tasks_per_node

    def shape(self) -> str:
        """The placement, without its cell count (which grows as grids are added to a sweep)."""
        c = self.cfg
        return (f"model={c.model.name} gpu={c.gpu.name} shards={c.shards} precision={c.precision} "
                f"-> {self.nodes} node(s) x {self.tasks_per_node} task(s)")

    def describe(self) -> str:
        c = self.cfg
        return (
            f"job {self.key}: {self.shape()}, {len(self.cells)} cell(s)"
            + (f", peak est. {max(x.memory.total_gib for x in self.cells):.1f} GiB/GPU" if c.gpu.device == "cuda" else "")
        )


@dataclass
class Plan:
    jobs: list[Job]
    skipped: list[Cell]

    @property
    def cells(self) -> list[Cell]:
        return [cell for job in self.jobs for cell in job.cells]


def placement(cfg: DictConfig) -> tuple[int, int]:
    """(nodes, tasks per node), one GPU per task; errors name the option to change."""
    if cfg.gpu.device == "cuda" and not cfg.cluster.gres_gpu:
        raise ConfigError(f"gpu={cfg.gpu.name} needs GPUs but cluster={cfg.cluster.name} schedules none "
                          "(cluster.gres_gpu=false): use gpu=cpu or a cluster with GPUs")
    per_node = cfg.cluster.gpus_per_node
    nodes = math.ceil(cfg.shards / per_node)
    if cfg.shards % nodes:
        raise ConfigError(
            f"shards={cfg.shards} does not split evenly over {nodes} nodes of {per_node} GPUs "
            f"(cluster={cfg.cluster.name}): choose shards <= {per_node} or a multiple of it"
        )
    if nodes > cfg.cluster.max_nodes:
        raise ConfigError(
            f"shards={cfg.shards} needs {nodes} nodes of {per_node} GPUs but cluster={cfg.cluster.name} "
            f"offers at most {cfg.cluster.max_nodes} (cluster.max_nodes): lower shards or pick another cluster"
        )
    return nodes, cfg.shards // nodes


def _fit_reason(cfg: DictConfig, memory: MemoryEstimate) -> str | None:
    limit = cfg.gpu.memory_gib
    if not limit or memory.total_gib <= limit:
        return None
    return (
        f"model={cfg.model.name} shards={cfg.shards} batch_size={cfg.batch_size} max_gen_len={cfg.max_gen_len} "
        f"needs ~{memory.total_gib:.1f} GiB per GPU (weights {memory.weights_gib:.1f} + KV cache "
        f"{memory.kv_cache_gib:.1f}, +{MEMORY_OVERHEAD - 1:.0%} +{CONTEXT_GIB:.0f} GiB) but gpu={cfg.gpu.name} "
        f"has {limit:g} GiB"
    )


def _unfit_advice(cfg: DictConfig, args: ModelArgs) -> str:
    """What can make an unfit cell fit: only shard counts that divide the heads are offered."""
    more = [d for d in divisors(math.gcd(args.n_heads, args.kv_heads)) if d > cfg.shards]
    shards = f"shards={','.join(map(str, more))}" if more else f"a GPU with more memory than gpu={cfg.gpu.name}"
    return f"use {shards}, lower batch_size or max_gen_len, or pass skip_unfit=true"


def check_tokenizer(model: DictConfig, args: ModelArgs) -> None:
    """A checkpoint's (or a named) tokenizer must match its embedding: known here, not after the load.
    Random weights without a tokenizer_path use the bundled tiny tokenizer, as the runner does."""
    if model.checkpoint_dir or model.tokenizer_path:
        # Imported here: planning without a checkpoint or tokenizer file needs no torch.
        from w2w.checkpoint import tokenizer_path
        from w2w.tokenizer import check_vocab, piece_count

        path = tokenizer_path(model)
        check_vocab(path, piece_count(path), model.name, args.vocab_size)


def _shapes(model: DictConfig) -> ModelArgs:
    """The model's real shapes: a checkpoint's (checked against its preset) or the preset's."""
    if not model.checkpoint_dir:
        return preset_args(model)
    # Imported here: reading shard headers needs torch, planning without a checkpoint does not.
    from w2w.checkpoint import model_args

    return model_args(model)


def make_plan(overrides: list[str], config_dir: Sequence[str | Path] = ()) -> Plan:
    """Every cell of the grid, validated; cells of one placement share a job."""
    groups: dict[str, list[Cell]] = {}
    skipped: list[Cell] = []
    shapes: dict[str, ModelArgs] = {}  # a checkpoint's header is read once per model, not per cell
    datasets: set[str] = set()  # each prompt set is checked once, not per cell
    for cfg in compose_grid(overrides, config_dir):
        placement(cfg)
        data_key = json.dumps(OmegaConf.to_container(cfg.dataset, resolve=True), sort_keys=True)
        if data_key not in datasets:  # bad prompt files are known before anything is submitted
            check_dataset(cfg.dataset)
            datasets.add(data_key)
        key = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True)
        if key not in shapes:
            shapes[key] = _shapes(cfg.model)
            check_tokenizer(cfg.model, shapes[key])
        memory = estimate_memory(cfg, shapes[key])
        cell = Cell(cfg, cell_id(cfg), memory, _fit_reason(cfg, memory))
        if cell.skip_reason:
            if not cfg.skip_unfit:
                raise ConfigError(f"{cell.skip_reason}: {_unfit_advice(cfg, shapes[key])}")
            skipped.append(cell)
            continue
        groups.setdefault(placement_key(cfg), []).append(cell)
    jobs = [Job(i, cells, *placement(cells[0].cfg)) for i, cells in enumerate(groups.values())]
    return Plan(jobs, skipped)


def pending_cells(job: Job) -> list[Cell]:
    """Cells of the job without a complete set of ok records."""
    return [c for c in job.cells if not cell_done(c.cfg.sweep_dir, c.id, c.cfg.shards)]
