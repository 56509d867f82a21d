"""The training loop: seeded setup, batches, epochs with validation, early stopping.

`make_loop` builds the objects a run steps (`Loop`: model, AdamW, the LR schedule, the shuffle
generator); `fit` runs epochs until the configured count or early stopping, recording each into
`State` (history, best weights) and calling `save` (the checkpoint) and `on_epoch` after each.
Under torchrun the same code runs on every rank: `ShuffledBatches` gives each rank its slice of
every batch and `Loop.ddp` (the DistributedDataParallel wrapper) averages the gradients; with a
world of 1 both are no-ops (see `pipelines.training.distributed`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from pipelines.config import TrainConfig
from pipelines.errors import PipelineError
from pipelines.host import StopRequested, TrainingGate
from pipelines.models import cpu_copy, load_weights, rebuild
from pipelines.training.data import Data
from pipelines.training.distributed import global_mean, world
from pipelines.training.progress import Progress

log = logging.getLogger("pipelines.train")  # the stage's log lines, whichever module writes them
OnEpoch = Callable[[int, dict[str, float]], None]
# The training objective: (logits, model input, class indices) -> scalar loss. Cross-entropy by
# default; knowledge distillation (pipelines/distill.py) passes its own.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


@dataclass
class Loop:
    """The objects one training run steps, and where it runs."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    shuffle: torch.Generator
    device: torch.device
    bf16: bool
    loss: LossFn = cross_entropy
    ddp: nn.Module | None = None  # the DistributedDataParallel wrapper under torchrun
    # Honoured after every optimizer step (pipelines/host.py): pauses, thread changes, stops.
    gate: TrainingGate | None = None


@dataclass
class EpochProgress:
    """How far a run got into an epoch it was stopped in (`StopRequested`): the shuffle
    generator's state at the epoch's start (a resumed run draws the same permutation and skips
    the batches done), optimizer steps done, the training loss summed over their rows, those
    rows, and the seconds spent."""

    shuffle: torch.Tensor
    steps: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    seconds: float = 0.0


@dataclass
class State:
    """What changes from epoch to epoch besides the weights: early stopping and the history."""

    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    progress: EpochProgress | None = None  # set while an epoch runs (and in a mid-epoch checkpoint)

    def finished(self, epochs: int) -> bool:
        return self.stopped_early or self.epoch >= epochs


def fitted_to(cfg: TrainConfig, train_rows: int) -> TrainConfig:
    """`cfg` for a training split of `train_rows` rows: `batch_size` (the global batch) capped at
    rows // min_batches_per_epoch, so an epoch is at least that many optimizer steps and a run of
    E epochs at least E x that many; early stopping and the schedule count epochs. E.g. 124 rows:
    batches of 7, not 64 (18 steps an epoch instead of 2). The digits (1257 training rows,
    cap 78) keep their 64. `cfg` itself when nothing changes."""
    batch = max(1, min(cfg.batch_size, train_rows // cfg.min_batches_per_epoch))
    return cfg if batch == cfg.batch_size else cfg.model_copy(update={"batch_size": batch})


def make_loop(cfg: TrainConfig, args: dict[str, Any], device: torch.device) -> Loop:
    """Seed every RNG, then build the model, AdamW and the LR schedule."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    model = rebuild(args)
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    bf16 = cfg.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()
    if cfg.bf16 and device.type == "cuda" and not bf16:
        log.warning("train: this GPU has no bf16 support; training in fp32 (train.bf16 ignored)")
    return Loop(model, optimizer, make_scheduler(optimizer, cfg), shuffle, device, bf16)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch: cosine from lr to 0 over the configured epochs, or constant."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


class ShuffledBatches(Sampler[torch.Tensor]):
    """Each epoch, a permutation drawn from the run's generator, cut into index tensors: one
    index per batch, so the loader fetches a batch in one indexing op.

    Under torchrun every rank draws the same permutation (same seed) and takes its own slice of
    each batch: `batch_size` stays the global batch, whatever the number of processes."""

    def __init__(
        self, size: int, batch_size: int, generator: torch.Generator, rank: int = 0, ranks: int = 1
    ) -> None:
        self.size, self.batch_size, self.generator = size, batch_size, generator
        self.rank, self.ranks = rank, ranks
        self.skip = 0  # batches of the next epoch already trained on (a mid-epoch resume)

    def __iter__(self) -> Iterator[torch.Tensor]:
        # A generator: the permutation is drawn at the first batch, not when DataLoader calls
        # iter() (it does so twice when starting worker processes; an eager draw would skip one).
        batches = torch.randperm(self.size, generator=self.generator).split(self.batch_size)
        batches, self.skip = batches[self.skip :], 0
        if self.ranks == 1:
            yield from batches
            return
        for batch in batches:  # a last batch too small to give every rank a row is dropped
            if len(batch) >= self.ranks:
                yield batch.tensor_split(self.ranks)[self.rank]

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)


def make_loader(data: Data, cfg: TrainConfig, loop: Loop) -> DataLoader[Any]:
    """Batch-level fetching from a TensorDataset, or from the image files (`Data.train_images`)
    (`batch_size=None`: the sampler yields whole batches; a worker decodes a whole batch);
    pinned memory and persistent workers keep a GPU fed."""
    place = world()
    dataset = data.train_images or TensorDataset(data.x_train, data.y_train)
    return DataLoader(
        dataset,
        sampler=ShuffledBatches(
            len(data.y_train), cfg.batch_size, loop.shuffle, place.rank, place.size
        ),
        batch_size=None,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=loop.device.type == "cuda",
        # Seeds worker processes only; a generator of its own keeps the global RNG untouched.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def autocast(loop: Loop) -> contextlib.AbstractContextManager[Any]:
    if loop.bf16:
        return torch.autocast(device_type=loop.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fit(
    cfg: TrainConfig,
    loop: Loop,
    data: Data,
    state: State,
    save: Callable[[], None],
    on_epoch: OnEpoch | None,
) -> None:
    """Epochs until the configured count or early stopping; `save` after each. A stop asked
    through the loop's gate (`StopRequested`, e.g. SIGTERM) is honoured at the next optimizer
    step: `save` writes a mid-epoch checkpoint (`State.progress`), then it is raised again."""
    loader = make_loader(data, cfg, loop)
    val = (data.x_val.to(loop.device), data.y_val.to(loop.device))
    progress = Progress(cfg.epochs, state.epoch, quiet=world().rank != 0)
    try:
        while not state.finished(cfg.epochs):
            row = run_epoch(loop, loader, val, cfg, state)
            check_finite(row, state.epoch + 1)  # before the epoch is recorded or checkpointed
            record(state, row, loop, cfg)
            save()
            progress.update(state.epoch, row)
            if on_epoch is not None:
                on_epoch(state.epoch, row)
    except StopRequested as stop:
        save()
        done = state.progress.steps if state.progress else 0
        log.info(
            "train: stopped (%s) in epoch %d after %d optimizer steps; checkpoint saved, the "
            "next run resumes from it",
            stop,
            state.epoch + 1,
            done,
        )
        raise
    finally:
        progress.close()
    if state.stopped_early:
        log.info(
            "train: early stop after epoch %d (no val-loss gain > %g for %d epochs); best epoch %d",
            state.epoch,
            cfg.min_delta,
            cfg.patience,
            state.best_epoch,
        )


def run_epoch(
    loop: Loop,
    loader: DataLoader[Any],
    val: tuple[torch.Tensor, torch.Tensor],
    cfg: TrainConfig,
    state: State,
) -> dict[str, float]:
    """Train one epoch (or its rest, after a mid-epoch resume: `state.progress`), step the
    schedule, validate: the epoch's history row."""
    start = time.perf_counter()
    progress = state.progress or EpochProgress(loop.shuffle.get_state())
    if progress.steps:  # the same permutation as before the stop, less the batches done
        loop.shuffle.set_state(progress.shuffle)
        sampler = loader.sampler
        if isinstance(sampler, ShuffledBatches):
            sampler.skip = progress.steps
    state.progress = progress
    lr = float(loop.optimizer.param_groups[0]["lr"])
    try:
        train_loss = train_epoch(loop, loader, progress)
    except StopRequested:
        progress.seconds += time.perf_counter() - start
        raise
    state.progress = None
    loop.scheduler.step()
    val_loss, val_accuracy = evaluate(loop, *val, cfg.batch_size)
    return {
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "lr": lr,
        "seconds": progress.seconds + time.perf_counter() - start,
    }


def train_epoch(loop: Loop, loader: DataLoader[Any], progress: EpochProgress) -> float:
    """One pass over the loader (the rest of it after a mid-epoch resume); the loss is summed on
    the device and read once at the end (under torchrun: summed over every rank). After every
    optimizer step the loop's gate may block (paused) or raise StopRequested; `progress` then
    holds the steps, loss and rows so far."""
    loop.model.train()
    model = loop.model if loop.ddp is None else loop.ddp  # DDP averages the gradients
    total = torch.full((), progress.loss_sum, device=loop.device)
    seen = progress.seen
    for x_host, y_host in loader:
        xb = x_host.to(loop.device, non_blocking=True)
        yb = y_host.to(loop.device, non_blocking=True)
        with autocast(loop):
            loss = loop.loss(model(xb), xb, yb)
        loop.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loop.optimizer.step()
        total.add_(loss.detach(), alpha=len(yb))
        seen += len(yb)
        progress.steps += 1
        if loop.gate is not None:
            try:
                loop.gate.boundary()
            except StopRequested:
                progress.loss_sum, progress.seen = total.item(), seen
                raise
    if loop.ddp is not None:
        return global_mean(total, seen)
    return total.item() / seen


@torch.no_grad()
def evaluate(loop: Loop, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of (x, y), already on the loop's device."""
    loop.model.eval()
    loss = torch.zeros((), device=loop.device)
    correct = torch.zeros((), dtype=torch.int64, device=loop.device)
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        with autocast(loop):
            logits = loop.model(xb).float()
        loss += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(dim=1) == yb).sum()
    return loss.item() / len(x), correct.item() / len(x)


def record(state: State, row: dict[str, float], loop: Loop, cfg: TrainConfig) -> None:
    """Append the row; keep the weights when val loss improved by more than min_delta."""
    state.epoch += 1
    state.history.append({"epoch": state.epoch, **row})
    if row["val_loss"] < state.best_loss - cfg.min_delta:
        state.best_loss, state.best_epoch, state.bad_epochs = row["val_loss"], state.epoch, 0
        state.best_weights = cpu_copy(loop.model.state_dict())
    else:
        state.bad_epochs += 1
        state.stopped_early = state.bad_epochs >= cfg.patience


def check_finite(row: dict[str, float], epoch: int) -> None:
    """Raise `PipelineError` when the epoch's training or validation loss is NaN or infinite:
    a diverged run is rejected where it is first seen, not trained on to a chance-level model."""
    for key in ("train_loss", "val_loss"):
        if not math.isfinite(row[key]):
            raise PipelineError(
                f"train: epoch {epoch}: {key} is {row[key]} (the training diverged); "
                "lower train.lr or check the data"
            )
