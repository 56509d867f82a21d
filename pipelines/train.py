"""`train`: fit the configured architecture on the prepared splits, keep the best-val-loss weights.

Reads the `prepare` folder (train/val .parquet + manifest.json), converts rows with the shared
preprocessing, and trains with AdamW, a cosine or constant LR schedule and early stopping on the
validation loss. After every epoch it writes a checkpoint (model, optimizer, scheduler, every RNG,
early-stopping state, best weights, history) atomically into `--checkpoint-dir` (see
`CheckpointDir`), so a killed run started again resumes from the newest readable checkpoint and
ends with the same numbers as an uninterrupted one (on CPU). The run holds its checkpoint dir
alone: a second process training into it fails at once naming the holder's PID.

This module is the stage: `main` (command line), `train` (the function `tune` and `distill` call
too) and what the stage writes. The machinery is in `pipelines.training`: `loop` (the epochs),
`checkpoints`, `distributed` (torchrun), `data` (splits to tensors), `progress`.

Under `torchrun --nproc-per-node N -m pipelines.train ...` it trains with DistributedDataParallel
(gloo on CPU, NCCL on GPU; `batch_size` stays the global batch): rank 0 alone tracks and writes
checkpoints and outputs (see `pipelines.training.distributed`). `--tuned` applies the `tune`
stage's best values on top of the `train` section when `tune.enabled`.

Outputs (paths from the command line, see `main`): the model file (best state_dict + the args that
rebuild it + metadata; `pipelines.models.save_model`, read back with `load_model`),
`metrics/train.json`, the per-epoch CSV for DVC's training-curve plot, and in MLflow the
per-epoch metrics (`epoch.<name>`, step = epoch), the summary metrics (same names as the JSON),
the model file, the CSV and an MLflow pytorch model.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipelines.artifacts import atomic_path, write_json
from pipelines.cli import run_cli
from pipelines.config import Params, TrainConfig, load_params, section_dict
from pipelines.errors import DataSourceError, ParamsError, PipelineError
from pipelines.host import TrainingGate, shared_host, stopped_cleanly
from pipelines.lifecycle import exclusive
from pipelines.models import model_args, rebuild, save_model
from pipelines.prepare import read_manifest
from pipelines.preprocessing import to_model_input
from pipelines.scaling import fit_scaler
from pipelines.training.checkpoints import checkpoint, shared_start
from pipelines.training.data import load_data
from pipelines.training.distributed import distributed, rank_device, resolve_device, world
from pipelines.training.loop import LossFn, OnEpoch, State, fit, fitted_to, make_loop

if TYPE_CHECKING:
    from pipelines.tracking import StageRun

# Settings that do not change the numbers a run produces: changing them keeps a checkpoint usable.
NOT_FINGERPRINTED = ("resume", "num_workers")
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds")
PLOT_COLUMNS = HISTORY_FIELDS[:-1]  # the training-curve CSV
EXAMPLE_ROWS = 4  # rows in the MLflow input example: > 1 keeps the batch axis dynamic

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Outputs:
    model: Path
    metrics: Path
    plots: Path
    checkpoint_dir: Path


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
    """Under torchrun every rank trains; rank 0 alone tracks and writes the outputs. A stop
    asked by SIGTERM (`pipelines.host`) exits EXIT_STOPPED once its checkpoint is saved."""
    with distributed(params.train.device) as place:
        if place.rank == 0:
            with stopped_cleanly():
                _run_tracked(params, tuned, prepared_dir, outputs)
        else:
            train(params.train, prepared_dir, outputs.checkpoint_dir)


def host_gate(params: Params) -> contextlib.AbstractContextManager[TrainingGate | None]:
    """The `host` section's gate for this run (`pipelines.host.shared_host`); none under
    torchrun (ranks pausing apart would stall each other's gradient exchange)."""
    if world().size > 1:
        if params.host.mode == "shared":
            log.warning("host: shared mode is not applied under torchrun (one process per rank)")
        return contextlib.nullcontext()
    return shared_host(params.host)


def log_host(run: StageRun, gate: TrainingGate | None, params: Params) -> None:
    """In shared mode, the gate's figures as MLflow metrics of `run`: host.pauses,
    host.paused_seconds, host.throttled_seconds, and host.share (0..1) at each change, step =
    milliseconds since the start."""
    if gate is None or params.host.mode != "shared":
        return
    run.log_metrics(gate.stats.metrics())
    for seconds, share in gate.stats.share:
        run.log_metrics({"host.share": share}, step=round(seconds * 1000))


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
        with host_gate(params) as gate:
            trained = train(
                params.train, prepared_dir, outputs.checkpoint_dir, epoch_logger(run), gate=gate
            )
        log_host(run, gate, params)
        trained.metadata["tuned_params"] = tuned
        write_plots(outputs.plots, trained.history)
        write_json(outputs.metrics, trained.metrics)
        save_model(outputs.model, trained)
        track(run, trained, outputs, input_example(prepared_dir, manifest))
        log.info("train: %s -> %s (%s)", prepared_dir, outputs.model, trained.metrics)


@dataclass
class TrainResult:
    """The trained model (best weights, CPU, eval mode) and everything written about it."""

    model: nn.Module
    model_args: dict[str, Any]
    metadata: dict[str, Any]
    history: list[dict[str, float]]
    metrics: dict[str, Any]


def train(
    cfg: TrainConfig,
    prepared_dir: Path,
    checkpoint_dir: Path,
    on_epoch: OnEpoch | None = None,
    objective: tuple[LossFn, str] | None = None,
    gate: TrainingGate | None = None,
) -> TrainResult:
    """Train on `prepared_dir`, checkpointing into `checkpoint_dir` after every epoch (resuming
    from there when `cfg.resume` and the fingerprint match). `on_epoch(epoch, row)` is called
    after each epoch, once its checkpoint is written. `objective` = (loss, description) replaces
    cross-entropy; the description enters the checkpoint fingerprint. `gate` (pipelines.host)
    is honoured after every optimizer step: it may pause the loop, or raise StopRequested, in
    which case a mid-epoch checkpoint is written first (the next run resumes from that step).

    Under torchrun (see `distributed`) every rank calls this: DDP, each rank a slice of every
    batch, and rank 0 alone writes checkpoints.

    The process that writes `checkpoint_dir` holds it alone for the run: raises InUseError
    ("<checkpoint_dir> is in use by PID N") at once when another process trains into it."""
    owner = world().rank == 0
    with exclusive(checkpoint_dir) if owner else contextlib.nullcontext():
        return _train(cfg, prepared_dir, checkpoint_dir, on_epoch, objective, gate)


def _train(
    cfg: TrainConfig,
    prepared_dir: Path,
    checkpoint_dir: Path,
    on_epoch: OnEpoch | None,
    objective: tuple[LossFn, str] | None,
    gate: TrainingGate | None = None,
) -> TrainResult:
    manifest = read_manifest(prepared_dir)
    data = load_data(prepared_dir, manifest, cfg.augment)
    scaling = manifest["preprocessing"].get("model_scaling", "none")
    args = model_args(cfg, manifest, fit_scaler(scaling, data.x_train.numpy()))
    fp = fingerprint(cfg, manifest["content_hash"], objective[1] if objective else "", scaling)
    fitted = fitted_to(cfg, len(data.y_train))
    if fitted is not cfg:
        log.info(
            "train: %d training rows: batches of %d, not train.batch_size %d "
            "(train.min_batches_per_epoch %d)",
            len(data.y_train),
            fitted.batch_size,
            cfg.batch_size,
            cfg.min_batches_per_epoch,
        )
    cfg = fitted
    loop = make_loop(cfg, args, rank_device(resolve_device(cfg.device)))
    if objective is not None:
        loop.loss = objective[0]
    loop.gate = gate
    checkpoints, state, resumed_from = shared_start(loop, checkpoint_dir, fp, cfg.resume)

    def save() -> None:
        if checkpoints is not None:
            checkpoints.save(checkpoint(loop, state, args, fp, state.finished(cfg.epochs)))

    fit(cfg, loop, data, state, save, on_epoch)
    return result(cfg, manifest, args, fp, state, len(data.y_train), resumed_from)


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


def fingerprint(
    cfg: TrainConfig, content_hash: str, objective: str = "", scaling: str = "none"
) -> str:
    """Identifies what a run computes: the train section (less NOT_FINGERPRINTED), the data, a
    non-default objective's description (e.g. the teacher and settings of a distillation) and
    the model's input scaling (data.scaling, resolved; `none` adds nothing)."""
    section = {k: v for k, v in section_dict(cfg).items() if k not in NOT_FINGERPRINTED}
    content = {"train": section, "data": content_hash, "objective": objective}
    if scaling != "none":
        content["scaling"] = scaling
    blob = json.dumps(content, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_plots(path: Path, history: list[dict[str, float]]) -> None:
    """Per-epoch CSV for DVC's training-curve plot."""
    with atomic_path(Path(path)) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=PLOT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


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
