"""DVC's command line for the flow: each call its own `dvc` process; the flow never imports DVC.

A stage is `dvc repro --single-item <stage>` in a session of its own, its output streamed line by
line to the caller; past its timeout the stage command gets SIGTERM (a training stage saves a
checkpoint at its next optimizer step and exits: pipelines/host.py), and after a grace period the
whole process group (DVC, the stage command and anything it started) is killed. Each stage
process gets its own environment: nothing set for one stage reaches the next. The stage order
comes from `dvc dag --dot`, the metrics from `dvc metrics show --json`.

Cost: a `dvc` process spends ~0.4-0.7 s before it runs the stage (imports, opening the repo);
`benchmarks/flow_overhead.py` measures what that adds to a run (README, "Benchmarks").
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# DVC's own lines for a stage it does not run: up to date, or restored from its run cache
NOT_RUN = re.compile(r"didn't change, skipping|is cached - skipping run")
QUERY_TIMEOUT_S = 300.0  # `dvc dag`, `dvc metrics show`: seconds, unless the disk hangs
EDGE = re.compile(r'^"(?P<dep>[^"]+)" -> "(?P<stage>[^"]+)";$')
NODE = re.compile(r'^"(?P<stage>[^"]+)";$')
DVC_ERROR = "ERROR: "  # DVC's own error lines ("ERROR: failed to reproduce ...")
EXITED = re.compile(r"exited with (-?\d+)")  # the stage command's status, in DVC's error


@dataclass(frozen=True)
class StageOutcome:
    """What DVC did with one stage."""

    stage: str
    ran: bool  # False when DVC found the stage up to date (or restored it from its run cache)
    code: int  # 0, the stage command's exit status, or DVC's own when DVC itself failed
    error: str = ""  # DVC's error lines, without their "ERROR: "
    lines: list[str] = field(default_factory=list)


def dvc_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with `env` on top, and this interpreter's bin first on PATH
    (stage commands call `python`)."""
    merged = {**os.environ, **(env or {})}
    merged["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), merged.get("PATH", "")])
    return merged


def run_logged(
    args: list[str],
    root: Path,
    timeout_s: float,
    emit: Callable[[str], object],
    env: Mapping[str, str] | None = None,
    grace_s: float = 0.0,
) -> tuple[int, list[str]]:
    """Run `args` in `root` in a new session, each output line (stdout and stderr) to `emit`.

    Returns (exit status, the lines). Raises TimeoutError past `timeout_s` seconds, having
    stopped the command (`stop_gracefully`: SIGTERM, `grace_s` seconds to exit) and killed the
    process group. Whatever the command left running in its group when it exited
    is killed too. The command dies with this process: util-linux's `setpriv --pdeathsig`
    (SIGKILL when the flow process is killed; the stage under it dies with it,
    pipelines/lifecycle.py), where there is one."""
    proc = subprocess.Popen(
        [*dies_with_this_process(), *args],
        cwd=root,
        env=dvc_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=_pump, args=(proc, lines, emit), daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        how = stop_gracefully(proc, grace_s)
        _kill_group(proc.pid)
        proc.wait()
        reader.join(timeout=10)
        raise TimeoutError(f"timed out after {timeout_s:g} s; {how}") from None
    finally:
        _kill_group(proc.pid)  # the stage's leftovers: their pipe would keep the reader waiting
    reader.join(timeout=10)
    return code, lines


def dies_with_this_process() -> list[str]:
    """The prefix that makes a command SIGKILLed when this process dies (a new session is out
    of reach of the signals a killed flow's process group gets): `setpriv --pdeathsig KILL --`
    on Linux with util-linux, nothing elsewhere."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def stop_gracefully(proc: subprocess.Popen[str], grace_s: float) -> str:
    """SIGTERM to every process under `proc` except shells (DVC and the shell running the
    stage command stay, to see it exit: a stage dies with its parent, pipelines/lifecycle.py),
    then up to `grace_s` seconds for `proc` to end. Returns what happened, for the message."""
    import psutil

    from pipelines.lifecycle import SHELLS

    if grace_s <= 0:
        return "its process group was killed"
    try:
        below = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        below = []
    for child in below:
        with contextlib.suppress(psutil.Error):
            if child.name() not in SHELLS:
                child.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        return f"its process group was killed {grace_s:g} s after SIGTERM (the stage went on)"
    return f"its process group was killed after SIGTERM let the stage stop (within {grace_s:g} s)"


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _pump(proc: subprocess.Popen[str], lines: list[str], emit: Callable[[str], object]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        emit(lines[-1])


def reproduce(
    root: Path,
    stage: str,
    force: bool,
    timeout_s: float,
    emit: Callable[[str], object],
    env: Mapping[str, str] | None = None,
    grace_s: float = 0.0,
) -> StageOutcome:
    """`dvc repro --single-item [--force] <stage>` in `root`, the stage command getting `env`.

    Raises TimeoutError (see `run_logged`: SIGTERM first, the group killed `grace_s` later)."""
    args = [sys.executable, "-m", "dvc", "repro", "--single-item", *(["--force"] * force), stage]
    try:
        code, lines = run_logged(args, root, timeout_s, emit, env, grace_s)
    except TimeoutError as exc:
        raise TimeoutError(f"stage {stage!r} {exc}") from None
    if code == 0:
        return StageOutcome(stage, ran=not NOT_RUN.search("\n".join(lines)), code=0, lines=lines)
    errors = [line.removeprefix(DVC_ERROR) for line in lines if line.startswith(DVC_ERROR)]
    status = EXITED.search(errors[-1]) if errors else None
    code = int(status.group(1)) if status else code
    return StageOutcome(stage, ran=True, code=code, error="; ".join(errors), lines=lines)


def dvc_output(root: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    """The standard output of `dvc <args>` in `root` (with `env` on top of this process's);
    RuntimeError with DVC's message when it fails."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        env=dvc_env(env),
        capture_output=True,
        text=True,
        timeout=QUERY_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        raise RuntimeError(f"dvc {' '.join(args)} failed in {root}: {message}")
    return done.stdout


def stage_order(root: Path) -> list[str]:
    """The stages of the project's dvc.yaml files (not `.dvc` data files) in an order DVC would
    run them: dependencies first, ties in the files' order (`dvc dag --dot` lists them so)."""
    import networkx as nx

    graph: Any = nx.DiGraph()  # edges: dependency -> dependent, as `dvc dag` draws them
    for line in dvc_output(root, "dag", "--dot").splitlines():
        if edge := EDGE.match(line.strip()):
            graph.add_edge(edge["dep"], edge["stage"])
        elif node := NODE.match(line.strip()):
            graph.add_node(node["stage"])
    written = {stage: i for i, stage in enumerate(graph.nodes)}
    ordered = nx.lexicographical_topological_sort(graph, key=lambda s: written[s])
    return [stage for stage in ordered if not stage.endswith(".dvc")]


def metrics(root: Path) -> dict[str, Any]:
    """`dvc metrics show`: {metrics file: its content} for the files that could be read."""
    shown = json.loads(dvc_output(root, "metrics", "show", "--json") or "{}")
    files = shown.get("", {}).get("data", {})
    return {path: entry["data"] for path, entry in files.items() if "data" in entry}


def metrics_files(root: Path, stages: list[str]) -> dict[str, list[str]]:
    """{stage address: the metrics files it writes}, paths from the root as `dvc metrics show`
    names them, read from the stages' dvc.yaml (`sub/dvc.yaml:name` for a nested one)."""
    import yaml

    found: dict[str, list[str]] = {}
    files: dict[str, dict[str, Any]] = {}
    for stage in stages:
        dvcfile, _, name = stage.rpartition(":")
        dvcfile = dvcfile or "dvc.yaml"
        if dvcfile not in files:
            files[dvcfile] = yaml.safe_load((root / dvcfile).read_text()).get("stages", {})
        entries = files[dvcfile].get(name, {}).get("metrics", [])
        paths = [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]
        found[stage] = [os.path.normpath(Path(dvcfile).parent / path) for path in paths]
    return found
