import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.artifacts import atomic_path, remove_stale_temps, temp_prefix, write_json
from pipelines.prune import staged_dir


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_get_the_mode_a_plain_open_gives(tmp_path: Path, umask: int) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_json(tmp_path / "a.json", {"a": 1})
    with atomic_path(tmp_path / "b.bin") as tmp, tmp.open("wb") as handle:
        handle.write(b"x")
    assert mode(plain) == 0o666 & ~umask
    assert mode(tmp_path / "a.json") == mode(plain) == mode(tmp_path / "b.bin")


def test_the_temp_path_has_the_outputs_name_and_leaves_nothing(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "model.onnx") as tmp:
        assert tmp.name == "model.onnx" and tmp.parent.parent == tmp_path
        tmp.write_bytes(b"graph")
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    with pytest.raises(ValueError), atomic_path(tmp_path / "model.onnx") as tmp:
        tmp.write_bytes(b"half")
        raise ValueError("broken")
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # old output kept, no debris
    assert (tmp_path / "model.onnx").read_bytes() == b"graph"


def test_errors_name_the_output_not_the_temp_file(tmp_path: Path) -> None:
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(ValueError) as caught, atomic_path(out) as tmp:
        raise ValueError(f"cannot check {tmp}: bad graph")
    assert str(caught.value) == f"cannot check {out}: bad graph"
    with pytest.raises(IsADirectoryError) as failed, atomic_path(out) as tmp:
        tmp.mkdir()
        tmp.write_text("x")
    assert failed.value.filename == str(out) and str(out) in str(failed.value)
    with pytest.raises(FileNotFoundError, match="nothing was written") as empty, atomic_path(out):
        pass
    assert empty.value.filename == str(out)
    assert list(out.parent.iterdir()) == []


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def leftovers(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith(".")}


def test_a_killed_writers_temps_are_removed_by_the_next_write(tmp_path: Path) -> None:
    """kill -9 leaves atomic_path's private folder: the next write of that output removes it
    (folder or file, of this host and a dead process), and keeps a live process's, another
    host's and another output's."""
    output = tmp_path / "model.pt"
    host_pid = temp_prefix(output).removeprefix(".model.pt.").rsplit("-", 1)[0]
    dead, live = dead_pid(), os.getppid()
    (tmp_path / f".model.pt.{host_pid}-{dead}.k2j3h4.tmp").mkdir()
    (tmp_path / f".model.pt.{host_pid}-{dead}.k2j3h4.tmp" / "model.pt").write_text("half")
    (tmp_path / f".model.pt.{host_pid}-{dead}.x.tmp").write_text("half")
    kept = {
        f".model.pt.{host_pid}-{live}.abc.tmp",
        f".model.pt.elsewhere-{dead}.abc.tmp",
        f".other.pt.{host_pid}-{dead}.abc.tmp",
    }
    for name in kept:
        (tmp_path / name).mkdir()
    with atomic_path(output) as tmp:
        assert tmp.parent.name.startswith(f".model.pt.{host_pid}-{os.getpid()}.")
        tmp.write_text("new")
    assert output.read_text() == "new"
    assert leftovers(tmp_path) == kept


def test_a_killed_prune_runs_work_and_old_folders_are_removed(tmp_path: Path) -> None:
    """`models/.prune.<pid>.tmp` (the name before this fix) and the current name, with the
    `.old` folder of a run killed between its two renames: the next staged_dir removes them."""
    out = tmp_path / "prune"
    dead = dead_pid()
    current = f"{temp_prefix(out).rsplit('-', 1)[0]}-{dead}.tmp"
    names = [f".prune.{dead}.tmp", f".prune.{dead}.tmp.old", current, f"{current}.old"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "families.json").write_text("{}")
    with staged_dir(out) as work:
        (work / "families.json").write_text("new")
    assert (out / "families.json").read_text() == "new"
    assert leftovers(tmp_path) == set()
    assert remove_stale_temps(out) == []
