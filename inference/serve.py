"""The supervisor's command for one replica: `python -m inference.serve <bentoml serve args>`.

`bentoml serve` is a circus arbiter whose workers (each in its own process group) hold the
listening socket. If the arbiter is killed with SIGKILL, its workers outlive it, still bound to
the port, and every restart by supervisord would fail with "address in use". So before it
becomes `bentoml serve` (exec: same PID), this launcher kills what is left of the replica's
previous run: the processes whose environment holds this replica's own BENTOML_HOME (see
inference.supervisor.run_home; no other process has it) and whose command line names bentoml.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

STALE_WAIT_S = 10.0


def stale(home: str) -> list[int]:
    """PIDs (not this one) of bentoml processes whose environment has BENTOML_HOME=home."""
    marker = f"BENTOML_HOME={home}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            if marker in environ and b"bentoml" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def clear(home: str) -> None:
    """SIGKILL the previous run's leftovers and wait (bounded) until they are gone."""
    deadline = time.monotonic() + STALE_WAIT_S
    while (left := stale(home)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def main() -> None:
    clear(os.environ["BENTOML_HOME"])
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    os.execv(bentoml, [bentoml, "serve", *sys.argv[1:]])


if __name__ == "__main__":
    main()
