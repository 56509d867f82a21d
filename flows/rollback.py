"""The inference host's `rollback` flow: back to the previous version (or a named one kept on
this host) through the same checks and canary as a deploy (inference/rollout.py).

`python -m flows.rollback [--to VERSION]`; deployment `rollback/on-demand` on the `inference` pool.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from prefect import flow

from flows.deploy import report, run_on_host


@flow(name="rollback", log_prints=True)
def rollback(to: str | None = None) -> Any:
    """Return to the previous version, or to registry version `to` (one of the bentos kept)."""
    from inference import rollout

    return run_on_host(lambda p, log: rollout.rollback(p, to, log))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.rollback", description=rollback.description
    )
    parser.add_argument("--to", help="registry version kept on this host (default: the previous)")
    args = parser.parse_args(argv)
    state: Any = rollback(to=args.to, return_state=True)
    report(state.result(raise_on_failure=False))


if __name__ == "__main__":
    main()
