"""The supervisor's command for one replica: `python -m inference.serve <bentoml serve args>`.

supervisord starts each program as the leader of its own process group; `bentoml serve` (a
circus arbiter) forks the workers that hold the listening socket. If the arbiter is killed with
SIGKILL, its workers outlive it, still bound to the port, and every restart would fail with
"address in use". So before it becomes `bentoml serve` (exec: same PID, same group), this
launcher kills what is left of the replica's previous process group (recorded in
<BENTOML_HOME>/serve.pgid; only processes of that group whose command line names bentoml).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

STALE_WAIT_S = 10.0


def stale(pgid: int) -> list[int]:
    """PIDs in process group `pgid` whose command line names bentoml (not this process)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if os.getpgid(int(proc.name)) != pgid:
                continue
            if b"bentoml" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


def clear(record: Path) -> None:
    """SIGKILL the previous group's leftovers and wait (bounded) until they are gone."""
    if not record.is_file():
        return
    old = int(record.read_text().strip() or 0)
    deadline = time.monotonic() + STALE_WAIT_S
    while old and (left := stale(old)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def main() -> None:
    record = Path(os.environ["BENTOML_HOME"]) / "serve.pgid"
    clear(record)
    record.write_text(str(os.getpgrp()))
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    os.execv(bentoml, [bentoml, "serve", *sys.argv[1:]])


if __name__ == "__main__":
    main()
