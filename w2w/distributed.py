"""torch.distributed and FairScale model-parallel set-up from torchrun or SLURM/submitit variables."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    host: str
    node: str
    device: torch.device


def _export_from_launcher() -> None:
    """In a submitit task (SLURM or local), set torchrun's variables; rendezvous on the first node."""
    if "RANK" in os.environ:
        return
    if "SUBMITIT_EXECUTOR" not in os.environ:
        if "SLURM_PROCID" not in os.environ:
            return
        os.environ["SUBMITIT_EXECUTOR"] = "slurm"  # a plain srun: submitit reads the same variables
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init(device_type: str, timeout_s: int) -> DistInfo:
    """Join (or create) the process group; a single process without a launcher is world size 1."""
    _export_from_launcher()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world == 1 and "MASTER_ADDR" not in os.environ:
        os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    device = _device(device_type, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    return DistInfo(rank, local_rank, world, socket.gethostname(), node, device)


def _device(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("gpu profile asks for CUDA but no GPU is visible: set gpu=cpu or run on a GPU node")
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
        raise RuntimeError(
            f"shards={shards} but {world_size} process(es) started: launch one process per shard "
            f"(w2w-sweep does; with torchrun use --nproc-per-node {shards})"
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


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
