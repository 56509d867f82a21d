"""A stage's process lifetime and its hold on the state it keeps between runs.

- `die_with_parent()`, called by `run_cli` when a stage starts: on Linux the kernel sends this
  process SIGKILL when the process that started it dies (`prctl(PR_SET_PDEATHSIG)`), so a
  `kill -9` of `dvc repro` (or of the flow's runner, or of a `tune` stage and its workers) takes
  the stage with it instead of leaving an orphan that goes on writing checkpoints. `dvc repro`
  starts a stage through a shell (`$SHELL -c`, or `/bin/sh -c` when `SHELL` is unset, as under
  cron, systemd and most CI runners); dash, Debian's `/bin/sh`, does not `exec` the command, so
  the stage's parent is a shell that outlives `dvc`. When the parent is a shell, the stage also
  watches the shell's own parent through a pidfd (`os.pidfd_open`, Linux 5.3+) and kills itself
  when that one ends.
- `exclusive(path)`: an exclusive `fcntl.flock` on the hidden sibling `.<name>.lock`, held for the
  body, with the holder's PID written in it. A second process fails at once with
  `InUseError("<path> is in use by PID N")`; the kernel drops the lock when its holder dies,
  however it dies, so there is never a stale lock to remove by hand.

POSIX only (Linux for `die_with_parent`; elsewhere it does nothing).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pipelines.errors import InUseError

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
HOLDER_WAIT_S = 1.0  # how long to wait for a new holder to write its PID into the lock file


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; a no-op elsewhere).

    If the parent died before this call (the process was already re-parented), exit now."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died between the two reads
        os._exit(1)
    if proc_field(parent, "comm") in SHELLS:
        launcher = int(proc_field(parent, "ppid") or 0)
        if launcher > 1:
            die_with(launcher, shell=parent)


SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish", "busybox"})


def proc_field(pid: int, field: str) -> str | None:
    """`comm` (the command name) or `ppid` of a live process, from /proc; None once it is gone."""
    try:
        if field == "comm":
            return Path(f"/proc/{pid}/comm").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[1]  # after "pid (comm) state": ppid


def die_with(launcher: int, shell: int) -> None:
    """SIGKILL this process when `launcher` (the parent of our parent `shell`) ends.

    A daemon thread blocks on the launcher's pidfd, which becomes readable when it exits: no
    polling. If the launcher is already gone (or `shell` was re-parented), exit now."""
    import select
    import threading

    try:
        pidfd = os.pidfd_open(launcher)
    except ProcessLookupError:
        os._exit(1)
    except OSError:  # a kernel before 5.3: no pidfds; the shell's parent is not watched
        return
    if proc_field(shell, "ppid") != str(launcher):  # launcher died (its PID maybe reused)
        os._exit(1)

    def watch() -> None:
        select.select([pidfd], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name=f"die-with-{launcher}", daemon=True).start()


def lock_file(path: Path) -> Path:
    """Where `exclusive(path)` keeps its lock: `.<name>.lock` beside `path`."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold `path` (a directory or file a stage keeps between runs) alone for the body.

    Raises InUseError ("<path> is in use by PID N") at once when another process holds it."""
    import fcntl

    lock = lock_file(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InUseError(f"{path} is in use by PID {holder(fd)}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def holder(fd: int) -> str:
    """The PID written in a held lock file (it may not be written yet: wait a little)."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text or time.monotonic() > deadline:
            return text or "unknown"
        time.sleep(0.05)
