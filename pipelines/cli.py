"""The shared entry point of the stage CLIs: logging set up, params.yaml loaded, typed errors
turned into one `error: ...` line and exit 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from pipelines.config import Params, load_params
from pipelines.errors import PipelineError
from pipelines.lifecycle import die_with_parent

# A stage that rejects its input (bad params, data that fails validation) exits with this code,
# like argparse does for a bad command line: the orchestrator never retries it.
EXIT_REJECTED = 2


def run_cli(
    body: Callable[[Params], object],
    params_path: Path | str,
    load: Callable[[Path], Params] = load_params,
) -> None:
    """Load `params_path` with `load`, then run `body(params)`, both inside the one handler: a
    `PipelineError` from either (a bad param, bad data, a failed gate) prints `error: <message>`
    on stderr, no traceback, and exits EXIT_REJECTED. So a stage cannot load its params where a
    bad value would escape as a traceback.

    The stage dies with the process that started it (see `die_with_parent`)."""
    die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # httpx: one INFO line per request, e.g. per poll of the shared-host controller (host.poll_ms)
    for noisy in ("great_expectations", "mlflow", "alembic", "urllib3", "matplotlib", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        body(load(Path(params_path)))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_REJECTED)
