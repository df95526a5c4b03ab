"""Run a function on N gloo ranks in fresh processes (FairScale's model-parallel state is global)."""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, results) -> None:
    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    try:
        results[rank] = ("ok", fn(*args))
    except BaseException:
        results[rank] = ("error", traceback.format_exc())
        raise


def run_parallel(world: int, fn, *args) -> list:
    """fn(*args) on every rank; returns the per-rank results, raising the first rank's error."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = _free_port()
        procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, results)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
        for p in procs:
            if p.is_alive():
                p.kill()
        out = [results.get(r, ("error", f"rank {r} died (exit {procs[r].exitcode})")) for r in range(world)]
    for status, value in out:
        if status != "ok":
            raise RuntimeError(value)
    return [value for _, value in out]
