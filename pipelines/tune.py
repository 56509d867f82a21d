"""`tune`: an Optuna study over the `train` section, its best values a file `train` applies.

The search space is `tune.space` in params.yaml (dotted train keys; float/int ranges, log scale,
or choices). Each trial trains with the `train` section overlaid with its sampled values, validated
by the same models as params.yaml, in a temp checkpoint dir (the train stage's checkpoints are
never touched). After every epoch the trial reports `tune.metric` to the pruner (median or
Hyperband) and stops early when pruned. TPE (or random) sampling, seeded: worker k uses seed + k.

Workers: `tune.workers` processes on this host (`python -m pipelines.tune --worker`) run trials
against one study in a relational storage: an SQLite file by default, or a PostgreSQL URL
(`MLOPS_TUNE_STORAGE`) shared by workers on several hosts. Trials stop when the study holds
`tune.trials` complete or pruned trials (every worker together; running ones are counted while
they run) or after `tune.timeout_s`. A heartbeat marks the trials of a killed worker failed, so a
study killed mid-way goes on where it stopped (its finished trials kept), at once by the other
workers or the next time the stage runs. A trial that crashes is recorded as failed, does not
count toward `tune.trials`, and is retried; a worker that sees `tune.max_failed_trials` of its
trials fail in one run stops with an error.

MLflow: the stage's run is nested under the pipeline's parent run, and each trial is a run nested
under the stage's, with its sampled params, per-epoch metrics (`epoch.<name>`) and its final
state (tag `tune.state`: complete, pruned or failed).

Outputs: the best-params file (`{"enabled", "params": {dotted key: value}, ...}`; with
`tune.enabled` false, `{"enabled": false, "params": {}}`, so the graph stays the same) and
`metrics/tune.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipelines.artifacts import absolute_sqlite_url, write_json
from pipelines.cli import run_cli
from pipelines.config import (
    Environment,
    Params,
    SpaceParam,
    TrainConfig,
    TuneConfig,
    apply_overrides,
    environment,
    section_dict,
    validate_params,
)
from pipelines.errors import ParamsError, PipelineError, StorageError
from pipelines.host import (
    StopRequested,
    TrainingGate,
    shared_host,
    stop_on_signal,
    stopped_cleanly,
)
from pipelines.lifecycle import exclusive
from pipelines.prepare import read_manifest

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient

    from pipelines.training.loop import OnEpoch

BEST_FORMAT = "mlops-tune-best/1"
SQLITE_TIMEOUT_S = 60  # how long an SQLite writer waits for the lock (parallel workers)
FINISHED_KEY = {"val_accuracy": "val_accuracy", "val_loss": "best_val_loss"}  # in train metrics
log = logging.getLogger(__name__)


# --- the study --------------------------------------------------------------------------------


def storage_url(cfg: TuneConfig, root: Path) -> str:
    """`MLOPS_TUNE_STORAGE` if set, else `cfg.storage`; a relative SQLite path is made absolute.
    Raises EnvironmentVariableError (a ParamsError) naming `MLOPS_TUNE_STORAGE` when that is not
    a supported storage URL."""
    return absolute_sqlite_url(environment().tune_storage or cfg.storage, root)


def study_lock(cfg: TuneConfig) -> contextlib.AbstractContextManager[None]:
    """The stage holds an SQLite study alone (the workers it starts, and `--worker` processes,
    join it): a second `tune` stage fails at once naming the holder's PID. A server storage
    (postgresql://) is shared by hosts by design: no lock. Relative paths: from the working
    directory (the project root)."""
    url = environment().tune_storage or cfg.storage
    prefix = "sqlite:///"
    if not cfg.enabled or not url.startswith(prefix):
        return contextlib.nullcontext()
    return exclusive(Path(url.removeprefix(prefix)))


def redacted(url: str) -> str:
    """The URL without a password (for files and logs)."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    return f"{scheme}{sep}{credentials.split(':')[0]}:***@{host}"


def study_name(params: Params, content_hash: str) -> str:
    """`tune.study_name` + a fingerprint of what a trial computes: the space, the train section,
    the metric and the data. Same inputs, same study (resumed, or joined by other workers)."""
    from pipelines.train import NOT_FINGERPRINTED

    train = {k: v for k, v in section_dict(params.train).items() if k not in NOT_FINGERPRINTED}
    space = {key: section_dict(dim) for key, dim in params.tune.space.items()}
    blob = json.dumps(
        {"space": space, "train": train, "metric": params.tune.metric, "data": content_hash},
        sort_keys=True,
    )
    return f"{params.tune.study_name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def make_storage(url: str, heartbeat_s: int) -> optuna.storages.RDBStorage:
    """A relational storage with a heartbeat: a trial silent for 2 x heartbeat_s is stale.
    Raises StorageError naming the storage (password hidden) when it cannot be opened."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    else:
        engine_kwargs["pool_pre_ping"] = True
    try:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_s,
            grace_period=2 * heartbeat_s,
        )
    except (SQLAlchemyError, ImportError, OSError) as exc:
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        reason = cause[0] if cause else type(exc).__name__
        password = url.partition("://")[2].rpartition("@")[0].partition(":")[2]
        if password:
            reason = reason.replace(password, "***")
        raise StorageError(f"tune storage {redacted(url)}: cannot open it: {reason}") from None


def make_sampler(cfg: TuneConfig, worker: int) -> optuna.samplers.BaseSampler:
    import optuna

    seed = cfg.seed + worker
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        n_startup_trials=cfg.startup_trials, seed=seed, constant_liar=True
    )


def make_pruner(cfg: TuneConfig, epochs: int) -> optuna.pruners.BasePruner:
    """Median (prune below the median of earlier trials at the same epoch), Hyperband, or none."""
    import optuna

    pruner = cfg.pruner
    if pruner.kind == "median":
        return optuna.pruners.MedianPruner(  # steps are epoch numbers, from 1
            n_startup_trials=pruner.startup_trials, n_warmup_steps=pruner.warmup_epochs + 1
        )
    if pruner.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=pruner.min_epochs,
            max_resource=epochs,
            reduction_factor=pruner.reduction_factor,
        )
    return optuna.pruners.NopPruner()


def open_study(
    params: Params, name: str, storage: str | optuna.storages.BaseStorage, worker: int
) -> optuna.Study:
    """Create the study, or load it when it exists (resume; other workers)."""
    import optuna

    cfg = params.tune
    return optuna.create_study(
        storage=storage,
        study_name=name,
        sampler=make_sampler(cfg, worker),
        pruner=make_pruner(cfg, params.train.epochs),
        direction=cfg.direction,
        load_if_exists=True,
    )


def budget_counts(study: optuna.Study) -> tuple[int, int]:
    """(complete + pruned trials, running trials) of the study: what counts toward `tune.trials`.
    Failed trials do not count (they are retried); a killed worker's trial is failed first."""
    import optuna
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return len(done), len(running)


# --- one trial --------------------------------------------------------------------------------


def suggest(trial: optuna.Trial, space: dict[str, SpaceParam]) -> dict[str, Any]:
    """One value per dimension, named by its dotted train key."""
    values: dict[str, Any] = {}
    for key, dim in space.items():
        if dim.type == "categorical":
            values[key] = trial.suggest_categorical(key, dim.choices or [])
        elif dim.type == "int":
            assert dim.low is not None and dim.high is not None
            values[key] = trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log)
        else:
            assert dim.low is not None and dim.high is not None
            values[key] = trial.suggest_float(key, dim.low, dim.high, log=dim.log)
    return values


def overlaid(params: Params, values: dict[str, Any], source: str) -> TrainConfig:
    """The train section with `values` (dotted keys) applied, validated like params.yaml."""
    return validate_params(apply_overrides(section_dict(params), values), source=source).train


def reporter(trial: optuna.Trial, metric: str, log_epoch: OnEpoch) -> OnEpoch:
    """The train loop's per-epoch hook: log, report the metric, stop the trial when pruned."""
    import optuna

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        log_epoch(epoch, row)
        trial.report(row[metric], epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} ({metric} {row[metric]:.4f})")

    return on_epoch


@dataclass
class TrialTracker:
    """Where trials go in MLflow: nested runs under `parent_run_id`."""

    client: MlflowClient
    experiment_id: str
    parent_run_id: str
    study: str
    worker: int
    tags: dict[str, str] = field(default_factory=dict)

    @contextlib.contextmanager
    def trial(self, trial: optuna.Trial, values: dict[str, Any]) -> Iterator[OnEpoch]:
        """A nested run for the trial, ended FINISHED (complete), KILLED (pruned) or FAILED."""
        import optuna
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        from pipelines.tracking import StageRun, log_params

        tags = {
            **self.tags,
            MLFLOW_PARENT_RUN_ID: self.parent_run_id,
            "mlops.stage": "tune.trial",
            "tune.study": self.study,
            "tune.trial": str(trial.number),
            "tune.worker": str(self.worker),
        }
        run_id = self.client.create_run(
            self.experiment_id, run_name=f"trial-{trial.number}", tags=tags
        ).info.run_id
        trial.set_user_attr("mlflow_run_id", run_id)
        log_params(self.client, run_id, values)
        run = StageRun(self.client, run_id, self.parent_run_id)
        state, status = "failed", "FAILED"
        try:
            yield lambda epoch, row: run.log_metrics(
                {f"epoch.{k}": v for k, v in row.items()}, step=epoch
            )
            state, status = "complete", "FINISHED"
        except optuna.TrialPruned:
            state, status = "pruned", "KILLED"
            raise
        except Exception as exc:
            self.client.set_tag(run_id, "tune.error", f"{type(exc).__name__}: {exc}"[:5000])
            raise
        finally:
            self.client.set_tag(run_id, "tune.state", state)
            self.client.set_terminated(run_id, status=status)


@contextlib.contextmanager
def untracked(trial: optuna.Trial, values: dict[str, Any]) -> Iterator[OnEpoch]:
    yield lambda epoch, row: None


def objective(
    params: Params,
    prepared_dir: Path,
    tracker: TrialTracker | None = None,
    worker: int = 0,
    gate: TrainingGate | None = None,
) -> Callable[[optuna.Trial], float]:
    """Train one sampled configuration; its value is the best epoch's metric. `gate`
    (pipelines.host) is honoured after every optimizer step of every trial."""
    from pipelines.train import train

    metric = params.tune.metric

    def run(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker)
        values = suggest(trial, params.tune.space)
        cfg = overlaid(params, values, source=f"tune trial {trial.number}")
        scope = tracker.trial if tracker is not None else untracked
        with scope(trial, values) as log_epoch, tempfile.TemporaryDirectory() as scratch:
            checkpoints = Path(scratch) / "checkpoints"  # its lock file goes with the scratch dir
            on_epoch = reporter(trial, metric, log_epoch)
            result = train(cfg, prepared_dir, checkpoints, on_epoch, gate=gate)
            return float(result.metrics[FINISHED_KEY[metric]])

    return run


# --- workers ----------------------------------------------------------------------------------


def work(
    params: Params,
    prepared_dir: Path,
    storage: str,
    name: str,
    worker: int = 0,
    tracker: TrialTracker | None = None,
    max_trials: int | None = None,
) -> int:
    """One worker: trials against the study, one at a time, until it holds `tune.trials` complete
    or pruned trials, the timeout, or `max_trials` run here. While the trials running on other
    workers would fill the budget it waits (they may fail, or their worker die). Returns the
    number of trials it ran; raises `PipelineError` after `tune.max_failed_trials` failed ones.

    Its trials honour the `host` section (`shared_host`: in shared mode training's share and
    the pause when the local service is over its SLO). A stop (SIGTERM) ends the running trial
    at its next step (`StopRequested`); the study keeps its finished trials, and the next run
    marks the stopped one failed (its heartbeat stopped) and runs another in its place."""
    with shared_host(params.host) as gate:
        return _work_trials(params, prepared_dir, storage, name, worker, tracker, max_trials, gate)


def _work_trials(
    params: Params,
    prepared_dir: Path,
    storage: str,
    name: str,
    worker: int,
    tracker: TrialTracker | None,
    max_trials: int | None,
    gate: TrainingGate,
) -> int:
    import optuna
    from optuna.trial import TrialState

    cfg = params.tune
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(params, name, make_storage(storage, cfg.heartbeat_s), worker)
    run_trial = objective(params, prepared_dir, tracker, worker, gate)
    deadline = time.monotonic() + cfg.timeout_s
    ran = failed = 0
    finished: list[optuna.trial.FrozenTrial] = []  # the trial a study.optimize call ran
    while (max_trials is None or ran < max_trials) and time.monotonic() < deadline:
        done, running = budget_counts(study)
        if done >= cfg.trials:
            log.info(
                "tune: worker %d: study %s holds %d complete or pruned trials", worker, name, done
            )
            break
        if done + running >= cfg.trials:  # the others' running trials fill it, if they finish
            time.sleep(min(cfg.heartbeat_s, max(0.0, deadline - time.monotonic())))
            continue
        if failed >= cfg.max_failed_trials:
            raise PipelineError(
                f"tune: worker {worker}: {failed} failed trials (tune.max_failed_trials "
                f"{cfg.max_failed_trials}); the study holds {done} of tune.trials {cfg.trials} "
                "complete or pruned trials. See the failed trials' MLflow runs (tag tune.error)"
            )
        finished.clear()
        study.optimize(
            run_trial,
            n_trials=1,
            catch=(Exception,),  # a crashed trial is recorded FAILED (its MLflow run has the error)
            callbacks=[lambda _study, trial: finished.append(trial)],
            gc_after_trial=False,
        )
        ran += 1
        if finished and finished[0].state == TrialState.FAIL:
            failed += 1
            log.warning(
                "tune: worker %d: trial %d failed (%d of tune.max_failed_trials %d)",
                worker,
                finished[0].number,
                failed,
                cfg.max_failed_trials,
            )
    return ran


def tracker_for(
    params: Params, root: Path, parent_run_id: str, name: str, worker: int
) -> TrialTracker:
    from pipelines.tracking import client_for, run_tags

    client, exp_id = client_for(params.tracking, root)
    return TrialTracker(client, exp_id, parent_run_id, name, worker, run_tags(root))


def spawn_workers(
    params: Params, prepared_dir: Path, params_file: Path, storage: str, parent: str | None
) -> list[subprocess.Popen[bytes]]:
    """Worker processes 0 .. tune.workers - 1 on these params (written to `params_file`), the
    host's CPU threads split between them; their trials nest under the MLflow run `parent`
    (none: not tracked)."""
    params_file.write_text(yaml.safe_dump(section_dict(params), sort_keys=False))
    threads = str(max(1, (os.cpu_count() or 1) // params.tune.workers))
    base = [sys.executable, "-m", "pipelines.tune", "--params", str(params_file)]
    base += ["--prepared", str(prepared_dir), "--worker", "--threads", threads]
    if parent is None:
        base.append("--untracked")
    handed_on = Environment(tune_storage=storage, tune_run_id=parent).exported()
    full_env = {**os.environ, **handed_on}
    return [
        subprocess.Popen([*base, "--worker-index", str(k)], env=full_env)
        for k in range(params.tune.workers)
    ]


def terminate(workers: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each worker still running."""
    for proc in workers:
        if proc.poll() is None:
            proc.terminate()


def run_study(
    params: Params, prepared_dir: Path, root: Path, trials_parent: str | None
) -> optuna.Study:
    """Create or resume the study, then run `tune.workers` workers on it: in this process when
    there is one, else as that many processes."""
    import optuna

    cfg = params.tune
    name = study_name(params, read_manifest(prepared_dir)["content_hash"])
    storage = storage_url(cfg, root)
    study = open_study(params, name, make_storage(storage, cfg.heartbeat_s), 0)  # creates it
    optuna.storages.fail_stale_trials(study)
    log.info("tune: study %s at %s, %d trials held", name, redacted(storage), len(study.trials))
    if cfg.workers == 1:
        tracker = tracker_for(params, root, trials_parent, name, 0) if trials_parent else None
        work(params, prepared_dir, storage, name, 0, tracker)
        return study
    with tempfile.TemporaryDirectory(prefix="tune-") as scratch:
        params_file = Path(scratch) / "params.yaml"
        workers = spawn_workers(params, prepared_dir, params_file, storage, trials_parent)
        gate = TrainingGate()  # SIGTERM: passed on; the workers stop at their trials' next step
        try:
            with stop_on_signal(gate, lambda: terminate(workers)):
                codes = [proc.wait() for proc in workers]
        finally:
            terminate(workers)  # this process was interrupted: no orphans
    if gate.stop_reason is not None:
        raise StopRequested(gate.stop_reason)
    if any(codes):
        raise PipelineError(f"tune: worker exit codes {codes}; see their logs above")
    return study


# --- results ----------------------------------------------------------------------------------


def summarize(study: optuna.Study, params: Params) -> tuple[dict[str, Any], dict[str, Any]]:
    """(best-params file content, metrics) of a finished study."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise PipelineError(
            f"tune: no trial of study {study.study_name} completed ({len(trials)} trials: "
            f"{counts[TrialState.PRUNED]} pruned, {counts[TrialState.FAIL]} failed); "
            "see the failed trials' MLflow runs (tag tune.error), or widen tune.space"
        )
    best = study.best_trial
    values = {key: best.params[key] for key in params.tune.space}
    content = {
        "format": BEST_FORMAT,
        "enabled": True,
        "study": study.study_name,
        "metric": params.tune.metric,
        "direction": params.tune.direction,
        "best_value": best.value,
        "best_trial": best.number,
        "params": values,
    }
    metrics = {
        "enabled": True,
        "best_value": best.value,
        "best_trial": best.number,
        "trials": len(trials),
        "trials_complete": counts[TrialState.COMPLETE],
        "trials_pruned": counts[TrialState.PRUNED],
        "trials_failed": counts[TrialState.FAIL],
        "epochs_total": sum(len(t.intermediate_values) for t in trials),
    }
    return content, metrics


DISABLED: dict[str, Any] = {"format": BEST_FORMAT, "enabled": False, "params": {}}


def tune(
    params: Params, prepared_dir: Path, root: Path, trials_parent: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run (or resume) the study; (best-params content, metrics). Disabled: nothing runs."""
    if not params.tune.enabled:
        return dict(DISABLED), {"enabled": False}
    return summarize(run_study(params, prepared_dir, root, trials_parent), params)


# --- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--prepared", type=Path, required=True, help="the prepare stage's folder")
    parser.add_argument("--out", type=Path, help="best-params file to write (the stage)")
    parser.add_argument("--metrics", type=Path, help="metrics JSON to write (the stage)")
    parser.add_argument("--worker", action="store_true", help="join the study as one worker")
    parser.add_argument("--worker-index", type=int, default=0, help="worker k samples with seed+k")
    parser.add_argument("--trials", type=int, help="with --worker: run at most this many trials")
    parser.add_argument("--threads", type=int, help="torch threads of this worker")
    parser.add_argument("--untracked", action="store_true", help="with --worker: no MLflow")
    args = parser.parse_args(argv)
    if not args.worker and (args.out is None or args.metrics is None):
        parser.error("the stage needs --out and --metrics (or run one --worker)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with stopped_cleanly():  # SIGTERM in shared_host: the trial stops at its next step
        if args.worker:
            run_cli(
                lambda params: _work(
                    params, args.prepared, args.worker_index, args.trials, args.untracked
                ),
                args.params,
            )
        else:
            run_cli(lambda params: _run(params, args.prepared, args.out, args.metrics), args.params)


def check_devices(params: Params) -> None:
    """`cuda` as train.device, or among the choices of `tune.space`'s train.device, needs a CUDA
    device on this host: checked once, before the first trial, not by every trial failing."""
    wanted: list[tuple[str, object]] = [("train.device", params.train.device)]
    dim = params.tune.space.get("train.device")
    wanted += [("tune.space.train.device", choice) for choice in (dim.choices or [])] if dim else []
    if not any(value == "cuda" for _, value in wanted):
        return
    import torch

    if not torch.cuda.is_available():
        key = next(key for key, value in wanted if value == "cuda")
        raise ParamsError(f"{key}: 'cuda' but this host has no CUDA device; use auto or cpu")


def _run(params: Params, prepared_dir: Path, out: Path, metrics_path: Path) -> None:
    from pipelines.tracking import stage_run

    if params.tune.enabled:
        check_devices(params)
    manifest = read_manifest(prepared_dir)
    section = {"tune": section_dict(params.tune), "train": section_dict(params.train)}
    root = Path.cwd()
    with (
        study_lock(params.tune),
        stage_run("tune", params, section, root, data_hash=manifest["content_hash"]) as run,
    ):
        start = time.perf_counter()
        content, metrics = tune(params, prepared_dir, root, run.run_id)
        if params.tune.enabled:
            metrics["seconds"] = time.perf_counter() - start
            run.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, bool)})
            run.log_params({"best": content["params"]})
            run.set_tags({"tune.study": content["study"]})
        run.set_tags({"tune.enabled": params.tune.enabled})
        write_json(out, content)
        write_json(metrics_path, metrics)
        run.log_artifact(out)
        log.info("tune: %s -> %s (%s)", prepared_dir, out, metrics)


def _work(
    params: Params, prepared_dir: Path, worker: int, max_trials: int | None, untracked: bool
) -> None:
    """One worker. Under the stage its trials nest under the stage's run; started on its own
    (e.g. by the `tune-worker` flow on another host) it opens a `tune-worker` run for them."""
    from pipelines.tracking import stage_run

    if not params.tune.enabled:
        raise ParamsError("tune.enabled is false in params.yaml: no study to work on")
    check_devices(params)
    root = Path.cwd()
    name = study_name(params, read_manifest(prepared_dir)["content_hash"])
    storage = storage_url(params.tune, root)
    parent = environment().tune_run_id
    if untracked:
        work(params, prepared_dir, storage, name, worker, None, max_trials)
        return
    if parent:
        tracker = tracker_for(params, root, parent, name, worker)
        work(params, prepared_dir, storage, name, worker, tracker, max_trials)
        return
    section = {"tune": section_dict(params.tune)}
    with stage_run("tune-worker", params, section, root) as run:
        tracker = tracker_for(params, root, run.run_id, name, worker)
        ran = work(params, prepared_dir, storage, name, worker, tracker, max_trials)
        run.set_tags({"tune.study": name, "tune.trials_run": ran})


if __name__ == "__main__":
    main()
