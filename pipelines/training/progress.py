"""Training progress: a tqdm bar on a terminal, otherwise one log line per epoch."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("pipelines.train")  # the stage's log lines, whichever module writes them


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
