"""One long-lived DVC process per flow run: it reproduces one stage per request.

A `dvc` process costs ~0.4 s before it does anything (imports, opening the repo), and with one
task run per stage the flow paid that for every stage. This process imports DVC and opens the
repo once, while the flow does its own setup, then answers requests one at a time: the stage
order, `dvc repro --single-item` of one stage (the stage command's output on the same pipe),
the metrics. Each answer comes on a marker line. The process runs in its own session, so a
timeout kills it together with the stage command; the next request starts a fresh one. The flow
process itself never imports DVC. `DvcSession` is the flow's side; the process runs `serve()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

MARKER = "\x1emlops-dvc-runner\x1e"  # record separators: never part of a stage's own output
RUN_CACHE_HIT = re.compile(r"is cached - skipping run")
QUERY_TIMEOUT_S = 300.0  # the stage order, the metrics: seconds, unless the disk hangs


@dataclass(frozen=True)
class StageOutcome:
    """What DVC did with one stage."""

    stage: str
    ran: bool  # False when DVC found the stage up to date (or restored it from its run cache)
    code: int  # 0, the stage command's exit status, or 1 when DVC itself failed
    error: str = ""
    lines: list[str] = field(default_factory=list)


def stage_order(repo: Any) -> list[str]:
    """The stages of the dvc.yaml files (not `.dvc` data files) in an order DVC would run
    them (dependencies first), addressed from the repo's root whatever the current directory."""
    import networkx as nx
    from dvc.stage import PipelineStage

    graph = repo.index.graph.reverse(copy=False)  # edges: dependency -> dependent
    written = {stage: i for i, stage in enumerate(repo.index.stages)}  # ties: dvc.yaml's order
    ordered = nx.lexicographical_topological_sort(graph, key=lambda s: written.get(s, 0))
    return [_address(stage) for stage in ordered if isinstance(stage, PipelineStage)]


def _address(stage: Any) -> str:
    dvcfile = Path(stage.path_in_repo)
    return str(stage.name) if dvcfile == Path("dvc.yaml") else f"{dvcfile}:{stage.name}"


def metrics(repo: Any) -> dict[str, Any]:
    """`dvc metrics show`: {metrics file: its content} for the files that could be read."""
    files = repo.metrics.show().get("", {}).get("data", {})
    return {path: entry["data"] for path, entry in files.items() if "data" in entry}


def metrics_files(repo: Any) -> dict[str, list[str]]:
    """{stage address: the metrics files it writes}, paths as `dvc metrics show` names them."""
    from dvc.stage import PipelineStage

    return {
        _address(stage): [
            os.path.relpath(out.fs_path, repo.root_dir) for out in stage.outs if out.metric
        ]
        for stage in repo.index.stages
        if isinstance(stage, PipelineStage)
    }


def reproduce(repo: Any, stage: str, force: bool) -> dict[str, Any]:
    """`dvc repro --single-item [--force] <stage>` on an open repo, as a JSON-able outcome.

    Each call takes the repo's lock and rereads dvc.yaml and dvc.lock, like a `dvc` process."""
    try:
        done = repo.reproduce(stage, single_item=True, force=force)
    except Exception as exc:  # reported to the flow, which raises it as a typed error
        message = _messages(exc)
        status = re.search(r"exited with (-?\d+)", message)
        return {"ran": True, "code": int(status.group(1)) if status else 1, "error": message}
    return {"ran": bool(done), "code": 0, "error": ""}


def _messages(exc: BaseException) -> str:
    """The messages of an exception and its causes: DVC's own says only which stage failed."""
    parts: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(parts) < 5:
        parts.append(str(current) or type(current).__name__)
        current = current.__cause__ or current.__context__
    return ": ".join(parts)


def serve(root: Path, requests: TextIO) -> None:
    """Open the repo, then answer requests until `requests` closes.

    A request is a JSON line: `{"op": "order"}`, `{"op": "metrics"}`, `{"op": "metrics_files"}`,
    or `{"op": "repro", "stage": ..., "force": ..., "env": {...}}` (`env` is set for the stage
    command). Requests come on their own pipe: a stage command inherits stdin, never that pipe.
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        for line in requests:
            print(MARKER + json.dumps(answer(repo, json.loads(line))), flush=True)


def answer(repo: Any, request: dict[str, Any]) -> dict[str, Any]:
    if request["op"] == "order":
        return {"stages": stage_order(repo)}
    if request["op"] == "metrics":
        return {"metrics": metrics(repo)}
    if request["op"] == "metrics_files":
        return {"files": metrics_files(repo)}
    os.environ.update(request["env"])
    return reproduce(repo, request["stage"], request["force"])


class DvcSession:
    """The flow's side: one DVC process, started by `start()` or on first use, and again after
    a timeout killed it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._proc: subprocess.Popen[str] | None = None
        self._requests: TextIO | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()

    def __enter__(self) -> DvcSession:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the DVC process now: it gets ready while the caller does something else."""
        if self._proc is None or self._requests is None or self._proc.poll() is not None:
            self._spawn()

    def stage_order(self, emit: Callable[[str], object] = print) -> list[str]:
        """The stages of the project in DVC's order (see `stage_order`)."""
        return list(self._ask({"op": "order"}, QUERY_TIMEOUT_S, emit)[0]["stages"])

    def metrics(self, emit: Callable[[str], object] = print) -> dict[str, Any]:
        """The project's metrics files as `dvc metrics show` reads them now."""
        return dict(self._ask({"op": "metrics"}, QUERY_TIMEOUT_S, emit)[0]["metrics"])

    def metrics_files(self, emit: Callable[[str], object] = print) -> dict[str, list[str]]:
        """{stage: its metrics files} (see `metrics_files`)."""
        return dict(self._ask({"op": "metrics_files"}, QUERY_TIMEOUT_S, emit)[0]["files"])

    def reproduce(
        self,
        stage: str,
        force: bool,
        timeout_s: float,
        emit: Callable[[str], object],
        env: Mapping[str, str] | None = None,
    ) -> StageOutcome:
        """Reproduce `stage` (its command gets `env`), each output line to `emit`.

        Raises TimeoutError, having killed the process group, past `timeout_s`."""
        request = {"op": "repro", "stage": stage, "force": force, "env": dict(env or {})}
        outcome, lines = self._ask(request, timeout_s, emit)
        if "died" in outcome:
            return StageOutcome(stage, ran=True, code=outcome["died"], error=outcome["error"])
        ran = outcome.pop("ran") and not RUN_CACHE_HIT.search("\n".join(lines))
        return StageOutcome(stage=stage, ran=ran, lines=lines, **outcome)

    def _ask(
        self, request: dict[str, Any], timeout_s: float, emit: Callable[[str], object]
    ) -> tuple[dict[str, Any], list[str]]:
        """Send `request`; its answer and the output lines before it (each sent to `emit`)."""
        self.start()
        assert self._requests is not None
        self._requests.write(json.dumps(request) + "\n")
        self._requests.flush()
        deadline = time.monotonic() + timeout_s
        lines: list[str] = []
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                self.kill()
                raise TimeoutError(f"{_what(request)} timed out after {timeout_s:g} s") from None
            if line is None:
                return self._died(request), lines
            text, marker, result = line.partition(MARKER)
            if text or not marker:
                lines.append(text)
                emit(text)
            if marker:
                return json.loads(result), lines

    def _died(self, request: dict[str, Any]) -> dict[str, Any]:
        """The DVC process is gone (killed, or crashed): an answer saying so."""
        code = self._proc.wait() if self._proc else 1
        self._close_requests()
        self._proc = None
        if request["op"] != "repro":
            raise RuntimeError(f"the DVC process exited (status {code}) during {_what(request)}")
        return {"died": code or 1, "error": f"the DVC process exited (status {code})"}

    def _spawn(self) -> None:
        """The DVC process in a session of its own, with this interpreter's bin first on PATH
        (stage commands call `python`)."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        read_fd, write_fd = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, "-P", "-u", __file__, str(self.root), str(read_fd)],
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            pass_fds=(read_fd,),
        )
        os.close(read_fd)
        self._requests = os.fdopen(write_fd, "w")
        self._lines = queue.Queue()
        threading.Thread(target=_pump, args=(self._proc, self._lines), daemon=True).start()

    def kill(self) -> None:
        """Kill the DVC process and everything it started (its whole process group)."""
        self._close_requests()
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        self._proc = None

    def close(self) -> None:
        """Let the DVC process finish (its requests closed); kill it if it has not in 10 s."""
        self._close_requests()
        if self._proc is None:
            return
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        self._proc = None

    def _close_requests(self) -> None:
        if self._requests is not None:
            with contextlib.suppress(OSError):  # the process may be gone already
                self._requests.close()
            self._requests = None


def _what(request: dict[str, Any]) -> str:
    return f"stage {request['stage']!r}" if request["op"] == "repro" else f"dvc {request['op']}"


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line.rstrip("\n"))
    lines.put(None)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), os.fdopen(int(sys.argv[2])))
