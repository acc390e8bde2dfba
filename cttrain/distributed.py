"""Data-parallel training across processes (torchrun): process-group setup and small collectives.

`torchrun --nproc_per_node N -m cttrain fold 0` starts N processes with RANK, WORLD_SIZE and
LOCAL_RANK in the environment; `setup` joins them into one process group (NCCL on CUDA, gloo on
CPU, or gloo on CUDA with `training.ddp_backend=gloo`) and picks each process's device: under
torchrun the local rank decides it, cuda:LOCAL_RANK. Without those variables everything here
degrades to a single process and the collectives return their input, so the training code has one
path. Either way the chosen GPU becomes the process's current CUDA device.

Rank 0 alone writes files (checkpoints, logs, results); the others wait at a barrier.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """A multi-process setup problem (bad environment, device count)."""


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


BACKENDS = ("auto", "nccl", "gloo")


def resolve_device(name: str, local_rank: int = 0, torchrun: bool = False) -> torch.device:
    """`auto` -> cuda:LOCAL_RANK when CUDA is available, else cpu; `cuda` -> cuda:LOCAL_RANK.

    Under torchrun every CUDA name means cuda:LOCAL_RANK: an explicit `cuda:N` would put every rank
    on GPU N (choose a node's GPUs with CUDA_VISIBLE_DEVICES instead)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DistributedError(f"training.device is '{name}' but CUDA is not available on this machine")
    if name == "cuda" or (torchrun and name.startswith("cuda")):
        return torch.device("cuda", local_rank)
    return torch.device(name)


def use_device(dev: torch.device) -> None:
    """Make `dev` this process's current CUDA device (a no-op on CPU).

    The DataLoader's pin-memory thread, default allocations and the bf16 check follow the current
    device; left at GPU 0, a `cv --devices 0,1` fold on cuda:1 would put all of those on GPU 0."""
    if dev.type != "cuda":
        return
    count = torch.cuda.device_count()
    if (dev.index or 0) >= count:
        raise DistributedError(f"training.device is {dev} but only {count} GPU(s) are visible")
    torch.cuda.set_device(dev)


def _backend(name: str, dev: torch.device) -> str:
    if name not in BACKENDS:
        raise DistributedError(f"training.ddp_backend must be one of {', '.join(BACKENDS)}; got '{name}'")
    if name == "nccl" and dev.type != "cuda":
        raise DistributedError("training.ddp_backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
    return ("nccl" if dev.type == "cuda" else "gloo") if name == "auto" else name


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def setup(device: str = "auto", timeout_s: float = 1800.0, backend: str = "auto") -> DistContext:
    """Join the process group described by RANK / WORLD_SIZE / LOCAL_RANK (idempotent).

    NCCL needs one GPU per process; with `backend="gloo"` ranks beyond the visible GPUs share them
    (rank r on cuda:r % count), slow but enough to check the DDP path on a single GPU."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    if world <= 1:
        dev = resolve_device(device, 0)
        use_device(dev)
        return DistContext(0, 1, 0, dev)
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={world}")
    dev = resolve_device(device, local_rank, torchrun=True)
    backend = _backend(backend, dev)
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count and backend == "nccl":
            raise DistributedError(f"LOCAL_RANK={local_rank} but only {count} GPU(s) are visible: NCCL needs "
                                   "one GPU per process (start fewer, or share GPUs with "
                                   "training.ddp_backend=gloo)")
        dev = torch.device("cuda", local_rank % count)
        use_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world, local_rank, dev)


def shutdown() -> None:
    """Leave the process group; the CLI calls this when every command ends, also on errors."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_gather_object(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list without DDP)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Element-wise sum of a short list of numbers over ranks."""
    if not ctx.enabled:
        return list(values)
    dev = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_buffers(ctx: DistContext, module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each training forward, so after the last step every rank
    holds statistics updated by its own batch; evaluating then would mix models across ranks."""
    if not ctx.enabled:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)
