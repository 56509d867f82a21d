"""`prune`: structured (channel) pruning of the teacher, fine-tuned, exported and quantized.

For each ratio of `prune.ratios`, torch-pruning removes that share of the output channels of
every convolution and linear layer but the classifier head, the least important first
(`prune.importance`: the L1 or L2 norm of each channel's weights, BatchNorm's scale, or LAMP).
Its dependency graph removes what a channel couples to with it: the BatchNorm after a
convolution, the next layer's input, both sides of a residual addition. The network that is left
is dense and smaller (fewer channels, fewer multiply-adds), so every engine runs it faster;
unstructured weight masking would not. It is fine-tuned on the training split with the train
stage's loop and settings (`prune.epochs`, `prune.lr`; the best validation loss kept), then
exported and quantized by the export and quantize stages' own functions, with their parity gates.

The output folder, written beside itself and swapped in whole (a failed run leaves the old one):
  families.json       {"families": [{"name", "ratio", "model", "onnx", "variants"}]}: the paths
                      relative to the folder; `select --families` adds them to its tournament
  pruned30/model.pt   the pruned model file (`pipelines.models`: its args carry the pruned
                      tensor shapes, so `load_model` rebuilds it), model.onnx, variants/
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.artifacts import (
    file_sha256,
    read_json,
    remove_stale_temps,
    temp_prefix,
    write_json,
)
from pipelines.cli import run_cli
from pipelines.config import Params, PruneConfig, TrainConfig, prune_family, section_dict
from pipelines.errors import DataSourceError, ParamsError
from pipelines.host import TrainingGate, stopped_cleanly
from pipelines.models import read_torch, rebuild, save_model
from pipelines.prepare import read_manifest
from pipelines.train import TrainResult, epoch_logger, fingerprint, host_gate, log_host, result
from pipelines.training.data import load_data
from pipelines.training.distributed import resolve_device
from pipelines.training.loop import OnEpoch, State, evaluate, fit, fitted_to, make_loop

FAMILIES = "families.json"  # in the output folder: the pruned families, for select
log = logging.getLogger(__name__)


def importance(name: str) -> Any:
    """torch-pruning's importance criterion for `prune.importance`."""
    import torch_pruning as tp

    criteria = {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "bn_scale": tp.importance.BNScaleImportance,
        "lamp": tp.importance.LAMPImportance,
    }
    return criteria[name]()


def classifier_head(model: nn.Module, num_classes: int) -> nn.Module:
    """The layer that writes the class logits: the last Linear with `num_classes` outputs.
    Raises ValueError when the model has none."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    heads = [m for m in heads if m.out_features == num_classes]
    if not heads:
        raise ValueError(f"no Linear layer with {num_classes} outputs (the classifier head)")
    return heads[-1]


def size(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Parameters and multiply-accumulates of one forward pass of `example` (torch-pruning's
    counter: convolutions, linear layers, norms)."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example)
    return {"params": int(params), "macs": int(macs)}


def prune_model(
    model: nn.Module, example: torch.Tensor, ratio: float, criterion: str, num_classes: int
) -> dict[str, int]:
    """Remove `ratio` of the channels of every prunable layer group of `model` but the classifier
    head, in place (eval mode, CPU). `example`: a model-input batch (N, *input_shape) float32 to
    trace the dependency graph with. Returns params/macs before and after (`size`). Raises
    ParamsError naming prune.ratios when the ratio removed nothing (a no-op "pruned" family)."""
    import torch_pruning as tp

    model.eval()
    before = size(model, example)
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=importance(criterion),
        pruning_ratio=ratio,
        ignored_layers=[classifier_head(model, num_classes)],
    )
    pruner.step()
    after = size(model, example)
    if after["params"] >= before["params"]:  # e.g. 0.99 of a narrow layer: torch-pruning skips it
        raise ParamsError(
            f"prune.ratios: {ratio:g} removed no channel of the teacher (torch-pruning leaves a "
            "layer whole rather than empty it): use a smaller ratio"
        )
    return {
        "params_before": before["params"],
        "params_after": after["params"],
        "macs_before": before["macs"],
        "macs_after": after["macs"],
    }


def shapes(model: nn.Module) -> dict[str, list[int]]:
    """{state dict key: shape} of `model`: what `pipelines.models.rebuild` resizes a fresh
    model to."""
    return {key: list(value.shape) for key, value in model.state_dict().items()}


def pruned_teacher(
    content: dict[str, Any], example: torch.Tensor, ratio: float, criterion: str, classes: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, float]]:
    """The teacher of a model file's `content` (`pipelines.models.save_model`), pruned on the
    CPU (`prune_model`): (its construction args, with the pruned `shapes`; its weights; the
    size figures)."""
    args = dict(content["model_args"])
    model = rebuild(args)
    model.load_state_dict(content["state_dict"])
    figures: dict[str, float] = {**prune_model(model, example, ratio, criterion, classes)}
    args["shapes"] = shapes(model)
    return args, model.state_dict(), figures


def fine_tune_config(train_cfg: TrainConfig, cfg: PruneConfig) -> TrainConfig:
    """The train section with the prune section's epochs and lr (and no initial weights file:
    the pruned weights are the start)."""
    model = train_cfg.model.model_copy(update={"weights": None})
    return train_cfg.model_copy(update={"epochs": cfg.epochs, "lr": cfg.lr, "model": model})


def prune_and_tune(
    train_cfg: TrainConfig,
    cfg: PruneConfig,
    ratio: float,
    teacher_path: Path,
    prepared_dir: Path,
    on_epoch: OnEpoch | None = None,
    gate: TrainingGate | None = None,
) -> TrainResult:
    """The teacher in `teacher_path`, pruned by `ratio` and fine-tuned on `prepared_dir`'s
    training split (best validation loss kept); its metadata["pruning"] holds the ratio, the
    criterion, the size before/after and the validation accuracy before fine-tuning."""
    content = read_torch(teacher_path, "not a readable model file")
    manifest = read_manifest(prepared_dir)
    data = load_data(prepared_dir, manifest, train_cfg.augment)
    tune_cfg = fitted_to(fine_tune_config(train_cfg, cfg), len(data.y_train))
    args, weights, figures = pruned_teacher(
        content, data.x_val[:2], ratio, cfg.importance, len(manifest["labels"])
    )
    device = resolve_device(tune_cfg.device)
    loop = make_loop(tune_cfg, args, device)  # the pruned layout, rebuilt from its args
    loop.model.load_state_dict(weights)
    loop.gate = gate
    val = (data.x_val.to(device), data.y_val.to(device))
    figures["val_accuracy_pruned"] = evaluate(loop, *val, tune_cfg.batch_size)[1]
    description = json.dumps(
        {"ratio": ratio, "teacher": file_sha256(teacher_path), **section_dict(cfg)}
    )
    scaling = manifest["preprocessing"].get("model_scaling", "none")
    fp = fingerprint(tune_cfg, manifest["content_hash"], description, scaling)
    state = State()
    fit(tune_cfg, loop, data, state, lambda: None, on_epoch)
    trained = result(tune_cfg, manifest, args, fp, state, len(data.y_train), None)
    trained.metadata["pruning"] = {
        "ratio": ratio,
        "importance": cfg.importance,
        "teacher_sha256": file_sha256(teacher_path),
        "teacher_val_accuracy": content["metadata"]["val_accuracy"],
        **figures,
    }
    return trained


def prune_family_files(
    params: Params,
    ratio: float,
    teacher_path: Path,
    prepared_dir: Path,
    folder: Path,
    on_epoch: OnEpoch | None = None,
    gate: TrainingGate | None = None,
) -> dict[str, Any]:
    """One family in `folder`: model.pt, model.onnx (export's parity gate) and variants/ (the
    quantize stage's variants and variants.json). Returns its figures for metrics/prune.json."""
    from pipelines.export import export
    from pipelines.quantize import quantize

    trained = prune_and_tune(
        params.train, params.prune, ratio, teacher_path, prepared_dir, on_epoch, gate
    )
    save_model(folder / "model.pt", trained)
    exported = export(params.export, folder / "model.pt", prepared_dir, folder / "model.onnx")
    variants = quantize(params.quantize, folder / "model.onnx", prepared_dir, folder / "variants")
    return {
        **trained.metadata["pruning"],
        "val_accuracy": trained.metrics["val_accuracy"],
        "epochs_run": trained.metrics["epochs_run"],
        "test_accuracy": variants["fp32"]["accuracy"],
        "export_max_abs_diff": exported["max_abs_diff"],
        "variants": {k: v["status"] for k, v in variants.items() if "status" in v},
    }


def prune(
    params: Params,
    teacher_path: Path,
    prepared_dir: Path,
    out_dir: Path,
    on_epoch: OnEpoch | None = None,
    gate: TrainingGate | None = None,
) -> dict[str, Any]:
    """Every ratio of `params.prune` as a family in `out_dir` (see the module's docstring),
    written whole or not at all. Returns {family name: its figures}."""
    figures: dict[str, Any] = {}
    entries = []
    with staged_dir(out_dir) as work:
        for ratio in params.prune.ratios:
            name = prune_family(ratio)
            log.info("prune: %s: %.0f%% of the channels", name, ratio * 100)
            figures[name] = prune_family_files(
                params, ratio, teacher_path, prepared_dir, work / name, named(on_epoch, name), gate
            )
            entries.append(
                {
                    "name": name,
                    "ratio": ratio,
                    "model": f"{name}/model.pt",
                    "onnx": f"{name}/model.onnx",
                    "variants": f"{name}/variants",
                }
            )
        write_json(work / FAMILIES, {"families": entries})
    return figures


def named(on_epoch: OnEpoch | None, family: str) -> OnEpoch | None:
    """`on_epoch` with the history row's keys prefixed by the family (`pruned30.val_loss`): the
    families' curves stay apart in one MLflow run."""
    if on_epoch is None:
        return None
    callback = on_epoch
    return lambda epoch, row: callback(epoch, {f"{family}.{k}": v for k, v in row.items()})


@contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """A fresh folder beside `out_dir` to write into; when the body succeeds it replaces
    `out_dir` (two renames on one file system), else it is removed and `out_dir` is untouched."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # a killed run's (kill -9) work and old folders
    work = out_dir.parent / f"{temp_prefix(out_dir)}.tmp"  # a plain mkdir: umask modes
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
        old = out_dir.parent / f"{work.name}.old"
        if out_dir.exists():
            out_dir.rename(old)
        work.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_families(path: Path) -> list[tuple[str, Path, Path, Path]]:
    """(name, model, onnx, variants) of each family in a `families.json` (the paths resolved
    against its folder). Raises DataSourceError naming the file when it cannot be read."""
    root = Path(path).parent
    try:
        return [
            (f["name"], root / f["model"], root / f["onnx"], root / f["variants"])
            for f in read_json(path)["families"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataSourceError(f"{path}: not a prune families file ({exc}); run `prune`") from exc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, required=True, help="the train stage's model file")
    parser.add_argument("--out", type=Path, required=True, help="folder of the pruned families")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    run_cli(lambda params: _run(params, args), args.params)


def _run(params: Params, args: argparse.Namespace) -> None:
    from pipelines.tracking import flatten, stage_run

    manifest = read_manifest(args.prepared)
    section = {"prune": section_dict(params.prune), "train": section_dict(params.train)}
    with (
        stopped_cleanly(),
        stage_run("prune", params, section, Path.cwd(), manifest["content_hash"]) as run,
    ):
        with host_gate(params) as gate:
            figures = prune(params, args.teacher, args.prepared, args.out, epoch_logger(run), gate)
        log_host(run, gate, params)
        write_json(args.metrics, figures)
        flat = flatten(figures)
        run.log_metrics({k: v for k, v in flat.items() if isinstance(v, int | float)})
        run.log_artifact(args.out / FAMILIES)
        log.info("prune: %s -> %s (%s)", args.teacher, args.out, figures)


if __name__ == "__main__":
    main()
