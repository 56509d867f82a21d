"""The inference host's `deploy` flow: fetch a registry version's bento (default the champion)
through MLflow, import it, and roll it out with checks, a canary and a watch (inference/rollout.py
does the work; this flow logs each step in its run and publishes the host's history).

Runs on the `inference` work pool (deployment `deploy/on-demand`) or from the CLI:
`python -m flows.deploy [--version V | --bento TAG_OR_ARCHIVE]` (exit 2 with one line when the
input or a check is rejected). Lean: no torch, DVC or Great Expectations is imported.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.states import Failed, State

from pipelines.cli import EXIT_REJECTED
from pipelines.config import Params, load_params
from pipelines.errors import PipelineError

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
HISTORY_KEY = "inference-host-history"


def publish_history() -> None:
    """The host's deployment history (version, time, outcome, reason) as a table artifact."""
    from inference.settings import host_settings
    from inference.state import history

    rows = history(host_settings().home)
    create_table_artifact(
        list(reversed(rows)) or [{"version": "", "time": "", "outcome": "none yet"}],
        key=HISTORY_KEY,
        description="The inference host's deployments and rollbacks, newest first",
    )


def rejected(exc: Exception) -> State[Any]:
    """Failed with the reason (which check, what value, what limit), logged without traceback."""
    get_run_logger().error("%s", exc)
    return Failed(message=str(exc), data=exc)


def run_on_host(action: Callable[[Params, Callable[[str], None]], Any]) -> Any:
    """`action(params, log)` with the flow run's logger; the outcome as a dict, or a Failed
    state for a rejected input or check. The history artifact is published either way."""
    logger = get_run_logger()
    try:
        done = action(load_params(PARAMS), logger.info)
    except PipelineError as exc:
        state = rejected(exc)
        _publish_quietly()
        return state
    _publish_quietly()
    return asdict(done)


def _publish_quietly() -> None:
    try:
        publish_history()
    except PipelineError as exc:  # host settings unusable: the error above says why
        get_run_logger().warning("history not published: %s", exc)


@flow(name="deploy", log_prints=True)
def deploy(version: str | None = None, bento: str | None = None) -> Any:
    """Deploy registry `version` (default: the `champion` alias) or `bento` (a bento tag kept on
    this host, or an archive path) on this inference host, through the checks and the canary."""
    from inference import rollout

    return run_on_host(lambda p, log: rollout.deploy(p, version, bento, log))


def report(result: Any) -> None:
    """The CLI's last lines: the outcome, or `error: <reason>` and exit 2 / 1."""
    if isinstance(result, BaseException):
        print(f"error: {result}", file=sys.stderr)
        sys.exit(EXIT_REJECTED if isinstance(result, PipelineError) else 1)
    print(f"{result['outcome']}: version {result['version']} ({result['bento']})")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=deploy.description)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", help="registry version (default: the champion)")
    which.add_argument("--bento", help="bento tag kept on this host, or a .bento archive path")
    args = parser.parse_args(argv)
    state: Any = deploy(version=args.version, bento=args.bento, return_state=True)
    report(state.result(raise_on_failure=False))


if __name__ == "__main__":
    main()
