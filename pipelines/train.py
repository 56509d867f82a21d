"""`train`: fit the configured architecture on the prepared splits, keep the best-val-loss weights.

Reads the `prepare` folder (train/val .parquet + manifest.json), converts rows with the shared
preprocessing, and trains with AdamW, a cosine or constant LR schedule and early stopping on the
validation loss. After every epoch it writes a checkpoint (model, optimizer, scheduler, every RNG,
early-stopping state, best weights, history) atomically into `--checkpoint-dir` (see
`CheckpointDir`), so a killed run started again resumes from the newest readable checkpoint and
ends with the same numbers as an uninterrupted one (on CPU). The run holds its checkpoint dir
alone: a second process training into it fails at once naming the holder's PID.

Under `torchrun --nproc-per-node N -m pipelines.train ...` it trains with DistributedDataParallel
(gloo on CPU, NCCL on GPU; `batch_size` stays the global batch): rank 0 alone tracks and writes
checkpoints and outputs (see `distributed`). `--tuned` applies the `tune` stage's best values on
top of the `train` section when `tune.enabled`.

Outputs (paths from the command line, see `main`): the model file (best state_dict + the args that
rebuild it + metadata; read it back with `load_model`), `metrics/train.json`, the per-epoch CSV for
DVC's training-curve plot, and in MLflow the per-epoch metrics (`epoch.<name>`, step = epoch), the
summary metrics (same names as the JSON), the model file, the CSV and an MLflow pytorch model.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from pipelines.artifacts import atomic_path, write_json
from pipelines.cli import run_cli
from pipelines.config import Params, TrainConfig, load_params, section_dict
from pipelines.errors import CheckpointError, DataSourceError, ParamsError, PipelineError
from pipelines.lifecycle import exclusive
from pipelines.models import build_model
from pipelines.prepare import read_manifest
from pipelines.preprocessing import to_model_input

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.tracking import StageRun

MODEL_FORMAT = "mlops-train-model/1"
CHECKPOINT_FORMAT = "mlops-train-checkpoint/2"  # torch.save of a plain dict
CHECKPOINT_FILE = re.compile(r"epoch-(\d+)\.ckpt")  # one per epoch; the newest two are kept
# Settings that do not change the numbers a run produces: changing them keeps a checkpoint usable.
NOT_FINGERPRINTED = ("resume", "num_workers")
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds")
PLOT_COLUMNS = HISTORY_FIELDS[:-1]  # the training-curve CSV
EXAMPLE_ROWS = 4  # rows in the MLflow input example: > 1 keeps the batch axis dynamic

log = logging.getLogger(__name__)
OnEpoch = Callable[[int, dict[str, float]], None]
# The training objective: (logits, model input, class indices) -> scalar loss. Cross-entropy by
# default; knowledge distillation (pipelines/distill.py) passes its own.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


@dataclass
class TrainResult:
    """The trained model (best weights, CPU, eval mode) and everything written about it."""

    model: nn.Module
    model_args: dict[str, Any]
    metadata: dict[str, Any]
    history: list[dict[str, float]]
    metrics: dict[str, Any]


@dataclass
class Data:
    """Model-ready tensors of the train and val splits (on the host)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


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

    def finished(self, epochs: int) -> bool:
        return self.stopped_early or self.epoch >= epochs


# --- inputs -----------------------------------------------------------------------------------


def split_arrays(
    frame: pd.DataFrame, manifest: dict[str, Any], name: str, source: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Model input (N, *input_shape) float32 and class indices (position in manifest labels)."""
    label = manifest["label_column"]
    index = {value: i for i, value in enumerate(manifest["labels"])}
    classes = frame[label].map(index)
    if classes.isna().any():
        unknown = sorted(map(str, frame.loc[classes.isna(), label].unique()))
        raise DataSourceError(
            f"{name} split: label values {', '.join(unknown)} are not in the manifest's labels "
            f"{manifest['labels']}; fix data.labels in params.yaml or the data"
        )
    rows = frame[manifest["feature_columns"]]
    x = to_model_input(rows, manifest["preprocessing"], source or f"{name} split")
    return x, np.array(classes, dtype=np.int64)  # a writable copy for torch


def load_data(prepared_dir: Path, manifest: dict[str, Any]) -> Data:
    from pipelines.prepare import read_split

    tensors: list[torch.Tensor] = []
    for name in ("train", "val"):
        frame = read_split(prepared_dir, name)
        if frame.empty:
            raise DataSourceError(f"{prepared_dir}: the {name} split has no rows; add data")
        x, y = split_arrays(frame, manifest, name, f"{prepared_dir} ({name} split)")
        tensors += [torch.from_numpy(x), torch.from_numpy(y)]
    return Data(*tensors)


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun on CUDA: this rank's GPU."""
    if device.type == "cuda" and world().size > 1:
        return torch.device("cuda", world().local_rank)
    return device


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when present, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("train.device is 'cuda' but no CUDA device is available; use auto/cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def model_args(cfg: TrainConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """The construction args stored with checkpoints and models: build_model(arch, **kwargs)."""
    kwargs = {
        "input_shape": list(manifest["preprocessing"]["input_shape"]),
        "num_classes": len(manifest["labels"]),
        "width": cfg.model.width,
        "depth": cfg.model.depth,
        "dropout": cfg.model.dropout,
    }
    return {"arch": cfg.model.arch, "kwargs": kwargs}


def rebuild(args: dict[str, Any]) -> nn.Module:
    kwargs = dict(args["kwargs"])
    kwargs["input_shape"] = tuple(kwargs["input_shape"])
    return build_model(args["arch"], **kwargs)


def fingerprint(cfg: TrainConfig, content_hash: str, objective: str = "") -> str:
    """Identifies what a run computes: the train section (less NOT_FINGERPRINTED), the data, and
    a non-default objective's description (e.g. the teacher and settings of a distillation)."""
    section = {k: v for k, v in section_dict(cfg).items() if k not in NOT_FINGERPRINTED}
    blob = json.dumps(
        {"train": section, "data": content_hash, "objective": objective}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


# --- the loop ---------------------------------------------------------------------------------


def make_loop(cfg: TrainConfig, args: dict[str, Any], device: torch.device) -> Loop:
    """Seed every RNG, then build the model, AdamW and the LR schedule."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    model = rebuild(args).to(device)
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

    def __iter__(self) -> Iterator[torch.Tensor]:
        # A generator: the permutation is drawn at the first batch, not when DataLoader calls
        # iter() (it does so twice when starting worker processes; an eager draw would skip one).
        batches = torch.randperm(self.size, generator=self.generator).split(self.batch_size)
        if self.ranks == 1:
            yield from batches
            return
        for batch in batches:  # a last batch too small to give every rank a row is dropped
            if len(batch) >= self.ranks:
                yield batch.tensor_split(self.ranks)[self.rank]

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)


def make_loader(data: Data, cfg: TrainConfig, loop: Loop) -> DataLoader[Any]:
    """Batch-level fetching from a TensorDataset (`batch_size=None`: the sampler yields whole
    batches); pinned memory and persistent workers keep a GPU fed."""
    place = world()
    return DataLoader(
        TensorDataset(data.x_train, data.y_train),
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


def train_epoch(loop: Loop, loader: DataLoader[Any]) -> float:
    """One pass over the loader; the loss is summed on the device and read once at the end
    (under torchrun: summed over every rank)."""
    loop.model.train()
    model = loop.model if loop.ddp is None else loop.ddp  # DDP averages the gradients
    total = torch.zeros((), device=loop.device)
    seen = 0
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


def run_epoch(
    loop: Loop, loader: DataLoader[Any], val: tuple[torch.Tensor, torch.Tensor], cfg: TrainConfig
) -> dict[str, float]:
    """Train one epoch, step the schedule, validate: the epoch's history row."""
    start = time.perf_counter()
    lr = float(loop.optimizer.param_groups[0]["lr"])
    train_loss = train_epoch(loop, loader)
    loop.scheduler.step()
    val_loss, val_accuracy = evaluate(loop, *val, cfg.batch_size)
    return {
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "lr": lr,
        "seconds": time.perf_counter() - start,
    }


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


def cpu_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


# --- checkpoints ------------------------------------------------------------------------------


def rng_state(loop: Loop) -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and plain data (loadable with weights_only)."""
    numpy_state = np.random.get_state(legacy=False)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if loop.device.type == "cuda" else [],
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": {
            "version": version,
            "state": torch.from_numpy(np.array(internal, dtype=np.int64)),
            "gauss": gauss_next,
        },
        "shuffle": loop.shuffle.get_state(),
    }


def set_rng_state(loop: Loop, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and loop.device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state["numpy"]
    key = saved["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, saved["pos"], saved["has_gauss"], saved["gauss"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    loop.shuffle.set_state(state["shuffle"])


def checkpoint(
    loop: Loop, state: State, args: dict[str, Any], fp: str, finished: bool
) -> dict[str, Any]:
    """Everything needed to continue the run exactly; `finished` marks its last epoch."""
    return {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fp,
        "model_args": args,
        "epoch": state.epoch,
        "finished": finished,
        "model": loop.model.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "rng": rng_state(loop),
        "early_stopping": {
            "best_loss": state.best_loss,
            "best_epoch": state.best_epoch,
            "bad_epochs": state.bad_epochs,
            "stopped_early": state.stopped_early,
        },
        # None: the best weights are this epoch's (most epochs improve: one copy less to write).
        "best_weights": None if state.best_epoch == state.epoch else state.best_weights,
        "history": state.history,
    }


def save_torch(path: Path, content: Any) -> None:
    """`torch.save` through an open handle of a temp file, then os.replace: a kill leaves the
    old file or the new one, whole. Through a handle the archive's inner name is always
    `archive` (a file name would be recorded), so the same content gives the same bytes."""
    with atomic_path(Path(path)) as tmp, tmp.open("wb") as handle:
        torch.save(content, handle)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `CheckpointDir.save`, its tensors on the CPU.

    Raises CheckpointError when the file is unreadable (truncated, not a checkpoint) or holds
    anything but tensors and plain data (weights_only: loading runs no code)."""
    content = read_torch(path, "cannot be read")
    if not isinstance(content, dict) or content.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a train checkpoint ({CHECKPOINT_FORMAT})")
    return content


def read_torch(path: Path | str, what: str) -> Any:
    """`torch.load` of `path` on the CPU with `weights_only=True` (tensors and plain data only:
    loading runs no code). Raises CheckpointError "`path`: `what`: <one-line reason>" when the
    file is missing, truncated or not a torch file."""
    try:
        with Path(path).open("rb") as handle:
            return torch.load(handle, map_location="cpu", weights_only=True)
    except (
        OSError,
        EOFError,
        RuntimeError,
        ValueError,
        struct.error,
        pickle.UnpicklingError,
    ) as exc:
        raise CheckpointError(f"{path}: {what}: {load_error(exc)}") from exc


def load_error(exc: Exception) -> str:
    """The gist of a torch.load error in one line (weights_only refusals run to a page)."""
    text = str(exc).split("WeightsUnpickler error: ")[-1].strip()
    return text.splitlines()[0] if text else type(exc).__name__


def checkpoint_files(checkpoint_dir: Path) -> list[Path]:
    """The checkpoint files in `checkpoint_dir`, oldest epoch first."""
    found = [
        p for p in Path(checkpoint_dir).glob("epoch-*.ckpt") if CHECKPOINT_FILE.fullmatch(p.name)
    ]
    return sorted(found, key=epoch_of)


def epoch_of(path: Path) -> int:
    return int(path.name[len("epoch-") : -len(".ckpt")])


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    files = checkpoint_files(checkpoint_dir)
    return files[-1] if files else None


class CheckpointDir:
    """A run's checkpoints: `epoch-00012.ckpt`, one per epoch (see `save_torch`); after each
    save the new one and the newest older one are kept. Its owner holds it alone (`exclusive`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".epoch-*.tmp"):  # a killed run's half-written file
            stale.unlink()

    def newest_readable(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that reads back, and its content. Unreadable newer ones (a
        kill mid-write on a file system that reorders writes, a disk error) are skipped with a
        warning naming them; they are removed by the next `save`."""
        for path in reversed(checkpoint_files(self.directory)):
            try:
                return path, read_checkpoint(path)
            except CheckpointError as exc:
                log.warning("train: skipping %s (%s)", path, exc)
        return None

    def clear(self) -> None:
        for path in checkpoint_files(self.directory):
            path.unlink(missing_ok=True)

    def save(self, content: dict[str, Any]) -> Path:
        """Write epoch `content["epoch"]`; then remove all but it and the newest older one
        (files of later epochs are the unreadable ones a resume skipped)."""
        path = self.directory / f"epoch-{content['epoch']:05d}.ckpt"
        save_torch(path, content)
        older = [p for p in checkpoint_files(self.directory) if epoch_of(p) < content["epoch"]]
        for stale in checkpoint_files(self.directory):
            if stale != path and stale not in older[-1:]:
                stale.unlink(missing_ok=True)
        return path


def usable_checkpoint(
    checkpoints: CheckpointDir, fp: str, resume: bool
) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint to resume from, or None (and a log line saying why the
    run starts fresh)."""
    if not checkpoint_files(checkpoints.directory):
        return None
    if not resume:
        log.info(
            "train: train.resume is false; starting fresh (ignoring %s)", checkpoints.directory
        )
        return None
    found = checkpoints.newest_readable()
    if found is None:
        log.warning("train: no readable checkpoint in %s; starting fresh", checkpoints.directory)
        return None
    path, content = found
    if content["fingerprint"] != fp:
        log.warning(
            "train: %s was made with other params or data (fingerprint %s, now %s); starting fresh",
            path,
            content["fingerprint"][:12],
            fp[:12],
        )
        return None
    if content["finished"]:
        log.info("train: %s is of a finished run; starting fresh", path)
        return None
    return path, content


def restore(loop: Loop, content: dict[str, Any]) -> State:
    loop.model.load_state_dict(content["model"])
    loop.optimizer.load_state_dict(content["optimizer"])
    loop.scheduler.load_state_dict(content["scheduler"])
    set_rng_state(loop, content["rng"])
    stopping = content["early_stopping"]
    return State(
        epoch=content["epoch"],
        best_loss=stopping["best_loss"],
        best_epoch=stopping["best_epoch"],
        bad_epochs=stopping["bad_epochs"],
        stopped_early=stopping["stopped_early"],
        best_weights=content["best_weights"] or cpu_copy(content["model"]),
        history=content["history"],
    )


def start_state(
    loop: Loop, checkpoints: CheckpointDir, fp: str, resume: bool
) -> tuple[State, int | None]:
    """The state restored from the newest usable checkpoint (and its epoch), or a fresh one
    (and None; the checkpoints, of another run, are removed)."""
    found = usable_checkpoint(checkpoints, fp, resume)
    if found is None:
        checkpoints.clear()
        return State(), None
    path, content = found
    state = restore(loop, content)
    log.info("train: resuming from epoch %d of %s", state.epoch, path)
    return state, state.epoch


# --- scale-out: torchrun and DistributedDataParallel ------------------------------------------


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


def shared_start(
    loop: Loop, checkpoint_dir: Path, fp: str, resume: bool
) -> tuple[CheckpointDir | None, State, int | None]:
    """Rank 0 owns `checkpoint_dir` (and alone writes it); under torchrun it sends the checkpoint
    it resumes from to every rank (no shared file system needed), then the model is wrapped in
    DistributedDataParallel."""
    place = world()
    if place.size == 1:
        checkpoints = CheckpointDir(checkpoint_dir)
        return checkpoints, *start_state(loop, checkpoints, fp, resume)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    owner = CheckpointDir(checkpoint_dir) if place.rank == 0 else None
    found: list[tuple[Path, dict[str, Any]] | None] = [None]
    if owner is not None:
        found[0] = usable_checkpoint(owner, fp, resume)
        if found[0] is None:
            owner.clear()
    dist.broadcast_object_list(found, src=0)
    state = State() if found[0] is None else restore(loop, found[0][1])
    resumed_from = None if found[0] is None else state.epoch
    if found[0] is not None and owner is not None:
        log.info("train: resuming from epoch %d of %s on every rank", state.epoch, found[0][0])
    ids = [place.local_rank] if loop.device.type == "cuda" else None
    loop.ddp = DistributedDataParallel(loop.model, device_ids=ids)
    return owner, state, resumed_from


# --- progress ---------------------------------------------------------------------------------


class Progress:
    """A tqdm bar on a terminal; otherwise one log line per epoch."""

    def __init__(self, epochs: int, done: int, quiet: bool = False) -> None:
        from tqdm import tqdm

        self.epochs, self.quiet = epochs, quiet
        tty = sys.stderr.isatty() and not quiet
        self.bar = tqdm(total=epochs, initial=done, desc="train", unit="epoch") if tty else None

    def update(self, epoch: int, row: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                train_loss=f"{row['train_loss']:.4f}",
                val_loss=f"{row['val_loss']:.4f}",
                val_acc=f"{row['val_accuracy']:.4f}",
                refresh=False,
            )
            self.bar.update(1)
            return
        if self.quiet:
            return
        log.info(
            "train: epoch %d/%d train_loss %.4f val_loss %.4f val_acc %.4f lr %.3g %.2fs",
            epoch,
            self.epochs,
            row["train_loss"],
            row["val_loss"],
            row["val_accuracy"],
            row["lr"],
            row["seconds"],
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- the stage function -----------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    prepared_dir: Path,
    checkpoint_dir: Path,
    on_epoch: OnEpoch | None = None,
    objective: tuple[LossFn, str] | None = None,
) -> TrainResult:
    """Train on `prepared_dir`, checkpointing into `checkpoint_dir` after every epoch (resuming
    from there when `cfg.resume` and the fingerprint match). `on_epoch(epoch, row)` is called
    after each epoch, once its checkpoint is written. `objective` = (loss, description) replaces
    cross-entropy; the description enters the checkpoint fingerprint.

    Under torchrun (see `distributed`) every rank calls this: DDP, each rank a slice of every
    batch, and rank 0 alone writes checkpoints.

    The process that writes `checkpoint_dir` holds it alone for the run: raises InUseError
    ("<checkpoint_dir> is in use by PID N") at once when another process trains into it."""
    owner = world().rank == 0
    with exclusive(checkpoint_dir) if owner else contextlib.nullcontext():
        return _train(cfg, prepared_dir, checkpoint_dir, on_epoch, objective)


def _train(
    cfg: TrainConfig,
    prepared_dir: Path,
    checkpoint_dir: Path,
    on_epoch: OnEpoch | None,
    objective: tuple[LossFn, str] | None,
) -> TrainResult:
    manifest = read_manifest(prepared_dir)
    data = load_data(prepared_dir, manifest)
    args = model_args(cfg, manifest)
    fp = fingerprint(cfg, manifest["content_hash"], objective[1] if objective else "")
    loop = make_loop(cfg, args, rank_device(resolve_device(cfg.device)))
    if objective is not None:
        loop.loss = objective[0]
    checkpoints, state, resumed_from = shared_start(loop, checkpoint_dir, fp, cfg.resume)

    def save() -> None:
        if checkpoints is not None:
            checkpoints.save(checkpoint(loop, state, args, fp, state.finished(cfg.epochs)))

    fit(cfg, loop, data, state, save, on_epoch)
    return result(cfg, manifest, args, fp, state, len(data.y_train), resumed_from)


def fit(
    cfg: TrainConfig,
    loop: Loop,
    data: Data,
    state: State,
    save: Callable[[], None],
    on_epoch: OnEpoch | None,
) -> None:
    """Epochs until the configured count or early stopping; `save` after each."""
    loader = make_loader(data, cfg, loop)
    val = (data.x_val.to(loop.device), data.y_val.to(loop.device))
    progress = Progress(cfg.epochs, state.epoch, quiet=world().rank != 0)
    try:
        while not state.finished(cfg.epochs):
            row = run_epoch(loop, loader, val, cfg)
            check_finite(row, state.epoch + 1)  # before the epoch is recorded or checkpointed
            record(state, row, loop, cfg)
            save()
            progress.update(state.epoch, row)
            if on_epoch is not None:
                on_epoch(state.epoch, row)
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


def check_finite(row: dict[str, float], epoch: int) -> None:
    """Raise `PipelineError` when the epoch's training or validation loss is NaN or infinite:
    a diverged run is rejected where it is first seen, not trained on to a chance-level model."""
    for key in ("train_loss", "val_loss"):
        if not math.isfinite(row[key]):
            raise PipelineError(
                f"train: epoch {epoch}: {key} is {row[key]} (the training diverged); "
                "lower train.lr or check the data"
            )


def result(
    cfg: TrainConfig,
    manifest: dict[str, Any],
    args: dict[str, Any],
    fp: str,
    state: State,
    train_rows: int,
    resumed_from: int | None,
) -> TrainResult:
    """The best weights in a fresh CPU model, with the metrics and metadata written about it."""
    if not state.best_weights:
        raise PipelineError(
            "train: the validation loss never got below infinity (NaN or inf losses); "
            "lower train.lr or check the data"
        )
    model = rebuild(args)
    model.load_state_dict(state.best_weights)
    model.eval()
    metrics = summary(state, train_rows, resumed_from)
    metadata = {
        "arch": args["arch"],
        "input_shape": list(manifest["preprocessing"]["input_shape"]),
        "labels": list(manifest["labels"]),
        "label_column": manifest["label_column"],
        "preprocessing": manifest["preprocessing"],
        "content_hash": manifest["content_hash"],
        "fingerprint": fp,
        "train_config": section_dict(cfg),
        "torch_version": str(torch.__version__),
        "best_epoch": state.best_epoch,
        "val_loss": state.best_loss,
        "val_accuracy": metrics["val_accuracy"],
    }
    return TrainResult(model, args, metadata, state.history, metrics)


def summary(state: State, train_rows: int, resumed_from: int | None) -> dict[str, Any]:
    """metrics/train.json: the best epoch's validation figures and the training speed (seconds of
    training + validation summed over every epoch, those before a resume included)."""
    seconds = sum(row["seconds"] for row in state.history)
    return {
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "best_val_loss": state.best_loss,
        "val_accuracy": state.history[state.best_epoch - 1]["val_accuracy"],
        "train_samples_per_sec": train_rows * state.epoch / seconds,
        "train_seconds": seconds,
        "resumed_from_epoch": resumed_from,
    }


# --- the model file ---------------------------------------------------------------------------


def save_model(path: Path, trained: TrainResult) -> None:
    """The self-describing model file: plain dicts, lists, strings, numbers and tensors only;
    the same model and metadata give the same bytes (see `save_torch`)."""
    content = {
        "format": MODEL_FORMAT,
        "model_args": trained.model_args,
        "state_dict": cpu_copy(trained.model.state_dict()),
        "metadata": trained.metadata,
    }
    save_torch(path, content)


def load_model(path: Path | str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by `save_model` (CPU, eval mode) and return it with its metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file; run the train stage first")
    content = read_torch(path, "not a readable model file")
    if not isinstance(content, dict) or content.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: not a train model file ({MODEL_FORMAT})")
    try:
        model = rebuild(content["model_args"])
        model.load_state_dict(content["state_dict"])
        metadata: dict[str, Any] = content["metadata"]
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: the weights do not fit the stored model args: {exc}"
        ) from exc
    model.eval()
    return model, metadata


def write_plots(path: Path, history: list[dict[str, float]]) -> None:
    """Per-epoch CSV for DVC's training-curve plot."""
    with atomic_path(Path(path)) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=PLOT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


# --- command line and MLflow ------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    model: Path
    metrics: Path
    plots: Path
    checkpoint_dir: Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--prepared", type=Path, required=True, help="the prepare stage's folder")
    parser.add_argument("--model", type=Path, required=True, help="model file to write")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--plots", type=Path, required=True, help="per-epoch CSV to write")
    parser.add_argument("--checkpoint-dir", type=Path, required=True, help="scratch checkpoints")
    parser.add_argument("--tuned", type=Path, help="the tune stage's best-params file")
    args = parser.parse_args(argv)
    outputs = Outputs(args.model, args.metrics, args.plots, args.checkpoint_dir)
    run_cli(
        lambda _: _run(*effective_params(args.params, args.tuned), args.prepared, outputs),
        args.params,
    )


def tuned_values(path: Path | None) -> dict[str, Any]:
    """The `tune` stage's best values ({"train.lr": ...}) when it ran enabled; else {}."""
    if path is None:
        return {}
    try:
        content = json.loads(Path(path).read_text())
        values = content["params"] if content["enabled"] else {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataSourceError(f"{path}: not a tune best-params file ({exc}); run `tune`") from exc
    outside = [key for key in values if not str(key).startswith("train.")]
    if outside:
        raise ParamsError(f"{path}: only train params can be tuned, not {', '.join(outside)}")
    return dict(values)


def effective_params(path: Path, tuned: Path | None) -> tuple[Params, dict[str, Any]]:
    """params.yaml with the tuned values applied (validated by the same models) when
    `tune.enabled`; and those values."""
    params = load_params(path)
    values = tuned_values(tuned) if params.tune.enabled else {}
    return (load_params(path, overrides=values) if values else params), values


def _run(params: Params, tuned: dict[str, Any], prepared_dir: Path, outputs: Outputs) -> None:
    """Under torchrun every rank trains; rank 0 alone tracks and writes the outputs."""
    with distributed(params.train.device) as place:
        if place.rank == 0:
            _run_tracked(params, tuned, prepared_dir, outputs)
        else:
            train(params.train, prepared_dir, outputs.checkpoint_dir)


def _run_tracked(
    params: Params, tuned: dict[str, Any], prepared_dir: Path, outputs: Outputs
) -> None:
    from pipelines.tracking import stage_run

    manifest = read_manifest(prepared_dir)
    section = {"train": section_dict(params.train)}
    root = Path.cwd()
    with stage_run("train", params, section, root, data_hash=manifest["content_hash"]) as run:
        run.set_tags(
            {"train.tuned": bool(tuned), "train.world_size": world().size}
            | ({"train.tuned_params": json.dumps(tuned, sort_keys=True)} if tuned else {})
        )
        trained = train(params.train, prepared_dir, outputs.checkpoint_dir, epoch_logger(run))
        trained.metadata["tuned_params"] = tuned
        write_plots(outputs.plots, trained.history)
        write_json(outputs.metrics, trained.metrics)
        save_model(outputs.model, trained)
        track(run, trained, outputs, input_example(prepared_dir, manifest))
        log.info("train: %s -> %s (%s)", prepared_dir, outputs.model, trained.metrics)


def epoch_logger(run: StageRun) -> OnEpoch:
    def log_epoch(epoch: int, row: dict[str, float]) -> None:
        run.log_metrics({f"epoch.{k}": v for k, v in row.items()}, step=epoch)

    return log_epoch


def track(run: StageRun, trained: TrainResult, outputs: Outputs, example: np.ndarray) -> None:
    """Summary metrics, tags, files and the MLflow model; a resumed run also gets the epochs it
    inherited, so its curves are whole."""
    import mlflow

    resumed_from = trained.metrics["resumed_from_epoch"]
    for row in trained.history[: resumed_from or 0]:
        run.log_metrics(
            {f"epoch.{k}": v for k, v in row.items() if k != "epoch"}, int(row["epoch"])
        )
    run.log_metrics({k: v for k, v in trained.metrics.items() if v is not None})
    tags = {
        "train.fingerprint": trained.metadata["fingerprint"],
        "train.resumed": bool(resumed_from),
    }
    if resumed_from:
        tags["train.resumed_from_epoch"] = resumed_from
    run.set_tags(tags)
    run.log_artifact(outputs.model)
    run.log_artifact(outputs.plots)
    with run.active():
        mlflow.pytorch.log_model(
            trained.model,
            name="model",
            input_example=example,
            pip_requirements=[f"torch=={torch.__version__}"],
        )


def input_example(prepared_dir: Path, manifest: dict[str, Any]) -> np.ndarray:
    """A few test rows in model-input shape (train rows when the test split is too small)."""
    from pipelines.prepare import read_split

    frame = read_split(prepared_dir, "test")
    if len(frame) < 2:
        frame = read_split(prepared_dir, "train")
    rows = frame[manifest["feature_columns"]].head(EXAMPLE_ROWS)
    return to_model_input(rows, manifest["preprocessing"], str(prepared_dir))


if __name__ == "__main__":
    main()
