"""The `train` stage: learning, determinism, checkpoints and resume, outputs, MLflow."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipelines.artifacts import read_json, write_json
from pipelines.config import load_params
from pipelines.errors import CheckpointError, DataSourceError, ParamsError
from pipelines.models import load_model, save_model
from pipelines.prepare import read_split
from pipelines.train import TrainResult, main, train
from pipelines.training.checkpoints import (
    CHECKPOINT_FORMAT,
    CheckpointDir,
    latest_checkpoint,
    read_checkpoint,
)
from pipelines.training.data import split_arrays
from tests.helpers.locks import held_elsewhere
from tests.helpers.params import tiny_params, write_params_file
from tests.helpers.train_stage import train_stage

# On top of tiny_params(): three epochs, no early stop, in-process loading.
LOOP = {"train.epochs": 3, "train.patience": 10, "train.num_workers": 0}


class Crash(Exception):
    """Stands for a process dying after some epoch."""


def crash_after(epoch: int) -> Any:
    def on_epoch(done: int, row: dict[str, float]) -> None:
        if done == epoch:
            raise Crash

    return on_epoch


def numbers(result: TrainResult) -> tuple[Any, ...]:
    """Everything a run computes, without wall-clock times."""
    history = [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]
    metrics = {k: v for k, v in result.metrics.items() if "sec" not in k}
    metrics.pop("resumed_from_epoch")
    return history, metrics


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def val_inputs(prepared: Path) -> torch.Tensor:
    manifest = read_json(prepared / "manifest.json")
    x, _ = split_arrays(read_split(prepared, "val"), manifest, "val")
    return torch.from_numpy(x)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_each_arch_learns_well_above_chance(arch: str, prepared: Path, tmp_path: Path) -> None:
    cfg = tiny_params(LOOP, train__model__arch=arch, train__epochs=5, train__model__width=32).train
    result = train(cfg, prepared, tmp_path / "ckpt")
    assert result.metrics["val_accuracy"] > 0.6  # 10 classes: chance is 0.1
    assert result.metrics["epochs_run"] == len(result.history) == 5
    assert result.metrics["resumed_from_epoch"] is None
    assert result.model_args["arch"] == arch == result.metadata["arch"]
    assert not result.model.training
    lrs = [row["lr"] for row in result.history]
    assert lrs[0] == cfg.lr and lrs == sorted(lrs, reverse=True)  # cosine decay


def test_same_seed_gives_identical_numbers_and_weights(prepared: Path, tmp_path: Path) -> None:
    cfg = tiny_params(LOOP).train
    first, second = (train(cfg, prepared, tmp_path / name) for name in ("a", "b"))
    assert numbers(first) == numbers(second)
    assert_same_weights(first.model, second.model)
    other = train(cfg.model_copy(update={"seed": 1}), prepared, tmp_path / "c")
    assert numbers(other) != numbers(first)


def test_resume_after_a_crash_matches_an_uninterrupted_run(
    prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_params(LOOP, train__epochs=4).train
    whole = train(cfg, prepared, tmp_path / "whole")
    with pytest.raises(Crash):
        train(cfg, prepared, tmp_path / "ckpt", on_epoch=crash_after(2))
    assert latest_checkpoint(tmp_path / "ckpt") == tmp_path / "ckpt" / "epoch-00002.ckpt"
    assert read_checkpoint(tmp_path / "ckpt" / "epoch-00002.ckpt")["epoch"] == 2
    with caplog.at_level(logging.INFO, logger="pipelines.train"):
        resumed = train(cfg, prepared, tmp_path / "ckpt")
    assert "resuming from epoch 2" in caplog.text
    assert resumed.metrics["resumed_from_epoch"] == 2
    assert numbers(resumed) == numbers(whole)
    assert_same_weights(resumed.model, whole.model)


def test_loader_workers_change_nothing_even_across_a_resume(prepared: Path, tmp_path: Path) -> None:
    cfg = tiny_params(LOOP).train
    plain = train(cfg, prepared, tmp_path / "plain")
    workers = cfg.model_copy(update={"num_workers": 2})
    with pytest.raises(Crash):
        train(workers, prepared, tmp_path / "workers", on_epoch=crash_after(1))
    resumed = train(workers, prepared, tmp_path / "workers")
    assert resumed.metrics["resumed_from_epoch"] == 1
    assert numbers(resumed) == numbers(plain)
    assert_same_weights(resumed.model, plain.model)


def test_a_changed_config_or_resume_off_starts_fresh(
    prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_params(LOOP).train
    with pytest.raises(Crash):
        train(cfg, prepared, tmp_path, on_epoch=crash_after(1))
    with caplog.at_level(logging.INFO, logger="pipelines.train"):
        changed = train(cfg.model_copy(update={"lr": cfg.lr / 2}), prepared, tmp_path)
    assert changed.metrics["resumed_from_epoch"] is None
    assert "other params or data" in caplog.text and "starting fresh" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines.train"):
        again = train(cfg.model_copy(update={"lr": cfg.lr / 2}), prepared, tmp_path)
    assert "finished run; starting fresh" in caplog.text  # stale code must not skip training
    assert again.metrics["resumed_from_epoch"] is None
    with pytest.raises(Crash):
        train(cfg, prepared, tmp_path, on_epoch=crash_after(1))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines.train"):
        off = train(cfg.model_copy(update={"resume": False}), prepared, tmp_path)
    assert "train.resume is false" in caplog.text
    assert off.metrics["resumed_from_epoch"] is None


def test_early_stopping_keeps_the_best_epoch(
    prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_params(LOOP, train__epochs=10, train__patience=2, train__min_delta=100.0).train
    with caplog.at_level(logging.INFO, logger="pipelines.train"):
        result = train(cfg, prepared, tmp_path)
    # No epoch beats the first by min_delta: two more epochs, then stop; epoch 1 is kept.
    assert result.metrics["epochs_run"] == 3
    assert result.metrics["best_epoch"] == 1 == result.metadata["best_epoch"]
    assert result.metrics["best_val_loss"] == result.history[0]["val_loss"]
    assert "early stop after epoch 3" in caplog.text


def test_constant_schedule_and_one_log_line_per_epoch(
    prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_params(LOOP, train__scheduler="constant", train__model__arch="mlp").train
    with caplog.at_level(logging.INFO, logger="pipelines.train"):
        result = train(cfg, prepared, tmp_path)
    assert {row["lr"] for row in result.history} == {cfg.lr}
    lines = [r.getMessage() for r in caplog.records if "train: epoch" in r.getMessage()]
    assert len(lines) == 3
    for word in ("epoch 3/3", "train_loss", "val_loss", "val_acc", "lr", "s"):
        assert word in lines[-1]


def test_checkpoint_every_epoch_holds_the_whole_state(prepared: Path, tmp_path: Path) -> None:
    cfg = tiny_params(LOOP).train
    seen = []
    for epoch in (1, 2):  # die after each epoch in turn: every run resumes the previous one
        with pytest.raises(Crash):
            train(cfg, prepared, tmp_path, on_epoch=crash_after(epoch))
        seen.append(read_checkpoint(tmp_path / f"epoch-{epoch:05d}.ckpt"))
    result = train(cfg, prepared, tmp_path)
    # The newest two are kept (the older one is the next temp file); nothing else is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-00002.ckpt", "epoch-00003.ckpt"]
    last = read_checkpoint(tmp_path / "epoch-00003.ckpt")
    assert [c["epoch"] for c in [*seen, last]] == [1, 2, 3]
    assert last["finished"] and not seen[-1]["finished"]
    assert set(last) >= {"model", "optimizer", "scheduler", "rng", "early_stopping", "history"}
    assert set(last["rng"]) == {"torch", "cuda", "numpy", "python", "shuffle"}
    assert last["model_args"] == result.model_args
    assert last["fingerprint"] == result.metadata["fingerprint"]
    assert [row["epoch"] for row in last["history"]] == [1, 2, 3]
    assert result.metrics["resumed_from_epoch"] == 2


def test_a_save_killed_mid_write_leaves_nothing_that_stops_the_resume(
    prepared: Path, tmp_path: Path
) -> None:
    """A kill -9 during a checkpoint save leaves `atomic_path`'s temp folder (with the half-written
    file in it), or an older version's temp file: the next run removes both and resumes (a
    breaker's finding: the folder made every later run fail with IsADirectoryError)."""
    cfg = tiny_params(LOOP, train__epochs=3).train
    whole = train(cfg, prepared, tmp_path / "whole")
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        train(cfg, prepared, ckpt, on_epoch=crash_after(2))
    folder = ckpt / ".epoch-00003.ckpt.somehost-4194301.x1y2.tmp"
    folder.mkdir()
    (folder / "epoch-00003.ckpt").write_bytes(b"half a checkpoint")
    (ckpt / ".epoch-00003.ckpt.tmp").write_bytes(b"half a checkpoint")
    resumed = train(cfg, prepared, ckpt)
    assert resumed.metrics["resumed_from_epoch"] == 2
    assert numbers(resumed) == numbers(whole)
    assert not list(ckpt.glob(".*"))  # no temp file or folder left


def test_a_truncated_newest_checkpoint_is_skipped_and_the_older_one_resumed(
    prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_params(LOOP, train__epochs=4).train
    whole = train(cfg, prepared, tmp_path / "whole")
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        train(cfg, prepared, ckpt, on_epoch=crash_after(3))
    older, newest = ckpt / "epoch-00002.ckpt", ckpt / "epoch-00003.ckpt"
    kept = older.read_bytes()
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut by a kill
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(newest)
    with caplog.at_level(logging.INFO, logger="pipelines.train"), pytest.raises(Crash):
        train(cfg, prepared, ckpt, on_epoch=crash_after(3))  # dies again after one epoch
    assert f"skipping {newest}" in caplog.text
    assert "resuming from epoch 2" in caplog.text and "starting fresh" not in caplog.text
    assert older.read_bytes() == kept  # the readable one survived the broken newer one
    assert read_checkpoint(newest)["epoch"] == 3  # rewritten whole by the resumed run
    resumed = train(cfg, prepared, ckpt)
    assert resumed.metrics["resumed_from_epoch"] == 3
    assert numbers(resumed) == numbers(whole)
    assert_same_weights(resumed.model, whole.model)


def test_no_readable_checkpoint_starts_fresh_naming_each_file(
    prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_params(LOOP).train
    with pytest.raises(Crash):
        train(cfg, prepared, tmp_path / "ckpt", on_epoch=crash_after(2))
    files = sorted((tmp_path / "ckpt").glob("epoch-*.ckpt"))
    for path in files:
        path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.INFO, logger="pipelines.train"):
        result = train(cfg, prepared, tmp_path / "ckpt")
    assert all(f"skipping {path}" in caplog.text for path in files) and len(files) == 2
    assert "no readable checkpoint" in caplog.text and "starting fresh" in caplog.text
    assert result.metrics["resumed_from_epoch"] is None


def test_a_checkpoint_loads_tensors_and_plain_data_only(tmp_path: Path) -> None:
    """weights_only: a checkpoint holding any other object is refused, and no code runs."""
    path = tmp_path / "epoch-00001.ckpt"
    torch.save({"format": CHECKPOINT_FORMAT, "epoch": 1, "hook": Crash()}, path)
    with pytest.raises(CheckpointError, match=r"cannot be read: Unsupported global.*Crash") as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value)  # one line for the log
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(tmp_path / "junk.ckpt")


def test_the_same_checkpoint_content_gives_the_same_bytes(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(Crash):
        train(tiny_params(LOOP).train, prepared, tmp_path / "a", on_epoch=crash_after(1))
    first = tmp_path / "a" / "epoch-00001.ckpt"
    again = CheckpointDir(tmp_path / "b").save(read_checkpoint(first))
    assert again.read_bytes() == first.read_bytes()


def test_model_file_reloads_and_predicts_the_same(prepared: Path, tmp_path: Path) -> None:
    result = train(tiny_params(LOOP).train, prepared, tmp_path / "ckpt")
    save_model(tmp_path / "model.pt", result)
    content = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(content) == {"format", "model_args", "state_dict", "metadata"}
    model, metadata = load_model(tmp_path / "model.pt")
    assert not model.training
    x = val_inputs(prepared)
    with torch.no_grad():
        assert torch.equal(model(x), result.model(x))
    assert metadata["labels"] == list(range(10)) and metadata["label_column"] == "label"
    assert metadata["input_shape"] == [1, 8, 8] == metadata["preprocessing"]["input_shape"]
    assert metadata["content_hash"] == read_json(prepared / "manifest.json")["content_hash"]
    assert metadata["torch_version"] == torch.__version__
    assert metadata["val_accuracy"] == result.metrics["val_accuracy"]


def test_unusable_inputs_raise_errors_a_user_can_act_on(prepared: Path, tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a readable model file"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="run the train stage"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(DataSourceError, match="run the prepare stage"):
        train(tiny_params(LOOP).train, tmp_path / "nothing", tmp_path / "ckpt")
    odd = tmp_path / "odd"
    shutil.copytree(prepared, odd)
    manifest = read_json(odd / "manifest.json")
    write_json(odd / "manifest.json", {**manifest, "labels": list(range(9))})
    with pytest.raises(DataSourceError, match="label values 9 are not in"):
        train(tiny_params(LOOP).train, odd, tmp_path / "ckpt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_a_gpu_is_rejected(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="no CUDA device"):
        train(tiny_params(LOOP, train__device="cuda").train, prepared, tmp_path)


@pytest.mark.gpu
def test_cuda_bf16_with_loader_workers(prepared: Path, tmp_path: Path) -> None:
    cfg = tiny_params(LOOP, train__device="cuda", train__bf16=True, train__num_workers=2).train
    result = train(cfg, prepared, tmp_path)
    assert result.metrics["val_accuracy"] > 0.3
    assert next(result.model.parameters()).device.type == "cpu"


def run_main(project: Path, prepared: Path) -> dict[str, Path]:
    outputs = {
        "model": project / "models" / "train" / "model.pt",
        "metrics": project / "metrics" / "train.json",
        "plots": project / "plots" / "train.csv",
        "checkpoint-dir": project / "checkpoints" / "train",
    }
    argv = ["--params", str(project / "params.yaml"), "--prepared", str(prepared)]
    for name, path in outputs.items():
        argv += [f"--{name}", str(path)]
    main(argv)
    return outputs


def test_main_writes_outputs_and_tracks_epochs_and_a_reloadable_mlflow_model(
    prepared: Path, tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    write_params_file(tiny_params(LOOP), tmp_path)
    monkeypatch.chdir(tmp_path)
    out = run_main(tmp_path, prepared)
    metrics = read_json(out["metrics"])
    assert set(metrics) == {
        "best_epoch",
        "epochs_run",
        "best_val_loss",
        "val_accuracy",
        "train_samples_per_sec",
        "train_seconds",
        "resumed_from_epoch",
    }
    with out["plots"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "val_accuracy", "lr"]
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    model, _ = load_model(out["model"])

    client = mlflow.MlflowClient(mlflow_uri)
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`mlops.stage` = 'train'"
    )
    history = client.get_metric_history(run.info.run_id, "epoch.val_loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == [float(row["val_loss"]) for row in rows]
    assert run.data.metrics["val_accuracy"] == metrics["val_accuracy"]
    assert run.data.tags["train.resumed"] == "False"
    assert len(run.data.tags["train.fingerprint"]) == 64
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "train.csv"} <= names

    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    x = val_inputs(prepared)[:7]  # the input example has 4 rows: the batch axis is dynamic
    with torch.no_grad():
        np.testing.assert_allclose(logged(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)


def read_epoch(checkpoint_dir: Path) -> int:
    """The newest checkpoint's epoch; 0 before the first (or while it is being replaced)."""
    path = latest_checkpoint(checkpoint_dir)
    try:
        return int(read_checkpoint(path)["epoch"]) if path else 0
    except CheckpointError:  # removed between listing and reading: a newer one exists
        return 0


@pytest.mark.slow
def test_kill_9_mid_run_then_restart_resumes_to_the_same_result(
    prepared: Path, tmp_path: Path
) -> None:
    """A real `python -m pipelines.train` killed with SIGKILL after epoch 2, started again."""
    epochs = 8
    stage = train_stage(tmp_path, prepared, epochs)
    command, env, checkpoints = stage.command, stage.env, stage.checkpoints

    first = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while read_epoch(checkpoints) < 2:
        assert first.poll() is None, first.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint of epoch 2 within 60 s"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = read_epoch(checkpoints)
    assert 2 <= killed_at < epochs, "the run finished before it was killed: make epochs slower"
    assert not (tmp_path / "metrics" / "train.json").exists()

    second = subprocess.run(
        command, check=False, cwd=tmp_path, env=env, capture_output=True, timeout=120
    )
    assert second.returncode == 0, second.stderr.decode()[-2000:]
    assert f"resuming from epoch {killed_at}" in second.stderr.decode()
    metrics = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert metrics["resumed_from_epoch"] == killed_at

    cfg = load_params(tmp_path / "params.yaml").train
    whole = train(cfg, prepared, tmp_path / "uninterrupted")
    resumed, _ = load_model(tmp_path / "models" / "train" / "model.pt")
    assert_same_weights(resumed, whole.model)
    for key in ("best_epoch", "epochs_run", "best_val_loss", "val_accuracy"):
        assert metrics[key] == whole.metrics[key], key


def test_a_second_train_into_a_held_checkpoint_dir_fails_fast_naming_the_holder(
    prepared: Path,
    tmp_path: Path,
    mlflow_uri: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_params_file(tiny_params(LOOP), tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["--prepared", str(prepared), "--model", "model.pt", "--metrics", "train.json"]
    argv += ["--plots", "train.csv", "--checkpoint-dir", "checkpoints/train"]
    with held_elsewhere(Path("checkpoints/train")) as pid, pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: checkpoints/train is in use by PID {pid}"
    )
    assert not Path("model.pt").exists() and not Path("train.json").exists()
    main(argv)  # the holder gone (killed: the kernel dropped its lock), the stage runs
    assert read_json(Path("train.json"))["epochs_run"] == 3


@pytest.mark.parametrize(
    ("rows", "batch"),
    [(1257, 64), (124, 7), (16, 1), (5, 1), (2000, 64)],
)
def test_a_small_training_split_gets_smaller_batches(rows: int, batch: int) -> None:
    """train.min_batches_per_epoch (16): at least that many steps an epoch where rows allow."""
    from pipelines.training.loop import fitted_to

    cfg = tiny_params(LOOP).train
    fitted = fitted_to(cfg, rows)
    assert fitted.batch_size == batch
    assert (fitted is cfg) == (batch == cfg.batch_size)
    assert fitted.model_copy(update={"batch_size": cfg.batch_size}) == cfg


def test_tabular_rows_are_scaled_inside_the_model_by_training_split_statistics(
    tmp_path: Path,
) -> None:
    """Standard scaling (data.scaling auto) fitted on the training split only, held as buffers
    of the model (saved and reloaded with it), applied to raw feature values."""
    from pipelines.prepare import prepare
    from pipelines.scaling import Scaled
    from tests.helpers.modelzoo import TABULAR_FEATURES, tabular_params

    params = tabular_params(tmp_path)
    prepared = tmp_path / "prepared"
    prepare(params.data, params.prepare, tmp_path, prepared)
    result = train(params.train, prepared, tmp_path / "checkpoints")
    assert isinstance(result.model, Scaled) and result.model_args["scaler"]["kind"] == "standard"
    rows = read_split(prepared, "train")[TABULAR_FEATURES].to_numpy(np.float64)
    state = result.model.state_dict()
    assert np.allclose(state["scaler.shift"].numpy(), rows.mean(axis=0), rtol=1e-5)
    assert np.allclose(state["scaler.scale"].numpy(), rows.std(axis=0), rtol=1e-5)
    save_model(tmp_path / "model.pt", result)
    model, metadata = load_model(tmp_path / "model.pt")
    assert metadata["preprocessing"]["model_scaling"] == "standard"
    x = val_inputs(prepared)
    assert float(x.abs().max()) > 1000  # raw values: the myriads column
    with torch.no_grad():
        assert torch.equal(model(x), result.model(x))
    assert result.metrics["val_accuracy"] >= 0.9  # 3 well-separated classes
