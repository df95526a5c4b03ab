"""w2w-run: run one placement's cells on this rank and write a record file per (cell, rank)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
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

from w2w import checkpoint, distributed, engines
from w2w.config import ConfigError, cell_id, compose_grid, placement_key, split_config_dirs
from w2w.data import Prompt, check_unchanged, load_prompt_rows
from w2w.energy import (
    EnergyError,
    EnergyMonitor,
    PowerCapError,
    PowerCapper,
    Window,
    summarize,
    timeline_frame,
)
from w2w.engines.common import (
    DECODE,
    PREFILL,
    Engine,
    Generation,
    PhaseClock,
    SamplingParams,
    synchronize,
)
from w2w.model import DTYPES, Transformer, build_model
from w2w.progress import GENERATION_COUNTS, CellProgress, CellShape, progress_path, sum_batches
from w2w.records import (
    SCHEMA_VERSION,
    STATUS_OK,
    Energy,
    RankRecord,
    cell_done,
    timeline_path,
    write_atomic,
    write_record,
)
from w2w.responses import Responses, join_response_parts, no_score_reason, response_part_path
from w2w.tokenizer import TokenizerLike, check_vocab, open_tokenizer

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


def load_model(cfg: DictConfig, info: distributed.DistInfo) -> tuple[Transformer, TokenizerLike]:
    """Tokenizer and this rank's model shard; checks they agree before any device memory is used."""
    checkpoint.check_precision(cfg.precision, info.device)
    tokenizer = open_tokenizer(checkpoint.tokenizer_path(cfg.model), cfg.model.get("eos_token"))
    args = checkpoint.model_args(cfg.model)
    check_vocab(tokenizer.path, tokenizer.vocab_size, cfg.model.name, args.vocab_size)
    state = checkpoint.load_rank_state(cfg.model, args, info.rank, info.world_size)
    model = build_model(args, state, info.device, DTYPES[cfg.precision])
    return model, tokenizer


def _encode(prompts: list[str], tokenizer: TokenizerLike, max_prompt_len: int, counts: Counts) -> list[list[int]]:
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


def load_prompt_sets(cells: list[DictConfig]) -> dict[str, list[Prompt]]:
    """Each distinct dataset of the job's cells, loaded once."""
    sets: dict[str, list[Prompt]] = {}
    for cfg in cells:
        key = _dataset_key(cfg)
        if key not in sets:
            check_unchanged(cfg.dataset)
            sets[key] = load_prompt_rows(cfg.dataset)
    return sets


@dataclass
class _BatchResponses:
    """One batch's prompt rows, and where rank 0 keeps their responses until the cell ends."""

    cell_id: str
    index: int
    rows: list[Prompt]
    rank: int

    def score(self, cfg: DictConfig, batch: list[list[int]], outputs: list[list[int]], texts: list[str]) -> dict:
        """`scored` and `correct` for the batch's counts; with save_responses, rank 0 writes the batch's
        lines (every rank scores: the ranks' tokens are identical)."""
        responses = Responses(cfg.dataset.name, cfg.max_gen_len, cfg.force_max_gen_len,
                              keep=bool(cfg.get("save_responses")) and self.rank == 0)
        responses.add(self.rows, [len(p) for p in batch], outputs, texts)
        if responses.keep:  # before the batch counts as done: a resumed cell finds every earlier batch's part
            responses.write(response_part_path(cfg.sweep_dir, self.cell_id, self.index))
        return {"scored": responses.scored, "correct": responses.correct}


def _responses_block(cfg: DictConfig, cid: str, num_batches: int, rank: int) -> dict:
    """The record's responses block; joins the batches' parts into the responses file (rank 0,
    save_responses=true), also those of batches that an earlier segment of the cell ran."""
    requested = bool(cfg.get("save_responses"))
    saved = requested and rank == 0
    file = join_response_parts(cfg.sweep_dir, cid, num_batches) if saved else None
    # saved: this rank wrote the file (rank 0 only); requested: save_responses was set.
    return {"requested": requested, "saved": saved, "file": file, "score_reason": no_score_reason(cfg.dataset.name)}


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


def _warm_up(cfg: DictConfig, engine: Engine, batch: list[list[int]], tokenizer: TokenizerLike, cache_len: int,
             monitor: EnergyMonitor) -> Window | None:
    """First calls pay for allocation and kernel selection; keep them out of the cell (every segment)."""
    if not cfg.warmup:
        return None
    monitor.begin_window("warmup")
    tokens = min(WARMUP_TOKENS, cfg.max_gen_len)  # the cache is sized for the cell's own max_gen_len
    engine.generate(batch, SamplingParams.of(cfg, tokens), tokenizer.eos_id, tokenizer.pad_id, cache_len)
    return monitor.end_window("warmup")


def _run_batch(
    cfg: DictConfig, batch: list[list[int]], engine: Engine, tokenizer: TokenizerLike, cache_len: int,
    clock: PhaseClock, phases: PhaseEnergy, responses: _BatchResponses,
) -> tuple[dict, str | None]:
    """One batch in an energy window of its own: its entry for the progress file, and its window's error."""
    seconds, joules = dict(clock.seconds), dict(phases.joules)
    phases.monitor.begin_window("batch")
    gen = engine.generate(batch, SamplingParams.of(cfg), tokenizer.eos_id, tokenizer.pad_id, cache_len, clock)
    window = phases.monitor.end_window("batch")
    texts = [tokenizer.decode(t) for t in gen.tokens]
    counts = Counts()
    counts.add(gen, texts)

    def joules_in(phase: str) -> float | None:
        now, then = phases.joules.get(phase), joules.get(phase, 0.0)
        return None if now is None or then is None else now - then

    entry = {
        "counts": {k: getattr(counts, k) for k in GENERATION_COUNTS} | responses.score(cfg, batch, gen.tokens, texts),
        "times": {"start_unix_s": window.start_unix_s, "total_s": window.duration_s,
                  "prefill_s": clock.seconds[PREFILL] - seconds[PREFILL],
                  "decode_s": clock.seconds[DECODE] - seconds[DECODE]},
        "energy": {"gpu_j": window.gpu_energy_j, "counter_gpu_j": window.counter_energy_j,
                   "integrated_gpu_j": window.integrated_energy_j, "prefill_gpu_j": joules_in(PREFILL),
                   "decode_gpu_j": joules_in(DECODE), "cpu_j": window.cpu_energy_j},
    }
    return entry, window.error


def run_cell(
    cfg: DictConfig,
    rows: list[Prompt],
    model: Transformer,
    tokenizer: TokenizerLike,
    monitor: EnergyMonitor,
    *,
    timeline: Path | None = None,
    rank: int = 0,
    progress: CellProgress | None = None,
    segment: dict | None = None,
) -> dict:
    """Run the cell's prompt rows from progress's first unfinished batch; returns the measured
    part of the record, summed over the batches of every segment (job attempt) that ran the cell.

    An NVML read error during the cell makes it status error (the rest is still recorded).
    """
    counts = Counts()
    max_prompt_len = min(cfg.dataset.max_prompt_tokens, model.args.max_seq_len - cfg.max_gen_len)
    prompts = _encode([r.text for r in rows], tokenizer, max_prompt_len, counts)
    cache_len = max(len(p) for p in prompts) + cfg.max_gen_len
    batches = [prompts[i : i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    cid = cell_id(cfg) if progress is None else progress.shape.cell_id
    if progress is None:  # nothing saved between batches
        progress = CellProgress(CellShape(cid, rank, 1, cfg.batch_size, len(batches)), None)
    start = progress.done
    engine = engines.create(cfg.engine, model)  # one per cell: warm-up and every batch share its graphs
    warmup = _warm_up(cfg, engine, batches[start], tokenizer, cache_len, monitor) if start < len(batches) else None
    progress.begin_segment((segment or {}) | {
        "start_unix_s": time.time(), "warmup_s": warmup.duration_s if warmup else 0.0,
        "warmup_gpu_j": warmup.gpu_energy_j if warmup else None,
    })
    phases = PhaseEnergy(monitor)
    clock = PhaseClock(model.device, phases.on_boundary)
    clock.enter(None)  # synchronize before the cell's window opens
    monitor.begin_window("cell")
    errors: list[str] = []
    for index in range(start, len(batches)):
        first = index * cfg.batch_size
        entry, error = _run_batch(cfg, batches[index], engine, tokenizer, cache_len, clock, phases,
                                  _BatchResponses(cid, index, rows[first : first + len(batches[index])], rank))
        if error:
            errors.append(f"batch {index}: {error}")
        progress.add_batch(entry, save=not errors)  # a re-run does not resume after void figures
        log.info("cell batch %d/%d: %d output tokens", index + 1, len(batches), entry["counts"]["output_tokens"])
    cell: Window = monitor.end_window("cell")
    totals = sum_batches(progress.batches, progress.segments)
    result = {
        "counts": totals["counts"] | {"truncated_prompts": counts.truncated_prompts},
        "times": totals["times"] | {"warmup_s": warmup.duration_s if warmup else 0.0},
        "energy": _cell_energy(cell, phases, warmup, monitor).merged(totals["energy"]),
        "telemetry": summarize(cell.samples, monitor.memory_total_mib, list(cell.telemetry_errors), cell.t0,
                               cell.t0 + cell.duration_s),
        "timeline": _write_timeline(timeline, cell, rank),
        "batches": progress.batches,
        "segments": [s for s in progress.segments if s["segment"] in {b["segment"] for b in progress.batches}],
        "responses": _responses_block(cfg, cid, len(batches), rank),
    }
    errors = ([f"cell: {cell.error}"] if cell.error else []) + phases.errors + errors
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
            "engine": cfg.engine,
            "eos_check_every": cfg.eos_check_every,
            "batch_size": cfg.batch_size,
            "max_gen_len": cfg.max_gen_len,
            "num_prompts": cfg.dataset.num_prompts,
            "power_cap_w": cfg.power_cap_w,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "greedy": cfg.greedy,
            "force_max_gen_len": cfg.force_max_gen_len,
            "seed": cfg.seed,
            "save_responses": bool(cfg.get("save_responses")),
        },
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _failure(exc: BaseException) -> dict:
    # torch.cuda.OutOfMemoryError: torch.OutOfMemoryError's name before torch 2.5 (the floor is 2.1).
    status = "oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error"
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


def _load_measured(cfg: DictConfig, info: distributed.DistInfo, monitor: EnergyMonitor) -> tuple[Transformer, TokenizerLike, dict]:
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
        statuses = _run_loaded(cells, info, monitor, capper, prompt_sets)
    distributed.shutdown()  # only after a clean end: a broken group's teardown could block
    return statuses


def _resume(cfg: DictConfig, cid: str, info: distributed.DistInfo, num_prompts: int) -> CellProgress:
    """The batches of the cell that earlier segments finished on every rank (a preempted job's)."""
    shape = CellShape(cid, info.rank, info.world_size, cfg.batch_size, math.ceil(num_prompts / cfg.batch_size))
    progress = CellProgress.load(progress_path(cfg.sweep_dir, cid, info.rank), shape)
    start = distributed.agreed_min(progress.done)  # ranks run batches together: resume where all got to
    progress.resume_at(start)
    if start:
        log.info("cell %s: resumed at batch %d/%d after %d segment(s)", cid, start + 1, shape.num_batches,
                 len(progress.segments))
    return progress


def _segment(job_energy: dict) -> dict:
    """This job attempt: the idle baseline it measured after its (re)start."""
    env = os.environ
    return {"job_id": env.get("SLURM_JOB_ID") or env.get("SUBMITIT_JOB_ID"),
            "restart_count": int(env.get("SLURM_RESTART_COUNT", 0)),
            "idle_power_w": job_energy.get("idle_power_w"), "idle_s": job_energy.get("idle_s")}


def _measure_cell(
    cfg: DictConfig, cid: str, rows: list[Prompt], loaded: tuple[Transformer, TokenizerLike, dict],
    info: distributed.DistInfo, monitor: EnergyMonitor, capper: PowerCapper,
) -> tuple[RankRecord, int]:
    """One cell on this rank: its full record, and its outcome for the agreement between ranks."""
    model, tokenizer, job_energy = loaded
    record = _identity(cfg, cid, info)
    outcome = distributed.CELL_OK
    try:
        _apply_power_cap(capper, cfg)
        timeline = timeline_path(cfg.sweep_dir, cid, info.rank)
        progress = _resume(cfg, cid, info, len(rows))
        record |= {"status": STATUS_OK} | run_cell(cfg, rows, model, tokenizer, monitor, timeline=timeline,
                                                   rank=info.rank, progress=progress, segment=_segment(job_energy))
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
    prompt_sets: dict[str, list[Prompt]],
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
            if record.ok:  # the record holds the batches now; a failed cell resumes
                progress_path(cfg.sweep_dir, cid, info.rank).unlink(missing_ok=True)
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
        print(__doc__.strip() + "\n\nusage: w2w-run [--config-dir DIR] [key=value ...]  (Hydra overrides; "
              "a,b lists make a grid; DIR: more presets, also W2W_CONFIG_DIR)")
        return 0
    try:
        config_dirs, args = split_config_dirs(args)
        cells = compose_grid(args, config_dirs)
        statuses = run_cells(cells)
    except (ConfigError, EnergyError) as exc:
        print(f"w2w-run: error: {exc}", file=sys.stderr)
        return 2
    return 0 if all(s in (STATUS_OK, "skipped") for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
