"""Compute to reach a target: TPE + pruning against random search without pruning.

Run: `python benchmarks/tune_compute.py [--seeds 0 1 ... 9] [--trials 40] [--target 0.99]
[--pruner median|hyperband] [--out F]` (about 2-3 minutes a seed on 2 CPU cores).

Both sides run the `tune` stage's own objective (`pipelines.tune.objective`: the real `train()`
with the trial's values overlaid on the `train` section, per-epoch reports, pruning) on the
default digits data, one trial at a time, with the same search space and the same budget of
trials. The only differences are the sampler (TPE, `--startup` random trials first, vs random)
and the pruner (median or Hyperband vs none), each seeded with the run's seed.

Compute is counted in training epochs, not seconds, so the load of a shared machine does not
matter: the epochs of every trial (pruned ones up to where they stopped) until the first epoch
whose validation accuracy reaches `--target`, that epoch included. A side that never reaches it
within the budget is charged every epoch it ran (a lower bound: marked "not reached").

The space (deliberately wide, as one would start on a new problem): lr log-uniform in
[1e-5, 1], weight decay log-uniform in [1e-6, 1e-1], CNN width int log-uniform in [4, 64],
depth in {1, 2, 3}, dropout uniform in [0, 0.5], batch size in {16, 32, 64, 128, 256}; every
trial trains at most `--epochs` epochs (cosine schedule, early stopping as in params.yaml).
The goal: TPE + pruning needs at most half the epochs of random search (ratio <= 0.5).

The target, 0.99 (at most 2 of the 270 validation rows wrong), is reached by good configurations
within 10 epochs but not by most. At 0.985 the first random trials (which both sides share: TPE
starts with `--startup` random draws from the same seed) hit it in 3 of 5 seeds, and the
comparison measured mostly luck (ratio 0.81 over seeds 0-4).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_args import nonnegative_int, positive_int, probability  # noqa: E402

from pipelines.config import Params, load_params, section_dict, validate_params  # noqa: E402
from pipelines.prepare import prepare  # noqa: E402
from pipelines.tune import make_pruner, make_sampler, objective  # noqa: E402

GOAL = 0.5
SPACE = {
    "train.lr": {"type": "float", "low": 1.0e-5, "high": 1.0, "log": True},
    "train.weight_decay": {"type": "float", "low": 1.0e-6, "high": 1.0e-1, "log": True},
    "train.model.width": {"type": "int", "low": 4, "high": 64, "log": True},
    "train.model.depth": {"type": "int", "low": 1, "high": 3},
    "train.model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "train.batch_size": {"type": "categorical", "choices": [16, 32, 64, 128, 256]},
}


def side_params(args: argparse.Namespace, guided: bool) -> Params:
    """params.yaml with the benchmark's space and budget; TPE + pruner, or random + none."""
    raw = section_dict(load_params(REPO / "params.yaml"))
    raw["train"].update(epochs=args.epochs, resume=False, num_workers=0)
    raw["tune"].update(
        enabled=True, trials=args.trials, workers=1, space=SPACE, startup_trials=args.startup
    )
    raw["tune"]["sampler"] = "tpe" if guided else "random"
    raw["tune"]["pruner"].update(kind=args.pruner if guided else "none")
    return validate_params(raw, source="benchmark")


def epochs_to_target(study: optuna.Study, target: float) -> tuple[int, bool]:
    """Epochs run until the first epoch at or above target (trials in order), and whether it
    was reached."""
    spent = 0
    for trial in study.trials:
        for _, accuracy in sorted(trial.intermediate_values.items()):
            spent += 1
            if accuracy >= target:
                return spent, True
    return spent, False


def run_side(params: Params, prepared: Path, seed: int, target: float) -> dict[str, Any]:
    """One study, stopped after the trial that reaches the target."""
    cfg = params.tune.model_copy(update={"seed": seed})
    study = optuna.create_study(
        sampler=make_sampler(cfg, 0),
        pruner=make_pruner(cfg, params.train.epochs),
        direction=cfg.direction,
    )

    def stop_at_target(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        values = trial.intermediate_values.values()
        print(
            f"  {cfg.sampler} seed {seed} trial {trial.number}: {trial.state.name.lower()} "
            f"after {len(values)} epochs, best {max(values, default=0):.4f}",
            file=sys.stderr,
            flush=True,
        )
        if any(value >= target for value in values):
            study.stop()

    study.optimize(objective(params, prepared), n_trials=cfg.trials, callbacks=[stop_at_target])
    epochs, reached = epochs_to_target(study, target)
    states = [t.state.name.lower() for t in study.trials]
    return {
        "epochs": epochs,
        "reached": reached,
        "trials": len(study.trials),
        "pruned": states.count("pruned"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument(
        "--trials", type=positive_int, default=40, help="trial budget of each study"
    )
    parser.add_argument("--epochs", type=positive_int, default=10, help="max epochs of a trial")
    parser.add_argument("--target", type=probability, default=0.99, help="validation accuracy")
    parser.add_argument(
        "--startup", type=nonnegative_int, default=5, help="TPE's random trials first"
    )
    parser.add_argument("--pruner", choices=["median", "hyperband"], default="median")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    guided, plain = side_params(args, True), side_params(args, False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared"
        prepare(guided.data, guided.prepare, REPO, prepared)
        for seed in args.seeds:
            row = {
                "seed": seed,
                "tpe_pruned": run_side(guided, prepared, seed, args.target),
                "random": run_side(plain, prepared, seed, args.target),
            }
            rows.append(row)
            print(format_row(row), flush=True)
    report(args, rows)


def format_row(row: dict[str, Any]) -> str:
    def cell(side: dict[str, Any]) -> str:
        mark = "" if side["reached"] else " (not reached)"
        trials = f"{side['trials']:>2} trials ({side['pruned']} pruned)"
        return f"{side['epochs']:>4} epochs, {trials}{mark}"

    return (
        f"seed {row['seed']}: TPE+pruning {cell(row['tpe_pruned'])} | random {cell(row['random'])}"
    )


def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    guided = [r["tpe_pruned"]["epochs"] for r in rows]
    plain = [r["random"]["epochs"] for r in rows]
    result = {
        "target_val_accuracy": args.target,
        "trial_budget": args.trials,
        "max_epochs_per_trial": args.epochs,
        "pruner": args.pruner,
        "tpe_startup_trials": args.startup,
        "space": SPACE,
        "seeds": args.seeds,
        "rows": rows,
        "epochs_tpe_pruned": sum(guided),
        "epochs_random": sum(plain),
        "ratio_of_totals": sum(guided) / sum(plain),
        "ratio_of_medians": statistics.median(guided) / statistics.median(plain),
        "all_reached": all(r[s]["reached"] for r in rows for s in ("tpe_pruned", "random")),
        "goal": GOAL,
    }
    print(
        f"\ntarget val_accuracy {args.target}, budget {args.trials} trials x <= {args.epochs} "
        f"epochs, pruner {args.pruner}, seeds {args.seeds}\n"
        f"epochs to target, total: TPE+pruning {sum(guided)}, random {sum(plain)}: "
        f"ratio {result['ratio_of_totals']:.2f} (medians: {result['ratio_of_medians']:.2f}; "
        f"goal <= {GOAL})"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
