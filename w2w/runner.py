"""w2w-run: run one placement's cells on this rank and write a record file per (cell, rank)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from w2w import checkpoint, distributed
from w2w.config import ConfigError, cell_id, compose_grid, placement_key
from w2w.data import load_prompts
from w2w.energy import (
    EnergyError,
    EnergyMonitor,
    PowerCapError,
    PowerCapper,
    Window,
    summarize,
    timeline_frame,
)
from w2w.generation import Generation, PhaseClock, SamplingParams, generate, synchronize
from w2w.model import DTYPES, Transformer, build_model
from w2w.records import (
    SCHEMA_VERSION,
    STATUS_OK,
    Energy,
    RankRecord,
    Telemetry,
    Times,
    cell_done,
    timeline_path,
    write_atomic,
    write_record,
)
from w2w.tokenizer import Tokenizer

log = logging.getLogger("w2w.run")
WARMUP_TOKENS = 4


@dataclass
class Counts:
    prompts: int = 0
    responses: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    output_words: int = 0
    batches: int = 0
    truncated_prompts: int = 0

    def add(self, gen: Generation, texts: list[str]) -> None:
        self.batches += 1
        self.prompts += len(gen.tokens)
        self.responses += len(gen.tokens)
        self.prompt_tokens += gen.prompt_tokens
        self.output_tokens += sum(len(t) for t in gen.tokens)
        # The paper's words: the response text split on whitespace.
        self.output_words += sum(len(text.split()) for text in texts)


@dataclass
class PhaseEnergy:
    """Energy windows that follow the generation phases of every batch of a cell."""

    monitor: EnergyMonitor
    joules: dict[str, float | None] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    short_windows: dict[str, int] = field(default_factory=dict)  # per phase: windows under the counter's period

    def on_boundary(self, previous: str | None, following: str | None) -> None:
        if previous is not None:
            window = self.monitor.end_window(previous)
            total = self.joules.get(previous, 0.0)
            self.joules[previous] = None if total is None or window.gpu_energy_j is None else total + window.gpu_energy_j
            if window.error:
                self.errors.append(f"{previous}: {window.error}")
            self.short_windows[previous] = self.short_windows.get(previous, 0) + int(window.short)
        if following is not None:
            self.monitor.begin_window(following)


def load_model(cfg: DictConfig, info: distributed.DistInfo) -> tuple[Transformer, Tokenizer]:
    """Tokenizer and this rank's model shard; checks they agree before any device memory is used."""
    checkpoint.check_precision(cfg.precision, info.device)
    tokenizer = Tokenizer(checkpoint.tokenizer_path(cfg.model))
    args = checkpoint.model_args(cfg.model)
    if tokenizer.vocab_size != args.vocab_size:
        raise ConfigError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but model {cfg.model.name} "
            f"has vocab_size={args.vocab_size}: set model.tokenizer_path to the model's tokenizer"
        )
    state = checkpoint.load_rank_state(cfg.model, args, info.rank, info.world_size)
    model = build_model(args, state, info.device, DTYPES[cfg.precision])
    return model, tokenizer


def _sampling(cfg: DictConfig, max_gen_len: int | None = None) -> SamplingParams:
    return SamplingParams(
        max_gen_len=max_gen_len or cfg.max_gen_len,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        greedy=cfg.greedy,
        force_max_gen_len=cfg.force_max_gen_len,
        seed=cfg.seed,
    )


def _encode(prompts: list[str], tokenizer: Tokenizer, max_prompt_len: int, counts: Counts) -> list[list[int]]:
    encoded = []
    for text in prompts:
        ids = tokenizer.encode(text)
        if len(ids) > max_prompt_len:
            counts.truncated_prompts += 1
            ids = ids[-max_prompt_len:]  # keep the end, where the question is
        encoded.append(ids)
    return encoded


def _dataset_key(cfg: DictConfig) -> str:
    return json.dumps(OmegaConf.to_container(cfg.dataset, resolve=True), sort_keys=True)


def load_prompt_sets(cells: list[DictConfig]) -> dict[str, list[str]]:
    """Each distinct dataset of the job's cells, loaded once."""
    sets: dict[str, list[str]] = {}
    for cfg in cells:
        key = _dataset_key(cfg)
        if key not in sets:
            sets[key] = load_prompts(cfg.dataset)
    return sets


def _write_timeline(path: Path | None, window: Window, rank: int) -> str | None:
    """The cell's sampler rows as Parquet (atomically); returns the file name for the record."""
    if path is None or not window.samples:
        return None
    frame = timeline_frame(window.samples, window.t0, window.start_unix_s, rank)
    write_atomic(path, frame.to_parquet(index=False))
    return path.name


def _cell_energy(cell: Window, phases: PhaseEnergy, warmup: Window | None, monitor: EnergyMonitor) -> Energy:
    """The record's energy block for one cell (J; None where there is no figure, with the reason)."""
    return Energy(
        source=cell.source,
        gpu_j=cell.gpu_energy_j,
        counter_gpu_j=cell.counter_energy_j,
        integrated_gpu_j=cell.integrated_energy_j,
        prefill_gpu_j=phases.joules.get("prefill"),
        decode_gpu_j=phases.joules.get("decode"),
        short_phase_windows=phases.short_windows,
        warmup_gpu_j=warmup.gpu_energy_j if warmup else None,
        power_reading=monitor.power_reading,
        sample_interval_s=monitor.sampler.interval_s if monitor.sampler else None,
        cpu_j=cell.cpu_energy_j,
        cpu_zones_j=cell.cpu_zones_j,
        cpu_reason=monitor.cpu_reason if cell.cpu_energy_j is None else None,
        reason=cell.reason,
    )


def run_cell(
    cfg: DictConfig,
    texts: list[str],
    model: Transformer,
    tokenizer: Tokenizer,
    monitor: EnergyMonitor,
    *,
    timeline: Path | None = None,
    rank: int = 0,
) -> dict:
    """Run the cell's prompts (texts); returns the measured part of the record.

    An NVML read error during the cell makes it status error (the rest is still recorded).
    """
    counts = Counts()
    max_prompt_len = min(cfg.dataset.max_prompt_tokens, model.args.max_seq_len - cfg.max_gen_len)
    prompts = _encode(texts, tokenizer, max_prompt_len, counts)
    cache_len = max(len(p) for p in prompts) + cfg.max_gen_len
    batches = [prompts[i : i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    warmup: Window | None = None
    if cfg.warmup:
        # First calls pay for allocation and kernel selection; keep them out of the cell.
        monitor.begin_window("warmup")
        generate(model, batches[0], _sampling(cfg, WARMUP_TOKENS), tokenizer.eos_id, tokenizer.pad_id, cache_len)
        warmup = monitor.end_window("warmup")
    phases = PhaseEnergy(monitor)
    clock = PhaseClock(model.device, phases.on_boundary)
    clock.enter(None)  # synchronize before the cell's window opens
    monitor.begin_window("cell")
    for index, batch in enumerate(batches):
        gen = generate(model, batch, _sampling(cfg), tokenizer.eos_id, tokenizer.pad_id, cache_len, clock)
        counts.add(gen, [tokenizer.decode(t) for t in gen.tokens])
        log.info("cell batch %d/%d: %d output tokens", index + 1, len(batches), counts.output_tokens)
    cell: Window = monitor.end_window("cell")
    result = {
        "counts": asdict(counts),
        "times": Times(
            start_unix_s=cell.start_unix_s,
            total_s=cell.duration_s,
            prefill_s=clock.seconds["prefill"],
            decode_s=clock.seconds["decode"],
            warmup_s=warmup.duration_s if warmup else 0.0,
        ),
        "energy": _cell_energy(cell, phases, warmup, monitor),
        "telemetry": Telemetry.from_dict(summarize(cell.samples, monitor.memory_total_mib,
                                                   list(cell.telemetry_errors), cell.t0, cell.t0 + cell.duration_s)),
        "timeline": _write_timeline(timeline, cell, rank),
    }
    errors = ([f"cell: {cell.error}"] if cell.error else []) + phases.errors
    if errors:  # the figures are void; later cells still try
        more = f" (and {len(errors) - 1} more window(s))" if len(errors) > 1 else ""
        result |= {"status": "error", "error": f"EnergyError: {errors[0]}{more}"}
    return result


def _identity(cfg: DictConfig, cid: str, info: distributed.DistInfo) -> dict:
    return {
        "schema": SCHEMA_VERSION,
        "sweep_dir": cfg.sweep_dir,
        "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_JOB_ID"),
        "cell_id": cid,
        "rank": info.rank,
        "local_rank": info.local_rank,
        "world_size": info.world_size,
        "host": info.host,
        "node": info.node,
        "device": str(info.device),
        "params": {
            "model": cfg.model.name,
            "gpu": cfg.gpu.name,
            "dataset": cfg.dataset.name,
            "shards": cfg.shards,
            "precision": cfg.precision,
            "batch_size": cfg.batch_size,
            "max_gen_len": cfg.max_gen_len,
            "num_prompts": cfg.dataset.num_prompts,
            "power_cap_w": cfg.power_cap_w,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "greedy": cfg.greedy,
            "force_max_gen_len": cfg.force_max_gen_len,
            "seed": cfg.seed,
        },
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _failure(exc: BaseException) -> dict:
    status = "oom" if isinstance(exc, torch.OutOfMemoryError) else "error"
    return {"status": status, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}


def _open_monitor(cfg: DictConfig, info: distributed.DistInfo) -> EnergyMonitor:
    """This rank's meter, before the model loads; every rank stops if one cannot open what was asked."""
    monitor, error = None, None
    try:
        monitor = EnergyMonitor.from_config(cfg.energy, info.device, info.local_rank)
    except EnergyError as exc:
        error = exc
    if not distributed.all_ok(error is None):
        if monitor is not None:
            monitor.close()
        raise error or EnergyError("the energy meter could not be opened on another rank (see its log)")
    if info.rank == 0 and monitor.reason:
        log.warning("energy columns will be empty: %s", monitor.reason)
    if info.local_rank == 0 and cfg.energy.rapl and monitor.rapl is None:
        log.warning("no CPU energy on %s: %s", info.node, monitor.cpu_reason)
    return monitor


def _load_measured(cfg: DictConfig, info: distributed.DistInfo, monitor: EnergyMonitor) -> tuple[Transformer, Tokenizer, dict]:
    """Model load and idle baseline in windows of their own: never counted in a cell."""
    monitor.begin_window("load")
    model, tokenizer = load_model(cfg, info)
    synchronize(info.device)
    load = monitor.end_window("load")
    log.info("rank %d: model %s loaded in %.1f s", info.rank, cfg.model.name, load.duration_s)
    distributed.barrier()  # every GPU of the job at rest before the baseline
    idle = monitor.measure_idle(cfg.energy.idle_seconds)
    if info.rank == 0 and idle.idle_power_w is not None:
        log.info("idle baseline: %.1f W over %.1f s (rank 0's GPU)", idle.idle_power_w, idle.idle_s)
    job = {"load_gpu_j": load.gpu_energy_j, "load_s": load.duration_s, "load_cpu_j": load.cpu_energy_j}
    return model, tokenizer, job | asdict(idle)


def _apply_power_cap(capper: PowerCapper, cfg: DictConfig) -> None:
    """Set the cell's cap on every rank, or fail the cell on every rank (never run it uncapped)."""
    error = None
    try:
        capper.apply(cfg.power_cap_w, cfg.power_cap_command)
    except PowerCapError as exc:
        error = exc
    if not distributed.all_ok(error is None):
        raise error or PowerCapError("the power cap could not be set on another rank of this cell (see its record)")


def _restore_power_cap(capper: PowerCapper) -> None:
    try:
        capper.restore()
    except PowerCapError as exc:
        log.error("the GPU keeps a power cap (original limit %s W, restore it with nvidia-smi -pl): %s",
                  capper.original_w, exc)


@contextlib.contextmanager
def restore_cap_on_sigterm(capper: PowerCapper):
    """scancel sends SIGTERM, then SIGKILL; submitit ignores SIGTERM, so a capped GPU would
    outlive the job. While a cap is in force: restore it and stop at once. Otherwise the
    previous handler (submitit's) decides, as before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        if capper.capped:
            _restore_power_cap(capper)
            raise SystemExit("SIGTERM: the job was cancelled; the GPU's original power limit was restored")
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cells(cells: list[DictConfig]) -> list[str]:
    """Run the cells of one placement on this rank; returns the status of each cell."""
    keys = {placement_key(c) for c in cells}
    if len(keys) != 1:
        raise ConfigError(
            "w2w-run takes cells of one placement (model, gpu, shards, precision, cluster, sweep_dir); "
            "use w2w-sweep for grids over those"
        )
    first = cells[0]
    prompt_sets = load_prompt_sets(cells)  # bad prompt files stop the job before the model loads
    info = distributed.init(first.gpu.device, first.dist_timeout_s)
    distributed.init_model_parallel(first.shards, info.world_size)
    monitor = _open_monitor(first, info)
    capper = PowerCapper(monitor.meter, monitor.reason)
    with restore_cap_on_sigterm(capper):
        return _run_loaded(cells, info, monitor, capper, prompt_sets)


def _measure_cell(
    cfg: DictConfig, cid: str, texts: list[str], loaded: tuple[Transformer, Tokenizer, dict],
    info: distributed.DistInfo, monitor: EnergyMonitor, capper: PowerCapper,
) -> tuple[RankRecord, int]:
    """One cell on this rank: its full record, and its outcome for the agreement between ranks."""
    model, tokenizer, job_energy = loaded
    record = _identity(cfg, cid, info)
    outcome = distributed.CELL_OK
    try:
        _apply_power_cap(capper, cfg)
        timeline = timeline_path(cfg.sweep_dir, cid, info.rank)
        record |= {"status": STATUS_OK} | run_cell(cfg, texts, model, tokenizer, monitor, timeline=timeline, rank=info.rank)
    except Exception as exc:  # the sweep goes on; the record says what happened
        record |= _failure(exc)
        outcome = distributed.GROUP_BROKEN if distributed.is_collective_error(exc) else distributed.CELL_FAILED
        monitor.abandon_windows()  # a cell that raised left its windows open
    record["energy"] = record.get("energy", Energy()).merged(job_energy)
    record["gpu"] = monitor.gpu_record()
    record["power_cap"] = capper.state(cfg.power_cap_w)
    record["end_unix_s"] = time.time()
    return RankRecord.from_dict(record), outcome


def _run_loaded(
    cells: list[DictConfig], info: distributed.DistInfo, monitor: EnergyMonitor, capper: PowerCapper,
    prompt_sets: dict[str, list[str]],
) -> list[str]:
    statuses = []
    try:
        loaded = _load_measured(cells[0], info, monitor)
        for index, cfg in enumerate(cells):
            cid = cell_id(cfg)
            if distributed.broadcast_flag(cell_done(cfg.sweep_dir, cid, info.world_size)):
                log.info("cell %d/%d %s: done already, skipped", index + 1, len(cells), cid)
                statuses.append("skipped")
                continue
            record, outcome = _measure_cell(cfg, cid, prompt_sets[_dataset_key(cfg)], loaded, info, monitor, capper)
            if not record.ok:
                log.error("cell %s failed: %s", cid, record.error)
            write_record(cfg.sweep_dir, record)
            statuses.append(record.status)
            log.info("cell %d/%d %s: %s", index + 1, len(cells), cid, record.status)
            if distributed.worst_outcome(outcome, info) == distributed.GROUP_BROKEN:
                raise RuntimeError(
                    f"cell {cid}: a model collective failed ({record.error}); the model-parallel "
                    f"group cannot go on, so the job stops: re-run the sweep to retry the remaining cells"
                )
    finally:  # also when a cell or the load fails: no GPU is left capped, NVML is shut down
        _restore_power_cap(capper)
        monitor.close()
    return statuses


def setup_logging() -> None:
    env = os.environ
    rank = env.get("RANK") or env.get("SLURM_PROCID") or env.get("SUBMITIT_LOCAL_GLOBALID") or "0"
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S", force=True
    )


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nusage: w2w-run [key=value ...]  (Hydra overrides; a,b lists make a grid)")
        return 0
    try:
        cells = compose_grid(args)
        statuses = run_cells(cells)
    except (ConfigError, EnergyError) as exc:
        print(f"w2w-run: error: {exc}", file=sys.stderr)
        return 2
    return 0 if all(s in (STATUS_OK, "skipped") for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
