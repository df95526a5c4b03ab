"""torch.distributed and FairScale model-parallel set-up from torchrun or SLURM/submitit variables."""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import socket
from dataclasses import dataclass
from typing import Any

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

from w2w import signals
from w2w.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    host: str
    node: str
    device: torch.device
    # A gloo group for the runner's own agreements, apart from the model's collectives, so
    # that a rank which failed alone cannot be matched with a peer stuck mid-forward.
    control: Any = None


CONTROL_TIMEOUT_S = 120
# Outcomes of a cell on one rank, ordered: the job goes on unless some rank broke the group.
CELL_OK, CELL_FAILED, GROUP_BROKEN = 0, 1, 2


def _job_port(job_id: str) -> int:
    """A rendezvous port every task of the job derives alike, below Linux's ephemeral range
    (32768-60999) so that no outgoing connection on the first node can already hold it."""
    return 20000 + int(hashlib.sha256(job_id.encode()).hexdigest(), 16) % 12000


def _export_from_launcher() -> None:
    """In a submitit task (SLURM or local), set torchrun's variables; rendezvous on the first node."""
    if "RANK" in os.environ:
        return
    if "SUBMITIT_EXECUTOR" not in os.environ:
        if "SLURM_PROCID" not in os.environ:
            return
        os.environ["SUBMITIT_EXECUTOR"] = "slurm"  # a plain srun: submitit reads the same variables
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    if env.world_size == 1:
        env.master_addr, env.master_port = "127.0.0.1", _free_port()
    elif "MASTER_PORT" not in os.environ:
        env.master_port = _job_port(str(JobEnvironment().job_id))
    env.export(set_cuda_visible_devices=False, overwrite=True)


def init(device_type: str, timeout_s: int) -> DistInfo:
    """Join (or create) the process group; a single process without a launcher is world size 1."""
    _export_from_launcher()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # Alone, without a launcher: a private rendezvous (the environment stays untouched, so
    # processes started from here do not inherit a port that this one holds).
    alone = world == 1 and "MASTER_ADDR" not in os.environ
    device = _device(device_type, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{_free_port()}" if alone else "env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    control = None
    if world > 1:
        wait = datetime.timedelta(seconds=min(timeout_s, CONTROL_TIMEOUT_S))
        control = dist.new_group(backend="gloo", timeout=wait)
    return DistInfo(rank, local_rank, world, socket.gethostname(), node, device, control)


def _device(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cpu":
        # Ranks on one node share its cores: oversubscribed threads spin against each other.
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // ranks_here))
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("gpu profile asks for CUDA but no GPU is visible: set gpu=cpu or run on a GPU node")
    # SLURM binds one GPU per task (CUDA_VISIBLE_DEVICES has one entry) or shows the node's GPUs.
    index = local_rank if torch.cuda.device_count() > 1 else 0
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_model_parallel(shards: int, world_size: int) -> None:
    if world_size != shards:
        raise ConfigError(
            f"shards={shards} but {world_size} process(es) started: launch one process per shard "
            f"(w2w-sweep does; or start it with torchrun --nproc-per-node {shards})"
        )
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(shards)


def _flag(flag: bool) -> torch.Tensor:
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return torch.tensor([int(flag)], device=device)


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's decision, seen by every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = _flag(flag)
    dist.broadcast(t, src=0)
    return bool(t.item())


def all_ok(flag: bool) -> bool:
    """True only if every rank says True."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = _flag(flag)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def agreed_min(value: int) -> int:
    """The smallest value over all ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = _flag(False)
    t.fill_(value)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def stop_if_asked() -> None:
    """Raise signals.Stopped on every rank if any rank received SIGTERM or SIGINT (one small collective:
    the ranks stop together, none is left waiting in the next collective)."""
    agreed = -agreed_min(-(signals.requested() or 0))
    signals.check(agreed or None)


def broadcast_int(value: int) -> int:
    """Rank 0's integer, seen by every rank (a serving cell's admission count before each step)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = _flag(False)
    t.fill_(value)
    dist.broadcast(t, src=0)
    return int(t.item())


def sum_over_ranks(value: float | None) -> float | None:
    """The sum of a figure over every rank; None where any rank has none."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = _flag(False).double()
    t.fill_(math.nan if value is None else value)
    dist.all_reduce(t)
    return None if math.isnan(t.item()) else float(t.item())


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Tear the groups down before the interpreter does: gloo can abort a rank whose group is
    destroyed at exit ("terminate called without an active exception"), and SLURM then marks a
    job whose cells all finished FAILED."""
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_collective_error(exc: BaseException) -> bool:
    """A failed or timed-out collective: the model-parallel group is out of step."""
    if isinstance(exc, getattr(dist, "DistError", ())):  # torch >= 2.2; older ones by their text
        return True
    text = str(exc)
    return any(word in text for word in ("gloo", "NCCL", "Connection closed", "Timed out"))


def worst_outcome(outcome: int, info: DistInfo) -> int:
    """The worst cell outcome over all ranks, agreed on the control group.

    A rank that failed alone leaves its peers blocked in a model collective: they never reach
    this call, it times out, and the job must stop rather than hold the allocation.
    """
    if info.control is None:
        return outcome
    t = torch.tensor([outcome])
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.control)
    except Exception as exc:
        raise RuntimeError(
            f"rank {info.rank}: the other ranks did not finish the cell (no answer within "
            f"the control timeout): a rank failed alone or died; "
            f"see the cell's records and the other ranks' logs"
        ) from exc
    return int(t.item())
