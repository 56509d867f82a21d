"""Small file helpers shared by the stages: atomic writes, JSON, content hashes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path for `path`; the file written there replaces `path` only if the body
    succeeds.

    The temp path has `path`'s own file name, in a private folder beside `path` (same file system,
    so the final rename is atomic) named after this process (`temp_prefix`); the folders a killed
    writer (kill -9) left for `path` are removed first (`remove_stale_temps`). The body creates
    the file, so it gets the mode a plain `open()` gives (the umask applies), and tools that
    report the file name report the output's. An error raised by the body that names the temp
    path names `path` instead. Raises FileNotFoundError (naming `path`) if the body wrote
    nothing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{temp_prefix(path)}.", suffix=".tmp"))
    tmp = path.parent / staging.name / path.name
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(errno.ENOENT, "nothing was written to the output", str(tmp))
        tmp.replace(path)
    except BaseException as exc:
        _name_output(exc, tmp, path)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def temp_prefix(path: Path) -> str:
    """The name that temp files and folders made for the output `path` begin with, beside it:
    `.<name>.<host>-<pid>` (this host's name, letters, digits and '-' only; this process's id),
    so that `remove_stale_temps` can tell a dead writer's leftovers from a live one's."""
    return f".{Path(path).name}.{_host()}-{os.getpid()}"


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temp files and folders beside the output `path` whose writer is dead: named
    `temp_prefix(path)` + anything ending in `.tmp` or `.tmp.old`, of this host and a process id
    no longer running (a run killed by SIGKILL or a power cut never cleans up; the next run for
    the same output does). Also the older `.<name>.<pid>.tmp` of `prune` (no host: this one's).
    Leftovers of other hosts (a shared folder) and of live processes are kept. Returns those
    removed."""
    path = Path(path)
    name = re.escape(path.name)
    ours = re.compile(rf"\.{name}\.{re.escape(_host())}-(\d+)\..*tmp(\.old)?")
    legacy = re.compile(rf"\.{name}\.(\d+)\.tmp(\.old)?")
    removed = []
    for leftover in path.parent.glob(f".{glob_escape(path.name)}.*tmp*"):
        match = ours.fullmatch(leftover.name) or legacy.fullmatch(leftover.name)
        if match and not _running(int(match.group(1))):
            remove_leftover(leftover)
            removed.append(leftover)
    return removed


def remove_leftover(path: Path) -> None:
    """Remove a temp file or folder a killed writer left (a folder with what is in it; a
    symlink itself, never its target); nothing when it is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    """`name` with glob's special characters ([, ], *, ?) matched literally."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _running(pid: int) -> bool:
    """Whether a process `pid` exists on this host (signal 0 checks without sending one)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def _name_output(exc: BaseException, tmp: Path, path: Path) -> None:
    """Rewrite `exc`'s message (and an OSError's file names) so they name `path`, not `tmp`."""
    spellings = [str(tmp.absolute()), str(tmp)]

    def fix(value: Any) -> Any:
        text = os.fspath(value) if isinstance(value, os.PathLike) else value
        if not isinstance(text, str):
            return value
        fixed = text
        for spelling in spellings:
            fixed = fixed.replace(spelling, str(path))
        return fixed if fixed != text else value

    exc.args = tuple(fix(arg) for arg in exc.args)
    if isinstance(exc, OSError):
        exc.filename, exc.filename2 = fix(exc.filename), fix(exc.filename2)


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def absolute_sqlite_url(url: str, root: Path) -> str:
    """`url`, with a relative SQLite path (sqlite:///x.db) made absolute under `root` and its
    folder created; any other URL as it is."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url[len(prefix) :].startswith("/"):
        db = (Path(root) / url[len(prefix) :]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        url = f"{prefix}{db}"
    return url
