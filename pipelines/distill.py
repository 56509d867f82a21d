"""`distill`: a smaller student trained on the teacher's soft targets (knowledge distillation).

The student's architecture comes from `distill.model`; its optimizer, schedule, epochs, early
stopping, device and checkpointing are the `train` stage's (same loop, same resume, the same
exclusive hold on its checkpoint dir: a second run into it fails naming the PID), with the
loss `alpha * T^2 * KL(student_T || teacher_T) + (1 - alpha) * cross-entropy` at temperature T.
The student file has the same self-describing format as the teacher's, so `export` and
`quantize` treat it the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from pipelines.artifacts import file_sha256, write_json
from pipelines.cli import run_cli
from pipelines.config import DistillConfig, Params, TrainConfig, section_dict
from pipelines.host import TrainingGate, stopped_cleanly
from pipelines.models import load_model, save_model
from pipelines.prepare import read_manifest
from pipelines.train import (
    Outputs,
    TrainResult,
    epoch_logger,
    host_gate,
    input_example,
    log_host,
    track,
    train,
    write_plots,
)
from pipelines.training.distributed import resolve_device
from pipelines.training.loop import LossFn, OnEpoch

log = logging.getLogger(__name__)


def distillation_loss(teacher: nn.Module, temperature: float, alpha: float) -> LossFn:
    """Soft targets from `teacher` (frozen, eval mode) mixed with the hard labels."""

    def loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(teacher(x).float() / temperature, dim=1)
        student = F.log_softmax(logits.float() / temperature, dim=1)
        soft = F.kl_div(student, target, log_target=True, reduction="batchmean")
        return alpha * temperature**2 * soft + (1 - alpha) * F.cross_entropy(logits, y)

    return loss


def distill(
    train_cfg: TrainConfig,
    cfg: DistillConfig,
    teacher_path: Path,
    prepared_dir: Path,
    checkpoint_dir: Path,
    on_epoch: OnEpoch | None = None,
    gate: TrainingGate | None = None,
) -> TrainResult:
    """Train the student of `cfg.model` against the teacher in `teacher_path` (honouring
    `gate`, pipelines.host, after every optimizer step)."""
    teacher, teacher_meta = load_model(teacher_path)
    teacher.to(resolve_device(train_cfg.device)).requires_grad_(False)
    student_cfg = train_cfg.model_copy(update={"model": cfg.model})
    settings = {"teacher_sha256": file_sha256(teacher_path), **section_dict(cfg)}
    objective = (
        distillation_loss(teacher, cfg.temperature, cfg.alpha),
        json.dumps(settings, sort_keys=True),
    )
    result = train(student_cfg, prepared_dir, checkpoint_dir, on_epoch, objective, gate)
    result.metadata["distillation"] = {
        **settings,
        "teacher_val_accuracy": teacher_meta["val_accuracy"],
    }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, required=True, help="the train stage's model file")
    parser.add_argument("--model", type=Path, required=True, help="student model file to write")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    parser.add_argument("--checkpoint-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    outputs = Outputs(args.model, args.metrics, args.plots, args.checkpoint_dir)
    run_cli(lambda params: _run(params, args.prepared, args.teacher, outputs), args.params)


def _run(params: Params, prepared_dir: Path, teacher: Path, outputs: Outputs) -> None:
    from pipelines.tracking import stage_run

    manifest = read_manifest(prepared_dir)
    section = {"distill": section_dict(params.distill), "train": section_dict(params.train)}
    with (
        stopped_cleanly(),
        stage_run("distill", params, section, Path.cwd(), manifest["content_hash"]) as run,
    ):
        with host_gate(params) as gate:
            trained = distill(
                params.train,
                params.distill,
                teacher,
                prepared_dir,
                outputs.checkpoint_dir,
                epoch_logger(run),
                gate,
            )
        log_host(run, gate, params)
        write_plots(outputs.plots, trained.history)
        write_json(outputs.metrics, trained.metrics)
        save_model(outputs.model, trained)
        track(run, trained, outputs, input_example(prepared_dir, manifest))
        log.info("distill: %s -> %s (%s)", teacher, outputs.model, trained.metrics)


if __name__ == "__main__":
    main()
