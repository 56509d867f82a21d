"""Versions of the service as programs of a real supervisord (Debian's `supervisor`).

supervisord's config, socket, pid file and logs live under MLOPS_SERVING_HOME; it is started
(daemonized, so it outlives the flow and the worker that started it) when its socket does not
answer. Each version is one supervisor group `v<version>` in conf.d/v<version>.conf holding
`deploy.replicas` programs `bentoml serve <bento tag> --host 127.0.0.1 --port P`, each with a
BENTOML_HOME of its own that links to the host's store (see `run_home`), MLOPS_API_KEY in its
environment, and autorestart on. Control goes through
`supervisorctl -c <conf>` (its documented CLI): `update <group>` adds or removes a group after
its file is written or deleted; `status` lists the programs.

nginx runs under the same supervisord (program `proxy`, `daemon off`).

systemd alternative (hosts that use systemd instead of supervisor): a template unit
`/etc/systemd/system/mlops-serve@.service` with

    [Service]
    Environment=BENTOML_HOME=/srv/mlops/bentoml
    EnvironmentFile=/etc/mlops/serving.env      # MLOPS_API_KEY=...
    ExecStart=/opt/mlops/.venv/bin/bentoml serve %i --host 127.0.0.1 --port ${PORT}
    Restart=always

instantiated per replica (`systemctl start mlops-serve@<tag>` with a drop-in setting PORT), and
nginx's own unit with `ExecReload=/usr/sbin/nginx -s reload`. This module drives supervisord only.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from inference.errors import HostError
from inference.settings import HostSettings
from pipelines.config import Environment

PROXY_PROGRAM = "proxy"
LAUNCHER = Path(__file__).with_name("serve.py")  # a replica's command (stdlib only)
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Replica:
    name: str  # supervisor's "group:program"
    port: int


def group_name(version: str) -> str:
    """The supervisor group of a registry version: `v` + the version, [A-Za-z0-9_-] only."""
    return "v" + re.sub(r"[^A-Za-z0-9_-]", "_", version)


def conf_path(settings: HostSettings) -> Path:
    return settings.home / "supervisord.conf"


def render_supervisord(settings: HostSettings, nginx_conf: Path) -> str:
    """supervisord.conf: socket, pid, logs under the home, conf.d/*.conf included, and nginx."""
    home = settings.home
    nginx = f"{settings.nginx} -c {nginx_conf} -e {home / 'logs' / 'nginx-error.log'}"
    return f"""; written by inference/supervisor.py
[unix_http_server]
file={home / "supervisor.sock"}
chmod=0700

[supervisord]
pidfile={home / "supervisord.pid"}
logfile={home / "logs" / "supervisord.log"}
childlogdir={home / "logs"}
directory={home}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{home / "supervisor.sock"}

[program:{PROXY_PROGRAM}]
command={nginx}
autorestart=true
startsecs=1
stopsignal=QUIT
stopwaitsecs=30
redirect_stderr=true
stdout_logfile={home / "logs" / "proxy.log"}

[include]
files={home / "conf.d" / "*.conf"}
"""


def render_group(
    settings: HostSettings, version: str, bento_tag: str, ports: list[int], model_tag: str = ""
) -> str:
    """conf.d/v<version>.conf: one supervisor group, one program per replica port. `model_tag`
    (the bento's own model) goes in as MLOPS_MODEL_TAG: `bentoml import` puts every bento's
    model into the host's one model store, where service.py's default `<name>:latest` would be
    the newest import's model, not this bento's."""
    group = group_name(version)
    programs = [f"{group}-r{i}" for i in range(len(ports))]
    sections = [f"[group:{group}]\nprograms={','.join(programs)}\n"]
    for program, port in zip(programs, ports, strict=True):
        key = SecretStr(settings.api_key)
        logs = prediction_log_dir(settings, version, program)
        passed = Environment(api_key=key, model_tag=model_tag or None, log_dir=logs).exported()
        env = {"BENTOML_HOME": str(run_home(settings, program)), **passed}
        environment = ",".join(f'{k}="{v}"' for k, v in env.items())
        # By path: the program's interpreter need not have this checkout on its sys.path (and
        # no PYTHONPATH may point at it: the bento's own service.py must be the one imported).
        command = f"{sys.executable} {LAUNCHER} {bento_tag} --host 127.0.0.1 --port {port}"
        sections.append(
            f"[program:{program}]\ncommand={command}\nenvironment={environment}\n"
            f"directory={settings.home}\nautostart=true\nautorestart=true\nstartsecs=0\n"
            "stopasgroup=true\nkillasgroup=true\nstopwaitsecs=30\nredirect_stderr=true\n"
            f"stdout_logfile={settings.home / 'logs' / program}.log\n"
            "stdout_logfile_maxbytes=10MB\nstdout_logfile_backups=2\n"
        )
    return "\n".join(sections)


def prediction_log_dir(settings: HostSettings, version: str, program: str) -> Path:
    """A replica's prediction and feedback log (MLOPS_LOG_DIR): <home>/predictions/v<version>/
    <program>/, one folder per version and in it one per replica, so replicas never share a
    file (the `monitor` flow reads a version's folder recursively)."""
    return settings.home / "predictions" / group_name(version) / program


def run_home(settings: HostSettings, program: str) -> Path:
    """A replica's own BENTOML_HOME: `bentos` and `models` link to the host's store, while
    BentoML's Prometheus directory (<BENTOML_HOME>/prometheus_multiproc_dir, emptied by every
    `bentoml serve` at start) is the replica's own, so one version's start never wipes another's
    figures and each /metrics holds its own replica's requests only."""
    return settings.home / "run" / program


def make_run_homes(settings: HostSettings, programs: list[str]) -> None:
    for program in programs:
        home = run_home(settings, program)
        home.mkdir(parents=True, exist_ok=True)
        for store in ("bentos", "models"):
            (settings.bentoml_home / store).mkdir(parents=True, exist_ok=True)
            link = home / store
            if not link.is_symlink():
                link.symlink_to(settings.bentoml_home / store, target_is_directory=True)


def ctl(settings: HostSettings, *args: str, check: bool = True) -> str:
    """`supervisorctl -c <conf> args...`; its output. HostError on a non-zero exit if `check`."""
    command = [str(settings.supervisorctl), "-c", str(conf_path(settings)), *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    out = (done.stdout + done.stderr).strip()
    if check and done.returncode != 0:
        raise HostError(f"supervisorctl {' '.join(args)}: {out.splitlines()[-1:] or done}")
    return out


def running(settings: HostSettings) -> bool:
    """Whether supervisord answers on the host's socket."""
    if not (settings.home / "supervisor.sock").exists():
        return False
    done = subprocess.run(
        [str(settings.supervisorctl), "-c", str(conf_path(settings)), "pid"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.returncode == 0 and done.stdout.strip().isdigit()


def ensure_supervisord(settings: HostSettings, nginx_conf: Path) -> None:
    """Write supervisord.conf and start supervisord (daemonized: its own session, outliving the
    caller) unless it already answers. HostError if it does not answer within 30 s."""
    (settings.home / "conf.d").mkdir(parents=True, exist_ok=True)
    (settings.home / "logs").mkdir(parents=True, exist_ok=True)
    conf_path(settings).write_text(render_supervisord(settings, nginx_conf))
    if running(settings):
        return
    clear_orphans(settings, nginx_conf)
    subprocess.run(
        [str(settings.supervisord), "-c", str(conf_path(settings))],
        check=True,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not running(settings):
        if time.monotonic() > deadline:
            raise HostError(f"supervisord did not start: see {settings.home / 'logs'}")
        time.sleep(0.2)


def orphans(settings: HostSettings, nginx_conf: Path) -> list[int]:
    """PIDs of what a dead supervisord of this home left running (its children are re-parented,
    not stopped, when it is SIGKILLed): nginx started with this home's conf (it would hold the
    serving address), and `bentoml serve` processes of this home's replicas (BENTOML_HOME under
    <home>/run/; they would hold their ports)."""
    conf = str(nginx_conf).encode()
    replicas = f"BENTOML_HOME={settings.home / 'run'}/".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if conf in cmdline or any(
                v.startswith(replicas) for v in (proc / "environ").read_bytes().split(b"\0")
            ):
                found.append(int(proc.name))
        except OSError:
            continue
    return found + children(found)


def children(parents: list[int]) -> list[int]:
    """PIDs whose parent is one of `parents` (an orphaned nginx master's workers: their command
    line is only "nginx: worker process", and they hold the listening socket too)."""
    wanted, found = {str(p) for p in parents}, []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                continue
            if ppid in wanted:
                found.append(int(proc.name))
    return found


def clear_orphans(settings: HostSettings, nginx_conf: Path) -> None:
    """SIGKILL `orphans` before a new supervisord starts this home's programs again (bounded
    wait for them to go): otherwise its nginx and replicas could not bind their addresses."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while (left := orphans(settings, nginx_conf)) and time.monotonic() < deadline:
        for found in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(found, signal.SIGKILL)
        time.sleep(0.2)


def status(settings: HostSettings) -> dict[str, str]:
    """{"group:program": "RUNNING" | "STARTING" | "BACKOFF" | ...} of every program."""
    out = ctl(settings, "status", check=False)  # exits 3 when a program is not running
    states = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isupper():
            states[parts[0]] = parts[1]
    return states


def pid(settings: HostSettings, program: str) -> int:
    """The PID of a running program (0 when it is not running)."""
    out = ctl(settings, "pid", program, check=False)
    return int(out) if out.isdigit() else 0


def start_group(
    settings: HostSettings, version: str, bento_tag: str, ports: list[int], model_tag: str = ""
) -> None:
    """Write the version's group file and add it (its programs start at once)."""
    group = group_name(version)
    path = settings.home / "conf.d" / f"{group}.conf"
    make_run_homes(settings, [f"{group}-r{i}" for i in range(len(ports))])
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    # 0600: the file holds MLOPS_API_KEY in the programs' environment
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(render_group(settings, version, bento_tag, ports, model_tag))
    tmp.replace(path)
    ctl(settings, "update", group)


def stop_group(settings: HostSettings, version: str) -> None:
    """Stop the version's programs (SIGTERM to the process group, bounded by stopwaitsecs)
    and remove the group and its file. No-op for an unknown group."""
    group = group_name(version)
    path = settings.home / "conf.d" / f"{group}.conf"
    path.unlink(missing_ok=True)
    ctl(settings, "update", group, check=False)
    for home in (settings.home / "run").glob(f"{group}-r*"):
        shutil.rmtree(home)  # the links to the store go, never the store itself


def groups(settings: HostSettings) -> list[str]:
    """The version groups with a file in conf.d."""
    return sorted(p.stem for p in (settings.home / "conf.d").glob("v*.conf"))


def shutdown(settings: HostSettings) -> None:
    """Stop supervisord and everything under it (tests, `python -m inference.host stop`)."""
    if running(settings):
        ctl(settings, "shutdown", check=False)
        pidfile = settings.home / "supervisord.pid"
        deadline = time.monotonic() + 60
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
