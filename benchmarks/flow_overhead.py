"""What the Prefect `train` flow costs over plain `dvc repro` for the same stages and params.

    python benchmarks/flow_overhead.py [--repeats N] [--out results.json]

In a temp copy of this repository (tracked and new files, committed): one unmeasured `dvc repro`
(outputs, caches and bytecode warm), then per repeat `dvc repro --force` and
`python -m flows.train --force` (both rerun every stage), each a fresh process, the order
alternating between repeats; medians over the repeats. The flow talks
to a temporary `prefect server` started here: its start-up is reported on its own and left out.

Each stage command is timed by itself: DVC runs every command as `$SHELL -c CMD`, and SHELL
points at a wrapper that records when the command starts and ends. Per stage:

- under `dvc repro`: the stage's span (from DVC's "Running stage" line to the next one) minus
  its command = DVC's own work for the stage (status, hashing, dvc.lock, run cache);
- in the flow: the task run's duration (Prefect's start and end) minus its command;
- orchestration overhead = the second minus the first: what a task run adds beyond what DVC
  spends on the stage anyway.

Goals: the flow's wall time at most 1.15x `dvc repro`'s; orchestration overhead at most
100 ms per task run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_args import positive_int  # noqa: E402

from tests.helpers.processes import free_port  # noqa: E402

RATIO_GOAL = 1.15
TASK_OVERHEAD_GOAL_MS = 100.0
RUNNING = re.compile(r"^Running stage '([^']+)':")
TIMED_SHELL = """#!/bin/sh
# DVC runs each stage command as "$SHELL -c CMD": record when CMD starts and ends.
echo "$DVC_STAGE start $(date +%s%N)" >> "$BENCH_TIMES"
/bin/sh -c "$2"
status=$?
echo "$DVC_STAGE end $(date +%s%N)" >> "$BENCH_TIMES"
exit $status
"""


@dataclass
class Run:
    """One measured run: wall seconds, each stage command's seconds and each stage's span."""

    wall_s: float
    commands_s: dict[str, float]
    spans_s: dict[str, float] = field(default_factory=dict)
    tasks_s: dict[str, float] = field(default_factory=dict)
    flow_run_s: float = 0.0


def snapshot(dest: Path) -> Path:
    """The repository's tracked and new (non-ignored) files, committed in a fresh git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listed:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "benchmark snapshot"]):
        subprocess.run([*git, *args], cwd=dest, check=True)
    return dest


def environment(work: Path) -> dict[str, str]:
    """Same for both: the venv first on PATH, the timing shell, stores under `work`."""
    shell = work / "timed-sh"
    shell.write_text(TIMED_SHELL)
    shell.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLOPS_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        SHELL=str(shell),
        BENCH_TIMES=str(work / "times.txt"),
        PREFECT_HOME=str(work / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="true",
        MLFLOW_DISABLE_TELEMETRY="true",
        DVC_NO_ANALYTICS="1",
        GX_ANALYTICS_ENABLED="false",
    )
    env.pop("MLFLOW_TRACKING_URI", None)  # params.yaml's store, inside the copy
    return env


def command_times(path: Path) -> dict[str, float]:
    """{stage: seconds} from the timing shell's records."""
    starts: dict[str, int] = {}
    spans: dict[str, float] = {}
    for line in path.read_text().splitlines():
        stage, event, stamp = line.split()
        if event == "start":
            starts[stage] = int(stamp)
        else:
            spans[stage] = (int(stamp) - starts.pop(stage)) / 1e9
    return spans


def timed(command: list[str], root: Path, env: dict[str, str]) -> Run:
    """Run `command` in `root`: its wall time, the stage commands it ran, DVC's stage spans."""
    times = Path(env["BENCH_TIMES"])
    times.write_text("")
    began = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines = [(time.perf_counter(), line) for line in proc.stdout]
    code = proc.wait()
    ended = time.perf_counter()
    if code != 0:
        output = "".join(line for _, line in lines)
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-5000:]}")
    return Run(ended - began, command_times(times), stage_spans(lines))


def stage_spans(lines: list[tuple[float, str]]) -> dict[str, float]:
    """{stage: seconds from DVC's "Running stage" line to the next one; the last stage's span
    ends at DVC's last line (what follows is the process exiting)}."""
    starts = [(t, m.group(1)) for t, line in lines if (m := RUNNING.search(line))]
    ends = [t for t, _ in starts[1:]] + [lines[-1][0] if lines else 0.0]
    return {stage: end - start for (start, stage), end in zip(starts, ends, strict=False)}


@contextmanager
def temporary_server(env: dict[str, str], log: Path) -> Iterator[tuple[str, float]]:
    """`prefect server start` on a free loopback port: (API URL, seconds until healthy)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    began = time.perf_counter()
    with log.open("wb") as out:
        server = subprocess.Popen(
            [*command, "--port", str(port)],
            env={**env, "PREFECT_UI_API_URL": api},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_healthy(api, server)
        yield api, time.perf_counter() - began
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def wait_healthy(api: str, server: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"prefect server at {api} did not become healthy")


def task_run_times(api: str, env: dict[str, str]) -> tuple[float, dict[str, float]]:
    """The latest flow run's duration and {task run name: seconds}, from the server."""
    query = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort
with get_client(sync_client=True) as client:
    run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
    flt = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
    tasks = client.read_task_runs(flow_run_filter=flt)
span = lambda r: (r.end_time - r.start_time).total_seconds()
json.dump({"flow": span(run), "tasks": {t.name: span(t) for t in tasks}}, sys.stdout)
"""
    out = subprocess.run(
        [sys.executable, "-c", query],
        env={**env, "PREFECT_API_URL": api},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data = json.loads(out)
    return float(data["flow"]), {k: float(v) for k, v in data["tasks"].items()}


def measure(root: Path, env: dict[str, str], api: str, flow_first: bool) -> tuple[Run, Run]:
    """One `dvc repro --force` and one forced flow run on the same params, in either order."""
    if flow_first:
        flow = measure_flow(root, env, api)
        return timed([sys.executable, "-m", "dvc", "repro", "--force"], root, env), flow
    dvc = timed([sys.executable, "-m", "dvc", "repro", "--force"], root, env)
    return dvc, measure_flow(root, env, api)


def measure_flow(root: Path, env: dict[str, str], api: str) -> Run:
    flow = timed(
        [sys.executable, "-m", "flows.train", "--force"], root, {**env, "PREFECT_API_URL": api}
    )
    flow.flow_run_s, flow.tasks_s = task_run_times(api, env)
    return flow


def summary(dvc: list[Run], flow: list[Run], server_s: float) -> dict[str, Any]:
    """Medians over the repeats, per stage and in total."""
    per_stage = {stage: stage_summary(stage, dvc, flow) for stage in dvc[0].commands_s}
    dvc_wall = statistics.median(r.wall_s for r in dvc)
    flow_wall = statistics.median(r.wall_s for r in flow)
    return {
        "stages": per_stage,
        "dvc_repro_wall_s": dvc_wall,
        "flow_wall_s": flow_wall,
        "flow_run_s": statistics.median(r.flow_run_s for r in flow),
        "ratio": flow_wall / dvc_wall,
        "ratio_same_commands": same_commands_ratio(dvc, flow),
        "dvc_outside_commands_s": statistics.median(outside_commands(r) for r in dvc),
        "flow_outside_commands_s": statistics.median(outside_commands(r) for r in flow),
        "flow_other_tasks_s": statistics.median(other_tasks(r, dvc[0]) for r in flow),
        "max_orchestration_ms": max(s["orchestration_ms"] for s in per_stage.values()),
        "max_beyond_command_ms": max(s["task_beyond_command_ms"] for s in per_stage.values()),
        "server_start_s": server_s,
        "repeats": len(flow),
        "runs": {"dvc": [asdict(r) for r in dvc], "flow": [asdict(r) for r in flow]},
    }


def stage_summary(stage: str, dvc: list[Run], flow: list[Run]) -> dict[str, float]:
    dvc_own = statistics.median(1000 * (r.spans_s[stage] - r.commands_s[stage]) for r in dvc)
    beyond = statistics.median(1000 * (r.tasks_s[stage] - r.commands_s[stage]) for r in flow)
    return {
        "command_dvc_s": statistics.median(r.commands_s[stage] for r in dvc),
        "command_flow_s": statistics.median(r.commands_s[stage] for r in flow),
        "task_run_s": statistics.median(r.tasks_s[stage] for r in flow),
        "dvc_own_ms": dvc_own,
        "task_beyond_command_ms": beyond,
        "orchestration_ms": beyond - dvc_own,
    }


def outside_commands(run: Run) -> float:
    return run.wall_s - sum(run.commands_s.values())


def other_tasks(flow: Run, dvc: Run) -> float:
    """Seconds in the flow's task runs that are no DVC stage (the champion gate): work that
    `dvc repro` does not do."""
    return sum(s for name, s in flow.tasks_s.items() if name not in dvc.commands_s)


def same_commands_ratio(dvc: list[Run], flow: list[Run]) -> float:
    """The ratio on the same work: the stage commands' times taken from the `dvc repro` runs
    (not the noise of commands that ran slower or faster this time), without the flow's tasks
    that are no DVC stage."""
    dvc_wall = statistics.median(r.wall_s for r in dvc)
    extra = statistics.median(outside_commands(r) - other_tasks(r, dvc[0]) for r in flow)
    return (dvc_wall + extra - statistics.median(outside_commands(r) for r in dvc)) / dvc_wall


HEADER = ("stage", "command", "command", "task run", "DVC's own", "task minus", "orchestr.")
UNDER = ("", "(dvc)", "(flow)", "(flow)", "(dvc)", "command", "overhead")
COLUMNS = ("command_dvc_s", "command_flow_s", "task_run_s")
MS_COLUMNS = ("dvc_own_ms", "task_beyond_command_ms", "orchestration_ms")


def print_table(result: dict[str, Any]) -> None:
    for names in (HEADER, UNDER):
        print(f"{names[0]:<10}" + "".join(f"{name:>11}" for name in names[1:]))
    for stage, row in result["stages"].items():
        seconds = "".join(f"{row[key]:>10.2f}s" for key in COLUMNS)
        millis = "".join(f"{row[key]:>8.0f} ms" for key in MS_COLUMNS)
        print(f"{stage:<10}{seconds}{millis}")
    for label, value in totals(result):
        print(f"{label:<32}{value}")


def totals(result: dict[str, Any]) -> list[tuple[str, str]]:
    ratio_ok = "ok" if result["ratio"] <= RATIO_GOAL else "MISSED"
    same_ok = "ok" if result["ratio_same_commands"] <= RATIO_GOAL else "MISSED"
    task_ok = "ok" if result["max_orchestration_ms"] <= TASK_OVERHEAD_GOAL_MS else "MISSED"
    return [
        ("", ""),
        ("dvc repro --force", f"{result['dvc_repro_wall_s']:8.2f} s wall"),
        ("python -m flows.train --force", f"{result['flow_wall_s']:8.2f} s wall"),
        ("  outside the stage commands", f"{result['dvc_outside_commands_s']:8.2f} s (dvc)"),
        ("", f"{result['flow_outside_commands_s']:8.2f} s (flow)"),
        ("  in tasks that are no stage", f"{result['flow_other_tasks_s']:8.2f} s (flow)"),
        ("ratio flow / dvc", f"{result['ratio']:8.3f}   goal <= {RATIO_GOAL}: {ratio_ok}"),
        ("  same work, dvc's command times", f"{result['ratio_same_commands']:8.3f}   {same_ok}"),
        (
            "orchestration overhead, max",
            f"{result['max_orchestration_ms']:8.0f} ms per task run,"
            f" goal <= {TASK_OVERHEAD_GOAL_MS:.0f}: {task_ok}",
        ),
        (
            "task run minus command, max",
            f"{result['max_beyond_command_ms']:8.0f} ms (with DVC's own work, as in dvc repro)",
        ),
        ("temporary server start", f"{result['server_start_s']:8.2f} s, not in the flow's time"),
        ("repeats (medians)", f"{result['repeats']:8d}"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=3, help="measured pairs (medians)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temp copy")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="flow-overhead-"))
    try:
        result = benchmark(work, args.repeats)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


def benchmark(work: Path, repeats: int) -> dict[str, Any]:
    root = snapshot(work / "repo")
    env = environment(work)
    print(f"warm-up dvc repro in {root} ...", flush=True)
    timed([sys.executable, "-m", "dvc", "repro"], root, env)
    dvc_runs: list[Run] = []
    flow_runs: list[Run] = []
    with temporary_server(env, work / "server.log") as (api, server_s):
        for index in range(repeats):
            print(f"repeat {index + 1}/{repeats} ...", flush=True)
            dvc, flow = measure(root, env, api, flow_first=index % 2 == 1)
            dvc_runs.append(dvc)
            flow_runs.append(flow)
    return summary(dvc_runs, flow_runs, server_s)


if __name__ == "__main__":
    main()
