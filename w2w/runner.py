"""One placement's cells on this rank (w2w-run, w2w.run_cli, and the jobs of w2w-sweep): a record file per (cell, rank)."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict

from w2w import checkpoint, distributed, engines, signals
from w2w.cell import SERVING, Cell, DatasetConfig
from w2w.cell_lock import CellLock
from w2w.config import one_placement
from w2w.data import Prompt, check_unchanged, load_prompt_rows
from w2w.energy.clocks import restore_clocks_or_log
from w2w.energy.errors import EnergyError
from w2w.energy.monitor import EnergyMonitor
from w2w.energy.powercap import PowerCapper, restore_or_log
from w2w.engines.common import synchronize
from w2w.errors import ConfigError
from w2w.measure import Loaded, measure_cell
from w2w.model import DTYPES, Transformer, build_model
from w2w.order import run_order
from w2w.progress import remove_progress
from w2w.records import STATUS_OK, cell_done, write_record_unless_worse
from w2w.serving_cell import run_serving_cell
from w2w.stopping import Stop, decide, read_stop, write_stop
from w2w.tokenizer import TokenizerLike, check_vocab, open_tokenizer

log = logging.getLogger("w2w.run")
LOCK_POLL_S = 0.25  # how often the ranks ask again for a cell another process holds (one small collective)
HELD = "held"  # a cell another process runs, put off until the job's other cells are done


def load_model(cell: Cell, info: distributed.DistInfo) -> tuple[Transformer, TokenizerLike]:
    """Tokenizer and this rank's model shard; checks they agree before any device memory is used."""
    checkpoint.check_precision(cell.precision, info.device)
    tokenizer = open_tokenizer(checkpoint.tokenizer_path(cell.model), cell.model.eos_token)
    args = checkpoint.model_args(cell.model)
    check_vocab(tokenizer.path, tokenizer.vocab_size, cell.model.name, args.vocab_size)
    state = checkpoint.load_rank_state(cell.model, args, info.rank, info.world_size)
    model = build_model(args, state, info.device, DTYPES[cell.precision])
    return model, tokenizer


def load_prompt_sets(cells: list[Cell]) -> dict[DatasetConfig, list[Prompt]]:
    """Each distinct dataset of the job's cells, loaded once (a DatasetConfig is frozen: it keys a dict)."""
    sets: dict[DatasetConfig, list[Prompt]] = {}
    for cell in cells:
        if cell.dataset not in sets:
            check_unchanged(cell.dataset)
            sets[cell.dataset] = load_prompt_rows(cell.dataset)
    return sets


def _open_monitor(cell: Cell, info: distributed.DistInfo) -> EnergyMonitor:
    """This rank's meter, before the model loads; every rank stops if one cannot open what was asked."""
    monitor, error = None, None
    try:
        monitor = EnergyMonitor.from_config(cell.energy, info.device, info.local_rank)
    except EnergyError as exc:
        error = exc
    if not distributed.all_ok(error is None):
        if monitor is not None:
            monitor.close()
        raise error or EnergyError("the energy meter could not be opened on another rank (see its log)")
    if info.rank == 0 and monitor.reason:
        log.warning("energy columns will be empty: %s", monitor.reason)
    if info.local_rank == 0 and cell.energy.rapl and monitor.rapl is None:
        log.warning("no CPU energy on %s: %s", info.node, monitor.cpu_reason)
    return monitor


def _load_measured(cells: list[Cell], info: distributed.DistInfo, monitor: EnergyMonitor) -> Loaded:
    """Model load and idle baseline in windows of their own: never counted in a cell."""
    first = cells[0]
    monitor.begin_window("load")
    model, tokenizer = load_model(first, info)
    synchronize(info.device)
    load = monitor.end_window("load")
    log.info("rank %d: model %s loaded in %.1f s", info.rank, first.model.name, load.duration_s)
    distributed.barrier()  # every GPU of the job at rest before the baseline
    idle = monitor.measure_idle(first.energy.idle_seconds)
    if info.rank == 0 and idle.idle_power_w is not None:
        log.info("idle baseline: %.1f W over %.1f s (rank 0's GPU)", idle.idle_power_w, idle.idle_s)
    job = {"load_gpu_j": load.gpu_j, "load_s": load.duration_s, "load_cpu_j": load.cpu_j}
    # One engine per name for the whole job: what an engine keeps (CUDA graphs) serves every cell.
    by_name = engines.create_serving([c.engine for c in cells], model)
    return Loaded(model, tokenizer, by_name, job | asdict(idle))


def run_cells(cells: list[Cell]) -> list[str]:
    """Run the cells of one placement on this rank; returns the status of each cell."""
    one_placement(cells)
    first = cells[0]
    prompt_sets = load_prompt_sets(cells)  # bad prompt files stop the job before the model loads
    info = distributed.init(first.gpu.device, first.dist_timeout_s)
    distributed.init_model_parallel(first.shards, info.world_size)
    monitor = _open_monitor(first, info)
    capper = PowerCapper(monitor.meter, monitor.reason)
    statuses = _run_loaded(cells, info, monitor, capper, prompt_sets)  # a stop signal restores the cap there too
    distributed.shutdown()  # only after a clean end: a broken group's teardown could block
    return statuses


def _run_loaded(
    cells: list[Cell], info: distributed.DistInfo, monitor: EnergyMonitor, capper: PowerCapper,
    prompt_sets: dict[DatasetConfig, list[Prompt]],
) -> list[str]:
    statuses: dict[int, str] = {}
    try:
        loaded = _load_measured(cells, info, monitor)
        runs = run_order(cells)  # each cell once per repeat, interleaved; the model stays loaded
        # A cell that another process holds is put off, then waited for once the others are done:
        # a second runner on the same cells does no harm, and a requeued job whose first attempt
        # still lives resumes that attempt's cell when it ends.
        with signals.deferred():  # from here the ranks stop together, between batches and cells
            for wait in (False, True):
                for index, cell in enumerate(runs):
                    if statuses.get(index, HELD) == HELD:
                        distributed.stop_if_asked()
                        statuses[index] = _run_held(cell, f"{index + 1}/{len(runs)}", prompt_sets[cell.dataset],
                                                    loaded, info, monitor, capper, wait=wait)
    finally:  # also when a cell or the load fails, or a signal stops the job: no GPU is left capped or clock-locked, NVML is shut down
        restore_or_log(capper)
        restore_clocks_or_log(capper.clocks)
        monitor.close()
    return [statuses[i] for i in range(len(statuses))]


def _take(cell: Cell, place: str, info: distributed.DistInfo, *, wait: bool) -> CellLock | None:
    """The cell's lock, taken by rank 0 for all ranks (they agree on run or not, or the collectives
    hang); None where another process holds it and wait is False. One line names the holder."""
    lock = CellLock(cell.sweep_dir, cell.id)
    while True:
        if distributed.broadcast_flag(info.rank == 0 and lock.try_acquire()):
            return lock
        if not wait:  # the first pass: said once here, then waited for in silence
            if info.rank == 0:
                log.warning("cell %s %s: held by %s: runs after this job's other cells, once it ends", place,
                            cell.id, lock.holder())
            return None
        time.sleep(LOCK_POLL_S)
        distributed.stop_if_asked()


def _run_held(cell: Cell, place: str, rows: list[Prompt], loaded: Loaded, info: distributed.DistInfo,
              monitor: EnergyMonitor, capper: PowerCapper, *, wait: bool) -> str:
    """_run_one under the cell's lock, held until every rank has written its record."""
    lock = _take(cell, place, info, wait=wait)
    if lock is None:
        return HELD
    try:
        return _run_one(cell, place, rows, loaded, info, monitor, capper)
    finally:
        lock.release()


def _run_one(cell: Cell, place: str, rows: list[Prompt], loaded: Loaded, info: distributed.DistInfo,
             monitor: EnergyMonitor, capper: PowerCapper) -> str:
    """One cell of the job, unless done already; its record is written; returns its status."""
    if cell.repeats > 1:
        place += f" repeat {cell.repeat + 1}/{cell.repeats}"
    if cell.repeats_auto and distributed.broadcast_flag(info.rank == 0 and _stopped(cell, info.world_size)):
        log.info("cell %s %s: not needed, repeats=auto stopped the cell (its repeats.json), skipped", place, cell.id)
        return "skipped"
    if distributed.broadcast_flag(cell_done(cell.sweep_dir, cell.id, info.world_size, cell.repeat)):
        log.info("cell %s %s: done already, skipped", place, cell.id)
        return "skipped"
    log.info("cell %s %s: started", place, cell.id)  # w2w-status reads a cell's own lines from here
    serve = run_serving_cell if cell.scenario == SERVING else None  # scenario=serving: one time series
    record, outcome = measure_cell(cell, rows, loaded, info, monitor, capper, serve)
    if not record.ok:
        log.error("cell %s failed: %s", cell.id, record.error)
    if write_record_unless_worse(cell.sweep_dir, record) is None:
        log.warning("cell %s: rank %d's ok record from an earlier run is kept (this run's %s is not written)",
                    cell.id, info.rank, record.status)
    if record.ok:  # the record holds the batches now; a failed cell resumes
        remove_progress(cell.sweep_dir, cell.id, info.rank, cell.repeat)
    log.info("cell %s %s: %s", place, cell.id, record.status)
    if distributed.worst_outcome(outcome, info) == distributed.GROUP_BROKEN:
        raise RuntimeError(
            f"cell {cell.id}: a model collective failed ({record.error}); the model-parallel "
            f"group cannot go on, so the job stops: re-run the sweep to retry the remaining cells"
        )
    last = cell.repeats_auto and cell.repeat == cell.repeats - 1
    if last and info.rank == 0 and read_stop(cell.sweep_dir, cell.id) is None:  # every rank has written
        _write_stop(cell, decide(cell, info.world_size, cell.repeats))  # tight at the last run, or the maximum
    return record.status


def _stopped(cell: Cell, world_size: int) -> bool:
    """Rank 0, repeats=auto: whether this run is not needed, because the cell stopped already or its
    runs so far are tight (then the stop file is written, once); from repeats_min runs on."""
    stop = read_stop(cell.sweep_dir, cell.id)
    if stop is not None:
        return cell.repeat >= stop.runs
    if cell.repeat < cell.repeats_min:
        return False
    stop = decide(cell, world_size, cell.repeat)
    if stop is None:
        return False
    _write_stop(cell, stop)
    return True


def _write_stop(cell: Cell, stop: Stop) -> None:
    write_stop(cell, stop)
    log.info("cell %s: repeats=auto stopped after %d runs: %s (J/token interval ±%s%%, target ±%g%%)", cell.id,
             stop.runs, stop.stopped, "n/a" if stop.interval_pct is None else f"{stop.interval_pct:.2f}",
             stop.target_pct)


def setup_logging() -> None:
    env = os.environ
    rank = env.get("RANK") or env.get("SLURM_PROCID") or env.get("SUBMITIT_LOCAL_GLOBALID") or "0"
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S", force=True
    )


def run_main(cells: list[Cell]) -> int:
    """Run composed cells as the w2w-run command does: exit 0 when every cell is ok or done already;
    a stop signal (signals.on_signals, set by the caller) ends it with 143 or 130."""
    setup_logging()
    try:
        statuses = run_cells(cells)
    except (ConfigError, EnergyError) as exc:
        print(f"w2w-run: error: {exc}", file=sys.stderr)
        return 2
    except signals.Stopped as stop:
        print(signals.stopped_line("w2w-run", stop), file=sys.stderr)
        return stop.exit_status
    return 0 if all(s in (STATUS_OK, "skipped") for s in statuses) else 1

