"""A lock held by another process, for the tests of `pipelines.lifecycle.exclusive` users."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import REPO

HOLD = """
import sys, time
from pathlib import Path
from pipelines.lifecycle import exclusive
with exclusive(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def held_elsewhere(path: Path) -> Iterator[int]:
    """`exclusive(path)` held by a child process for the body; yields its PID."""
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        yield child.pid
    finally:
        child.kill()
        child.wait()
