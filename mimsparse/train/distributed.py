"""Multi-process training under ``torchrun``: process-group set-up and the few collectives the
engine needs. With one process every helper is a no-op, so the engine has a single code path."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mimsparse.errors import DistributedError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, draws the progress bar and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def current() -> DistEnv:
    """The process group this process belongs to (one process when none was initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv()
    rank = dist.get_rank()
    return DistEnv(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def init_from_env(device: str) -> tuple[DistEnv, str]:
    """Join the process group that ``torchrun`` describes in RANK / WORLD_SIZE / LOCAL_RANK /
    MASTER_ADDR / MASTER_PORT: nccl on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU.
    Without torchrun (WORLD_SIZE unset or 1) nothing happens. Returns (env, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda but CUDA is not available; run with --device cpu (gloo)")
        if local >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s); "
                               f"lower torchrun --nproc_per_node")
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    return DistEnv(rank, world, local), device


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process of the job; nothing with one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (in place on a copy); identity with one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_gradients(params) -> None:
    """Mean of every gradient over processes: used when the last micro-batch of an accumulation
    window (the one DDP would have synchronised) was skipped on all ranks."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def replicas_agree(params) -> bool:
    """Whether every process holds the same parameters (compared through two checksums); DDP keeps
    them equal unless a code path forgot a gradient exchange. True with one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return True
    params = list(params)
    local = torch.stack([sum(p.detach().double().sum() for p in params),
                         sum(p.detach().double().square().sum() for p in params)])
    high, low = local.clone(), -local
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MAX)
    return bool(torch.equal(high, -low))
