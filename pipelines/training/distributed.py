"""Where a training process runs: its place in a torchrun job and its device.

Without torchrun a process is rank 0 of a world of 1 (`World()`), and the training code runs the
same path with every collective skipped, as nanoGPT does: `world().size == 1` is the degenerate
case, not a second implementation. Under `torchrun --nproc-per-node N` (WORLD_SIZE > 1)
`distributed` joins the process group (NCCL on CUDA, one GPU per local rank; gloo on CPU).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pipelines.errors import ParamsError


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job; rank 0 of 1 otherwise."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0


def world() -> World:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return World()
    # torchrun's variables (its contract, read here where PyTorch reads its own), not the
    # project's: they stay out of pipelines.config.Environment
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def distributed(device: str) -> Iterator[World]:
    """Under torchrun (WORLD_SIZE > 1) join the process group for the body: NCCL on CUDA (one
    GPU per local rank), gloo on CPU. Without torchrun, nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield World()
        return
    import torch.distributed as dist

    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield world()
        dist.barrier()  # rank 0 writes the outputs while the others wait
    finally:
        dist.destroy_process_group()


def global_mean(total: torch.Tensor, seen: int) -> float:
    """sum(total) / sum(seen) over every rank."""
    import torch.distributed as dist

    both = torch.stack(
        [total.double(), torch.tensor(seen, dtype=torch.float64, device=total.device)]
    )
    dist.all_reduce(both)
    return both[0].item() / both[1].item()


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when present, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("train.device is 'cuda' but no CUDA device is available; use auto/cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun on CUDA: this rank's GPU."""
    if device.type == "cuda" and world().size > 1:
        return torch.device("cuda", world().local_rank)
    return device
