"""The shared entry point of the stage CLIs: logging set up, typed errors turned into exit 1."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pipelines.errors import PipelineError


def run_cli(body: Callable[[], object]) -> None:
    """Run `body`; a `PipelineError` prints its message (no traceback) and exits with status 1."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("great_expectations", "mlflow", "alembic", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        body()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
