import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.artifacts import atomic_path, write_json


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
