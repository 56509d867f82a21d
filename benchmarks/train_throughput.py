"""Train-stage throughput: the real `pipelines.train.train()` against a bare PyTorch loop.

Run: `python benchmarks/train_throughput.py [--workload digits|large] [--repeats 7] [--epochs N]
[--threads N] [--before REF] [--out F]`.

Both sides use the `train` section of params.yaml (model, batch size, AdamW, LR schedule, seed,
device, bf16 autocast on CUDA), data prepared into a temp dir, and a full validation pass after
every epoch (the stage needs it for early stopping). Early stopping is off (`patience` = epochs),
so both sides run exactly `epochs` epochs. Workloads:
- `digits` (default): params.yaml as it is, on the built-in digits (8x8, ~1,300 train rows);
- `large`: the realistic one of `model_speed.py` (`LARGE`: a CNN of width 64, depth 3 on 32x32
  synthetic images, batch 128), `--rows` rows (default 2,000), where compute dominates.

`--before REF` adds a third side: the `train()` of `pipelines/train.py` as it was at git REF
(e.g. `main`), loaded from `git show` into this process, so before and after are measured side by
side on the same data and load (REF's module must import against today's `pipelines/`).

- stage: one call of `train()`, timed end to end: reading the prepared Parquet files and the
  manifest, seeding, building the model, the DataLoader (batch-level fetching), every epoch
  (train + validation), the checkpoint after every epoch (atomic write of model, optimizer,
  scheduler, RNG states, best weights, history), the progress line, keeping the best weights, and
  rebuilding the best model at the end. MLflow is not involved (that is `main()`'s part).
- bare: what any script needs: reading the same Parquet files and converting them (the same
  `to_model_input`), building the model and optimizer, then per epoch: a `torch.randperm` shuffle,
  slicing tensors in memory, `.to(device)`, forward, backward, AdamW step, the LR schedule step,
  and the same validation pass. Losses stay on the device and are read once per epoch, like the
  stage. No DataLoader, no checkpoints, no logging, no checks.

samples/s = epochs x train rows / wall seconds. Each side runs once untimed to warm up, then the
sides alternate (the order flips every repeat); the figures are medians over the repeats. The
ratio stage / bare measures the overhead of the stage's machinery; the goal is >= 0.95. `ratio`
is the median of the per-repeat ratios (the two runs of a repeat are back to back, so they share
the machine's load at that moment, which matters on a shared host); the ratio of the two medians
is printed too, and the same ratio in CPU time of this process (less sensitive to other load; it
leaves out the kernel's background writeback of the checkpoint files).

Figures (README's Benchmarks table): 0.960 and 0.973 on the digits (2026-11-29, idle 2-core CPU,
medians of 7 repeats). After the split into `pipelines/training/`, against the code before it
(`--before c9c5285`), on a heavily loaded shared 2-core host (2026-11-30, medians of 3 repeats,
wall / CPU time): digits 3 epochs: after 1.254 / 1.023, before 0.867 / 0.850; large, 400 rows,
1 epoch: after 1.143 / 1.039, before 1.003 / 1.104. Per-repeat ratios spanned 0.5-1.8 there:
the split moved code, not work, and no difference is measurable at that noise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.config import TrainConfig, load_params  # noqa: E402
from pipelines.models import model_args  # noqa: E402
from pipelines.models import rebuild as build  # noqa: E402
from pipelines.prepare import prepare, read_manifest  # noqa: E402
from pipelines.preprocessing import to_model_input  # noqa: E402
from pipelines.train import train  # noqa: E402
from pipelines.training.distributed import resolve_device  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_args import positive_int  # noqa: E402
from model_speed import LARGE, synthetic_images  # noqa: E402

GOAL = 0.95


def bare_data(prepared: Path) -> list[torch.Tensor]:
    """x_train, y_train, x_val, y_val straight from the prepared files."""
    manifest = json.loads((prepared / "manifest.json").read_text())
    spec, classes = manifest["preprocessing"], {v: i for i, v in enumerate(manifest["labels"])}
    tensors = []
    for name in ("train", "val"):
        frame = pd.read_parquet(prepared / f"{name}.parquet")
        tensors.append(torch.from_numpy(to_model_input(frame[spec["feature_columns"]], spec)))
        tensors.append(torch.tensor(frame[manifest["label_column"]].map(classes).to_numpy()))
    return tensors


def bare_loop(cfg: TrainConfig, prepared: Path, args: dict[str, Any], epochs: int) -> None:
    """Read the data, then `epochs` epochs of a plain loop with validation."""
    x_train, y_train, x_val, y_val = bare_data(prepared)
    device = resolve_device(cfg.device)
    bf16 = cfg.bf16 and device.type == "cuda"
    torch.manual_seed(cfg.seed)
    model = build(args).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    x_val, y_val = x_val.to(device), y_val.to(device)
    for _ in range(epochs):
        model.train()
        total = torch.zeros((), device=device)
        for index in torch.randperm(len(y_train), generator=shuffle).split(cfg.batch_size):
            xb = x_train[index].to(device, non_blocking=True)
            yb = y_train[index].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total.add_(loss.detach(), alpha=len(yb))
        scheduler.step()
        total.item()
        validate(model, x_val, y_val, cfg.batch_size, bf16)


@torch.no_grad()
def validate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, bf16: bool
) -> tuple[float, float]:
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(xb).float()
        loss += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(dim=1) == yb).sum()
    return loss.item() / len(x), correct.item() / len(x)


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def train_at(ref: str, scratch: Path) -> ModuleType:
    """`pipelines/train.py` as it was at git `ref`, imported as module `train_at_<ref>`."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{ref}:pipelines/train.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = scratch / "train_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"train_at_{ref}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def measure(
    cfg: TrainConfig, prepared: Path, scratch: Path, repeats: int, before: ModuleType | None
) -> dict[str, Any]:
    """Per side, the (wall, CPU) seconds of each repeat."""
    args = model_args(cfg, read_manifest(prepared))
    sides: dict[str, Callable[[], object]] = {
        # A fresh checkpoint dir per call, so the stage never resumes.
        "stage": lambda: train(cfg, prepared, Path(tempfile.mkdtemp(dir=scratch))),
        "bare": lambda: bare_loop(cfg, prepared, args, cfg.epochs),
    }
    if before is not None:
        sides["before"] = lambda: before.train(cfg, prepared, Path(tempfile.mkdtemp(dir=scratch)))
    for run in sides.values():  # warm-up, untimed
        run()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    names = list(sides)
    for repeat in range(repeats):  # the order rotates: each side runs first as often
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(sides[name]))
    return times


def report(cfg: TrainConfig, rows: int, times: dict[str, Any]) -> dict[str, Any]:
    samples = cfg.epochs * rows
    wall = {name: [samples / w for w, _ in runs] for name, runs in times.items()}
    stage, bare = (statistics.median(wall[name]) for name in ("stage", "bare"))
    paired = [s / b for s, b in zip(wall["stage"], wall["bare"], strict=True)]
    cpu = [b[1] / s[1] for s, b in zip(times["stage"], times["bare"], strict=True)]
    figures = {
        "stage_samples_per_sec": stage,
        "bare_samples_per_sec": bare,
        "ratio": statistics.median(paired),
        "ratio_of_medians": stage / bare,
        "ratios": paired,
        "cpu_time_ratio": statistics.median(cpu),
        "goal": GOAL,
        "stage_runs_samples_per_sec": wall["stage"],
        "bare_runs_samples_per_sec": wall["bare"],
        "settings": settings(cfg, rows, len(paired)),
    }
    if "before" in times:
        wall["before"] = [samples / w for w, _ in times["before"]]
        figures["before_samples_per_sec"] = statistics.median(wall["before"])
        figures["before_ratios"] = [
            s / b for s, b in zip(wall["before"], wall["bare"], strict=True)
        ]
        figures["before_ratio"] = statistics.median(figures["before_ratios"])
        figures["before_cpu_time_ratio"] = statistics.median(
            b[1] / s[1] for s, b in zip(times["before"], times["bare"], strict=True)
        )
    return figures


def settings(cfg: TrainConfig, rows: int, repeats: int) -> dict[str, Any]:
    return {
        "arch": cfg.model.arch,
        "width": cfg.model.width,
        "depth": cfg.model.depth,
        "batch_size": cfg.batch_size,
        "epochs": cfg.epochs,
        "train_rows": rows,
        "device": str(resolve_device(cfg.device)),
        "bf16": cfg.bf16,
        "num_workers": cfg.num_workers,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--epochs", type=positive_int, help="default: train.epochs of params.yaml")
    parser.add_argument(
        "--threads", type=positive_int, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--workload", choices=["digits", "large"], default="digits")
    parser.add_argument(
        "--rows", type=positive_int, default=2000, help="rows of the large workload"
    )
    parser.add_argument("--before", metavar="REF", help="also measure train.py as at git REF")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = REPO
        params = load_params(args.params)
        if args.workload == "large":
            root = Path(tmp)
            synthetic_images(root / "data" / "synthetic32.csv", rows=args.rows)
            params = load_params(args.params, overrides=LARGE)
        epochs = args.epochs or params.train.epochs
        cfg = params.train.model_copy(update={"epochs": epochs, "patience": epochs})
        prepared = Path(tmp) / "prepared"
        manifest = prepare(params.data, params.prepare, root, prepared)
        before = train_at(args.before, Path(tmp)) if args.before else None
        times = measure(cfg, prepared, Path(tmp), args.repeats, before)
    figures = report(cfg, manifest["splits"]["train"]["rows"], times)
    figures["workload"], figures["before_ref"] = args.workload, args.before
    print_figures(figures)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


def print_figures(figures: dict[str, Any]) -> None:
    s = figures["settings"]
    print(
        f"train throughput ({figures['workload']}): {s['arch']} width {s['width']} depth "
        f"{s['depth']}, batch {s['batch_size']}, {s['epochs']} epochs x {s['train_rows']} rows, "
        f"{s['device']}, "
        f"{s['torch_threads']} threads, medians of {s['repeats']} repeats"
    )
    print(f"  stage train(): {figures['stage_samples_per_sec']:10.0f} samples/s")
    print(f"  bare loop:     {figures['bare_samples_per_sec']:10.0f} samples/s")
    if "before_ratio" in figures:
        print(
            f"  before ({figures['before_ref']}): {figures['before_samples_per_sec']:10.0f} "
            f"samples/s, ratio before/bare {figures['before_ratio']:.3f} (per repeat: "
            + " ".join(f"{r:.3f}" for r in figures["before_ratios"])
            + f"), in CPU time (bare / before): {figures['before_cpu_time_ratio']:.3f}"
        )
    verdict = "ok" if figures["ratio"] >= figures["goal"] else "BELOW GOAL"
    print(f"  ratio stage/bare: {figures['ratio']:.3f} (goal >= {figures['goal']}: {verdict})")
    runs = " ".join(f"{r:.3f}" for r in figures["ratios"])
    print(f"    per repeat: {runs}; ratio of the medians: {figures['ratio_of_medians']:.3f}")
    print(f"    in CPU time of this process (bare / stage): {figures['cpu_time_ratio']:.3f}")


if __name__ == "__main__":
    main()
