"""The shared entry point of the stage CLIs: logging set up, typed errors turned into exit 1."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pipelines.errors import PipelineError
from pipelines.lifecycle import die_with_parent

# A stage that rejects its input (bad params, data that fails validation) exits with this code,
# like argparse does for a bad command line: the orchestrator never retries it.
EXIT_REJECTED = 2


def run_cli(body: Callable[[], object]) -> None:
    """Run `body`; a `PipelineError` prints its message (no traceback) and exits EXIT_REJECTED.

    The stage dies with the process that started it (see `die_with_parent`)."""
    die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("great_expectations", "mlflow", "alembic", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        body()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_REJECTED)
