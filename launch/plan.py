"""Plan a sweep: expand the grid into cells, group them by placement into jobs, check each fits."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from w2w.cell import SERVING, Cell, DatasetConfig
from w2w.checks import FileChecks
from w2w.config import compose_grid
from w2w.data import snapshot_dataset
from w2w.engines import SPECS
from w2w.errors import ConfigError, divisors
from w2w.records import runs_done
from w2w.shapes import PRECISION_BYTES, ModelArgs
from w2w.stopping import runs_planned

GIB = 1024**3
# Activations and allocator slack (a margin on weights + KV cache), and the CUDA context with
# cuBLAS workspace (about half a GiB under torch on a V100 or A100).
MEMORY_OVERHEAD = 1.10
CONTEXT_GIB = 0.5


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float  # per GPU
    kv_cache_gib: float  # per GPU, for the cell's batch x (prompt + max_gen_len)

    @property
    def total_gib(self) -> float:
        return (self.weights_gib + self.kv_cache_gib) * MEMORY_OVERHEAD + CONTEXT_GIB


def cache_positions(cell: Cell, prompt_tokens: int | None = None) -> int:
    """KV positions a cell's cache holds: batch x the length its engine allocates for the longest
    prompt + max_gen_len (EngineSpec.cache_len). prompt_tokens: the longest prompt as run (None:
    dataset.max_prompt_tokens, or what max_seq_len leaves where prompts are kept whole)."""
    spec, max_seq_len = SPECS[cell.engine], cell.model.max_seq_len
    if prompt_tokens is None:
        prompt_tokens = cell.dataset.max_prompt_tokens or spec.prompt_room(max_seq_len, cell.max_gen_len)
    rows = cell.serving.max_slots if cell.scenario == SERVING else cell.batch_size  # serving: its slots
    return rows * spec.cache_len(prompt_tokens + cell.max_gen_len, max_seq_len)


def estimate_memory(cell: Cell, args: ModelArgs, prompt_tokens: int | None = None,
                    resident_positions: int = 0) -> MemoryEstimate:
    """From the shapes alone; nothing is loaded on the login node.

    The cell's own KV cache: the model's, or its engine's (EngineSpec.own_cache), the same size.
    prompt_tokens: see cache_positions. resident_positions: a cache another engine of the job
    keeps allocated meanwhile (see resident_positions()).
    """
    width = PRECISION_BYTES[cell.precision]
    weights = args.num_params() * width / cell.shards
    tokens = cache_positions(cell, prompt_tokens) + resident_positions
    kv = 2 * args.n_layers * tokens * args.kv_heads * args.head_dim * width / cell.shards
    return MemoryEstimate(weights / GIB, kv / GIB)


def resident_positions(cell: Cell, job_cells: list[Cell]) -> int:
    """The other cache of a job that runs an engine with a cache of its own (EngineSpec.own_cache) beside
    one that uses the model's: each keeps its cache while the other kind runs; bounded by the largest
    of the other kind's cells (skipped cells included: an overestimate)."""
    own = SPECS[cell.engine].own_cache
    others = [c for c in job_cells if SPECS[c.engine].own_cache != own]
    return max(map(cache_positions, others), default=0)


@dataclass
class PlannedCell:
    """A cell as planned: its settings, its memory estimate, and why it is skipped (if it is)."""

    cell: Cell
    memory: MemoryEstimate
    skip_reason: str | None = None

    @property
    def id(self) -> str:
        return self.cell.id


@dataclass
class Job:
    """One submitit job: the cells of one placement, sharing one model load."""

    index: int
    cells: list[PlannedCell]
    nodes: int
    tasks_per_node: int
    skipped: list[PlannedCell] = field(default_factory=list)

    @property
    def cell(self) -> Cell:
        """The first cell: every cell of a job has its placement."""
        return self.cells[0].cell

    @property
    def key(self) -> str:
        """Stable across re-plans of the same sweep: the placement's hash."""
        return hashlib.sha256(self.cell.placement.encode()).hexdigest()[:8]

    @property
    def gpus(self) -> int:
        return self.nodes * self.tasks_per_node

    def shape(self) -> str:
        """The placement, without its cell count (which grows as grids are added to a sweep)."""
        c = self.cell
        return (f"model={c.model.name} gpu={c.gpu.name} shards={c.shards} precision={c.precision} "
                f"-> {self.nodes} node(s) x {self.tasks_per_node} task(s)")

    def describe(self) -> str:
        c = self.cell
        return (
            f"job {self.key}: {self.shape()}, {len(self.cells)} cell(s)"
            + (f" ({'up to ' if c.repeats_auto else ''}{runs} runs with repeats)" if (runs := sum(x.cell.repeats for x in self.cells)) > len(self.cells)
               else "")
            + (f", peak est. {max(x.memory.total_gib for x in self.cells):.1f} GiB/GPU" if c.gpu.device == "cuda" else "")
        )


@dataclass
class Plan:
    jobs: list[Job]
    skipped: list[PlannedCell]

    @property
    def cells(self) -> list[PlannedCell]:
        return [cell for job in self.jobs for cell in job.cells]


def placement(cell: Cell) -> tuple[int, int]:
    """(nodes, tasks per node), one GPU per task; errors name the option to change."""
    if cell.gpu.device == "cuda" and not cell.cluster.gres_gpu:
        raise ConfigError(f"gpu={cell.gpu.name} needs GPUs but cluster={cell.cluster.name} schedules none "
                          "(cluster.gres_gpu=false): use gpu=cpu or a cluster with GPUs")
    per_node = cell.cluster.gpus_per_node
    nodes = math.ceil(cell.shards / per_node)
    if cell.shards % nodes:
        raise ConfigError(
            f"shards={cell.shards} does not split evenly over {nodes} nodes of {per_node} GPUs "
            f"(cluster={cell.cluster.name}): choose shards <= {per_node} or a multiple of it"
        )
    if nodes > cell.cluster.max_nodes:
        raise ConfigError(
            f"shards={cell.shards} needs {nodes} nodes of {per_node} GPUs but cluster={cell.cluster.name} "
            f"offers at most {cell.cluster.max_nodes} (cluster.max_nodes): lower shards or pick another cluster"
        )
    return nodes, cell.shards // nodes


def _fit_reason(cell: Cell, memory: MemoryEstimate) -> str | None:
    limit = cell.gpu.memory_gib
    if not limit or memory.total_gib <= limit:
        return None
    return (
        f"model={cell.model.name} shards={cell.shards} batch_size={cell.batch_size} max_gen_len={cell.max_gen_len} "
        f"needs ~{memory.total_gib:.1f} GiB per GPU (weights {memory.weights_gib:.1f} + KV cache "
        f"{memory.kv_cache_gib:.1f}, +{MEMORY_OVERHEAD - 1:.0%} +{CONTEXT_GIB:g} GiB) but gpu={cell.gpu.name} "
        f"has {limit:g} GiB"
    )


def _unfit_advice(cell: Cell, args: ModelArgs) -> str:
    """What can make an unfit cell fit: only shard counts that divide the heads are offered."""
    more = [d for d in divisors(math.gcd(args.n_heads, args.kv_heads)) if d > cell.shards]
    shards = f"shards={','.join(map(str, more))}" if more else f"a GPU with more memory than gpu={cell.gpu.name}"
    return f"use {shards}, lower batch_size or max_gen_len, or pass skip_unfit=true"


def make_plan(overrides: list[str], config_dir: Sequence[str | Path] = ()) -> Plan:
    """Every cell of the grid, validated; cells of one placement share a job."""
    groups: dict[str, list[PlannedCell]] = {}
    skipped: list[PlannedCell] = []
    files = FileChecks()  # bad prompt files and checkpoints are known before anything is submitted
    by_placement: dict[str, list[tuple[Cell, ModelArgs, int | None]]] = {}
    for cell in compose_grid(overrides, config_dir):
        placement(cell)
        shapes = files.check(cell)
        by_placement.setdefault(cell.placement, []).append((cell, shapes, files.longest_prompt(cell, shapes)))
    for key, members in by_placement.items():
        job_cells = [c for c, _, _ in members]
        for cell, shapes, longest in members:
            memory = estimate_memory(cell, shapes, longest, resident_positions(cell, job_cells))
            planned = PlannedCell(cell, memory, _fit_reason(cell, memory))
            if planned.skip_reason:
                if not cell.skip_unfit:
                    raise ConfigError(f"{planned.skip_reason}: {_unfit_advice(cell, shapes)}")
                skipped.append(planned)
                continue
            groups.setdefault(key, []).append(planned)
    jobs = [Job(i, cells, *placement(cells[0].cell)) for i, cells in enumerate(groups.values())]
    return Plan(jobs, skipped)


def with_snapshots(plan: Plan, sweep_dir: Path) -> Plan:
    """The plan with each cell reading its prompts from a snapshot in the sweep (data.snapshot_dataset),
    one per distinct dataset: the jobs need neither the hub nor the source files."""
    made: dict[DatasetConfig, DatasetConfig] = {}

    def own(planned: PlannedCell) -> PlannedCell:
        dataset = planned.cell.dataset
        if dataset not in made:
            made[dataset] = snapshot_dataset(dataset, sweep_dir)
        return dataclasses.replace(planned, cell=dataclasses.replace(planned.cell, dataset=made[dataset]))

    jobs = [dataclasses.replace(job, cells=[own(c) for c in job.cells], skipped=[own(c) for c in job.skipped])
            for job in plan.jobs]
    return Plan(jobs, [own(c) for c in plan.skipped])


def pending_cells(job: Job) -> list[PlannedCell]:
    """Cells of the job without a complete set of ok records (in every one of their runs; repeats=auto:
    of the runs it took, once it has stopped)."""
    return [c for c in job.cells if not runs_done(c.cell.sweep_dir, c.id, c.cell.shards,
                                                  runs_planned(c.cell.sweep_dir, c.id, c.cell.repeats))]
