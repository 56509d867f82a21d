"""Checkpoints: everything needed to continue a run exactly, one file per epoch.

A checkpoint is `torch.save` of a plain dict (model, optimizer, scheduler, every RNG, the
early-stopping state, the best weights, the history; `CHECKPOINT_FORMAT`), written atomically
(`pipelines.models.save_torch`) as `epoch-00012.ckpt` in the run's `CheckpointDir`, which keeps
the newest two. A run resumes from the newest readable checkpoint whose fingerprint (the train
settings, data and objective) matches and whose run did not finish (`usable_checkpoint`);
unreadable newer files are skipped with a warning. Loading is `torch.load(weights_only=True)`:
tensors and plain data only, no code runs.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.artifacts import remove_leftover
from pipelines.errors import CheckpointError
from pipelines.models import cpu_copy, read_torch, save_torch
from pipelines.training.distributed import world
from pipelines.training.loop import EpochProgress, Loop, State

CHECKPOINT_FORMAT = "mlops-train-checkpoint/2"  # torch.save of a plain dict
CHECKPOINT_FILE = re.compile(r"epoch-(\d+)\.ckpt")  # one per epoch; the newest two are kept
log = logging.getLogger("pipelines.train")  # the stage's log lines, whichever module writes them


def shared_start(
    loop: Loop, checkpoint_dir: Path, fp: str, resume: bool
) -> tuple[CheckpointDir | None, State, int | None]:
    """Where the run starts: (the checkpoint dir, on rank 0 only; the state; the epoch resumed
    from, or None).

    Rank 0 owns `checkpoint_dir` (and alone writes it). It picks the newest usable checkpoint
    (see `usable_checkpoint`) or, when there is none, removes the dir's checkpoints (of another
    run). Under torchrun it sends its pick to every rank (no shared file system needed) and the
    model is wrapped in DistributedDataParallel; with a world of 1 those two steps are skipped."""
    place = world()
    owner = CheckpointDir(checkpoint_dir) if place.rank == 0 else None
    found = None if owner is None else usable_checkpoint(owner, fp, resume)
    if owner is not None and found is None:
        owner.clear()
    if place.size > 1:
        import torch.distributed as dist

        sent = [found]
        dist.broadcast_object_list(sent, src=0)
        found = sent[0]
    state = State() if found is None else restore(loop, found[1])
    if found is not None and owner is not None:
        done = state.progress
        steps = f", step {done.steps} of epoch {state.epoch + 1}" if done else ""
        log.info("train: resuming from epoch %d%s of %s", state.epoch, steps, found[0])
    if place.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [place.local_rank] if loop.device.type == "cuda" else None
        loop.ddp = DistributedDataParallel(loop.model, device_ids=ids)
    return owner, state, None if found is None else state.epoch


class CheckpointDir:
    """A run's checkpoints: `epoch-00012.ckpt`, one per epoch (see `save_torch`); after each
    save the new one and the newest older one are kept. Its owner holds it alone (`exclusive`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # A killed run's half-written checkpoint: a temp folder of `atomic_path` (or the file an
        # older version wrote). The directory is its owner's alone, so every one is stale.
        for stale in self.directory.glob(".epoch-*.tmp*"):
            remove_leftover(stale)

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


def checkpoint(
    loop: Loop, state: State, args: dict[str, Any], fp: str, finished: bool
) -> dict[str, Any]:
    """Everything needed to continue the run exactly; `finished` marks its last epoch. Saved
    mid-epoch (a stop at a step boundary), it also holds the epoch's progress."""
    same_weights = state.best_epoch == state.epoch and state.progress is None
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
        "best_weights": None if same_weights else state.best_weights,
        "history": state.history,
        # A run stopped inside epoch `epoch + 1`: how far it got (`EpochProgress`); else None.
        "progress": None if state.progress is None else asdict(state.progress),
    }


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `CheckpointDir.save`, its tensors on the CPU.

    Raises CheckpointError when the file is unreadable (truncated, not a checkpoint) or holds
    anything but tensors and plain data (weights_only: loading runs no code)."""
    content = read_torch(path, "cannot be read")
    if not isinstance(content, dict) or content.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a train checkpoint ({CHECKPOINT_FORMAT})")
    return content


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
        progress=EpochProgress(**progress) if (progress := content.get("progress")) else None,
    )


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
