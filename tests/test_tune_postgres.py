"""The README's several-hosts tuning recipe, for real: one PostgreSQL study (Debian's server,
started here with initdb + pg_ctl), tune workers in two network namespaces that reach it only over
their own veth link (as other hosts would), one worker killed mid-trial. Needs root (namespaces,
and the server runs as the `postgres` user), `ip` and PostgreSQL's server binaries (.ci/run
installs them)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pipelines.config import Params, section_dict
from pipelines.tune import make_storage, open_study, study_name
from tests.helpers import REPO
from tests.helpers.processes import free_port
from tests.test_tune import tune_params

pytestmark = pytest.mark.slow
PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parts[-3])
# The namespaces and links this test makes (and removes): "<ns>" and its veth pair "<ns>0"/"<ns>1",
# with <subnet>.1 on the host's side (PostgreSQL listens there) and <subnet>.2 inside.
HOSTS = {"h3-a": "10.200.31", "h3-b": "10.200.32"}
PASSWORD = "secret"  # of a throwaway server


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=check, capture_output=True, text=True, timeout=60)


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: network namespaces, and a PostgreSQL server run as `postgres`"
    if not PG_BINS or shutil.which("ip") is None or shutil.which("runuser") is None:
        return "needs PostgreSQL's server binaries, iproute2 and runuser (.ci/run installs them)"
    return None


def link(ns: str) -> str:
    return ns.replace("-", "")


def remove_namespaces() -> None:
    for ns in HOSTS:
        sh("ip", "netns", "del", ns, check=False)  # takes its end of the veth pair, so both
        sh("ip", "link", "del", f"{link(ns)}0", check=False)


@contextlib.contextmanager
def namespaces() -> Iterator[None]:
    """Two namespaces, each with a veth link to this one; removed afterwards."""
    remove_namespaces()  # a killed earlier run's
    try:
        for ns, subnet in HOSTS.items():
            host_end, ns_end = f"{link(ns)}0", f"{link(ns)}1"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end, "netns", ns)
            sh("ip", "addr", "add", f"{subnet}.1/24", "dev", host_end)
            sh("ip", "link", "set", host_end, "up")
            sh("ip", "-n", ns, "addr", "add", f"{subnet}.2/24", "dev", ns_end)
            sh("ip", "-n", ns, "link", "set", ns_end, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        remove_namespaces()


@contextlib.contextmanager
def postgres(port: int) -> Iterator[Path]:
    """A PostgreSQL server of its own (user `optuna`, database `optuna`, password auth from the
    namespaces' subnets), listening on the host's ends of the links; its folder, for the log."""
    bin_dir = PG_BINS[-1].parent
    base = Path(tempfile.mkdtemp(prefix="tune-pg-"))  # not under pytest's 0700 root-only tmp
    as_postgres = ["runuser", "-u", "postgres", "--"]
    try:
        (base / "pw").write_text(PASSWORD)
        shutil.chown(base, "postgres")
        shutil.chown(base / "pw", "postgres")
        initdb = [str(bin_dir / "initdb"), "-D", str(base / "data"), "-U", "optuna"]
        initdb += [f"--pwfile={base / 'pw'}", "--auth-local=trust", "--auth-host=scram-sha-256"]
        sh(*as_postgres, *initdb)
        with (base / "data" / "pg_hba.conf").open("a") as hba:
            for subnet in HOSTS.values():
                hba.write(f"host all optuna {subnet}.0/24 scram-sha-256\n")
        listen = ",".join(f"{subnet}.1" for subnet in HOSTS.values())
        options = f"-c listen_addresses={listen} -p {port} -c unix_socket_directories={base}"
        pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(base / "data"), "-l", str(base / "log")]
        sh(*as_postgres, *pg_ctl, "-w", "-t", "60", "-o", options, "start")
        try:
            createdb = [str(bin_dir / "createdb"), "-h", str(base), "-p", str(port)]
            sh(*as_postgres, *createdb, "-U", "optuna", "optuna")
            yield base
        finally:
            sh(*as_postgres, *pg_ctl, "-m", "immediate", "stop", check=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def worker(
    ns: str, params_file: Path, prepared: Path, index: int, port: int, log: Path
) -> subprocess.Popen[bytes]:
    """`python -m pipelines.tune --worker` inside namespace `ns`: it reaches the database only at
    the host's end of its link."""
    url = f"postgresql://optuna:{PASSWORD}@{HOSTS[ns]}.1:{port}/optuna"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLOPS_TUNE_STORAGE": url}
    command = ["ip", "netns", "exec", ns, sys.executable, "-m", "pipelines.tune"]
    command += ["--params", str(params_file), "--prepared", str(prepared), "--worker"]
    command += ["--worker-index", str(index), "--threads", "1", "--untracked"]
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=params_file.parent, env=env, stdout=out, stderr=out)


def running_trial_of(study: optuna.Study, index: int) -> optuna.trial.FrozenTrial | None:
    """A trial of worker `index` that is running and has reported an epoch (mid-trial)."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("worker") == index and trial.intermediate_values:
            return trial
    return None


def tiny(tmp_path: Path) -> Params:
    none = {"kind": "none", "startup_trials": 0, "warmup_epochs": 0, "min_epochs": 1}
    params = tune_params(tmp_path, trials=4, workers=2, pruner={**none, "reduction_factor": 3})
    epochs = {"epochs": 5, "patience": 5}  # a few seconds a trial: time to kill one mid-way
    return params.model_copy(update={"train": params.train.model_copy(update=epochs)})


@pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
def test_workers_on_two_hosts_share_one_postgres_study(tmp_path: Path, prepared: Path) -> None:
    params = tiny(tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(section_dict(params), sort_keys=False))
    name = study_name(params, json.loads((prepared / "manifest.json").read_text())["content_hash"])
    port = free_port()
    with namespaces(), postgres(port) as pg:
        # the stage's part (on the first host): the schema and the study, then workers join
        url = f"postgresql://optuna:{PASSWORD}@{HOSTS['h3-a']}.1:{port}/optuna"
        study = open_study(params, name, make_storage(url, params.tune.heartbeat_s), 0)
        logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
        procs = [
            worker("h3-a", params_file, prepared, 0, port, logs[0]),
            worker("h3-b", params_file, prepared, 1, port, logs[1]),
        ]
        try:
            deadline = time.monotonic() + 60
            while running_trial_of(study, 0) is None:
                assert time.monotonic() < deadline, "worker a never got mid-trial"
                assert procs[0].poll() is None, logs[0].read_text()
                time.sleep(0.2)
            killed = running_trial_of(study, 0)
            procs[0].send_signal(signal.SIGKILL)  # `ip netns exec` exec'd python: this is it
            procs[0].wait(timeout=30)
            assert procs[1].wait(timeout=90) == 0, logs[1].read_text()
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        trials = study.get_trials(deepcopy=False)
        states = [t.state for t in trials]
        assert states.count(TrialState.COMPLETE) == params.tune.trials, (pg / "log").read_text()
        assert killed is not None and trials[killed.number].state == TrialState.FAIL
        assert {t.user_attrs["worker"] for t in trials} == {0, 1}
        assert TrialState.RUNNING not in states
