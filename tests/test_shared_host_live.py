"""One host for both jobs, live (issue 14): a real `bentoml serve`, a real request load
(benchmarks/serve_openloop.py, open loop, far over the service's capacity) and a real
`python -m pipelines.train` in `host.mode: shared` on this machine. The controller reading the
service's /metrics pauses training while the load is high; training resumes after the load drops
and finishes with its outputs.

Not timing-fragile on a loaded box: the load is an overload (requests wait for seconds, far over
`host.slo.p99_ms`; the service even answers its /metrics too late, which counts as a breach too),
and every wait is "until a line shows, within a generous deadline"; the order of events is what
is asserted, not their durations."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from inference import metrics as service_metrics
from tests.helpers import REPO
from tests.helpers.params import tiny_params, write_params_file
from tests.helpers.processes import stop_group
from tests.helpers.serving import live_service, tiny_bento_model

pytestmark = pytest.mark.slow

EPOCHS = 40  # ~0.1-0.5 s each here: the run is still going when the load starts
OVERLOAD_RATE = 3000  # requests/s: several times what one worker serves on this machine
PAUSED = "host: training paused"
RESUMED = "host: training at full share"


class Lines:
    """A process's output, line by line, each with the monotonic time it arrived."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.lines: list[tuple[float, str]] = []
        self.process = process
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))

    def first(self, text: str, after: float = 0.0, timeout_s: float = 60.0) -> float:
        """The arrival time of the first line containing `text` at or after `after`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for when, line in list(self.lines):
                if when >= after and text in line:
                    return when
            if self.process.poll() is not None and not self._thread.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r} within {timeout_s} s:\n{self.text()}")

    def between(self, text: str, start: float, end: float) -> list[str]:
        return [line for when, line in self.lines if start <= when <= end and text in line]

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)[-4000:]


def shared_params(root: Path, metrics_url: str) -> Path:
    """The shrunk params in shared mode against the live service: a tight SLO on requests in
    flight, a fast poll and a short hysteresis; written as `root`/params.yaml."""
    params = tiny_params(
        {
            "train.epochs": EPOCHS,
            "train.patience": EPOCHS,
            "train.model.width": 32,
            "train.device": "cpu",
            "host.mode": "shared",
            "host.slo.metrics_url": metrics_url,
            "host.slo.p99_ms": 100,
            "host.slo.max_in_flight": 4,
            "host.poll_ms": 200,
            "host.resume_after_s": 1,
        }
    )
    return write_params_file(params, root)


@pytest.fixture
def overload(tmp_path: Path) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """A function that starts the open-loop overload against a URL; stopped afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"rows": [[8.0] * 64]}))

    def start(url: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, str(REPO / "benchmarks" / "serve_openloop.py")]
        command += ["--url", f"{url}/predict", "--body-file", str(body)]
        command += ["--rate", str(OVERLOAD_RATE), "--duration", "120"]
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        started.append(process)
        return process

    yield start
    for process in started:
        stop_group(process, grace_s=5)


def test_training_pauses_while_the_load_is_high_and_finishes_after(
    tmp_path: Path, overload: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    _, prepared = tiny_bento_model(tmp_path / "model")
    with live_service(log=tmp_path / "serve.log") as url:
        shared_params(tmp_path, f"{url}/metrics")
        command = [sys.executable, "-m", "pipelines.train", "--prepared", str(prepared)]
        command += ["--model", "model.pt", "--metrics", "train.json", "--plots", "train.csv"]
        command += ["--checkpoint-dir", "checkpoints"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
        training = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        lines = Lines(training)
        try:
            lines.first("epoch 1/", timeout_s=120)  # training runs, the controller watches
            assert not lines.between(PAUSED, 0, time.monotonic()), lines.text()
            load_started = time.monotonic()
            load = overload(url)
            paused = lines.first(PAUSED, after=load_started, timeout_s=30)
            time.sleep(3)  # the load stays high: training stays paused
            stop_group(load, grace_s=5)
            load_stopped = time.monotonic()
            resumed = lines.first(RESUMED, after=paused, timeout_s=60)
            assert training.wait(timeout=300) == 0, lines.text()
            # The p99 the controller read came from service.py's fine buckets (0.5 ms, x1.25)
            scrape = service_metrics.parse(httpx.get(f"{url}/metrics", timeout=10).text)
            assert min(scrape.buckets) == pytest.approx(0.0005), sorted(scrape.buckets)[:5]
            assert len(scrape.buckets) > 40 and scrape.buckets[math.inf] > 0
        finally:
            if training.poll() is None:
                stop_group(training, grace_s=10)
    assert resumed >= load_stopped, f"resumed while the load was still high:\n{lines.text()}"
    # At most the epoch whose validation ran while the pause was decided: none after it.
    assert len(lines.between("epoch ", paused, load_stopped)) <= 1, lines.text()
    assert lines.between("epoch ", resumed, time.monotonic()), lines.text()
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["epochs_run"] == EPOCHS
    assert (tmp_path / "model.pt").is_file()
    host = host_metrics(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert host["host.pauses"] >= 1
    assert host["host.paused_seconds"] >= 2  # at least the 3 s the load was held high


def host_metrics(tracking_uri: str) -> dict[str, float]:
    """The host.* metrics of the one train run in the store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.`mlops.stage` = 'train'")
    assert len(runs) == 1, [r.data.tags for r in runs]
    return {k: v for k, v in runs[0].data.metrics.items() if k.startswith("host.")}
