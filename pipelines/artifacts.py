"""Small file helpers shared by the stages: atomic writes, JSON, content hashes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path for `path`; the file written there replaces `path` only if the body
    succeeds.

    The temp path has `path`'s own file name, in a private folder beside `path` (same file system,
    so the final rename is atomic). The body creates the file, so it gets the mode a plain `open()`
    gives (the umask applies), and tools that report the file name report the output's. An error
    raised by the body that names the temp path names `path` instead. Raises FileNotFoundError
    (naming `path`) if the body wrote nothing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
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
