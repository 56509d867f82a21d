"""Identical inputs give identical output bytes, for every stage that claims determinism.

Each stage runs twice, in two fresh folders, on the same inputs (shrunk params), and every file
it writes for DVC (its `outs`, and the plots CSV) is compared by hash. A file that differs makes
DVC see a changed output and rerun everything downstream (as `model.pt` did when the archive
recorded its random temp file's name). Not compared: metrics JSON with wall-clock figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.artifacts import file_sha256
from pipelines.config import Params
from tests.helpers import REPO
from tests.helpers.params import tiny_params

pytestmark = pytest.mark.slow
SHRUNK = {  # on tiny_params()
    "train.num_workers": 0,
    "train.device": "cpu",
    "quantize.calibration_samples": 64,
    "quantize.parity_min_agreement": 0.01,  # a barely trained model: bytes matter here, not quality
}
OUTPUTS = {  # stage -> its files, relative to a run's root
    "prepare": ["prepared"],
    "train": ["train/model.pt", "train/train.csv"],
    "distill": ["distill/model.pt", "distill/distill.csv"],
    "export": ["export/teacher.onnx"],
    "quantize": ["quantize/teacher"],
}


def run_stages(params: Params, root: Path) -> None:
    """prepare -> train -> distill, export -> quantize (the teacher's), outputs under `root`."""
    from pipelines.distill import distill
    from pipelines.export import export
    from pipelines.models import save_model
    from pipelines.prepare import prepare
    from pipelines.quantize import quantize
    from pipelines.train import train, write_plots

    prepare(params.data, params.prepare, REPO, root / "prepared")
    trained = train(params.train, root / "prepared", root / "checkpoints" / "train")
    save_model(root / "train" / "model.pt", trained)
    write_plots(root / "train" / "train.csv", trained.history)
    student = distill(
        params.train,
        params.distill,
        root / "train" / "model.pt",
        root / "prepared",
        root / "checkpoints" / "distill",
    )
    save_model(root / "distill" / "model.pt", student)
    write_plots(root / "distill" / "distill.csv", student.history)
    export(
        params.export,
        root / "train" / "model.pt",
        root / "prepared",
        root / "export" / "teacher.onnx",
    )
    quantize(
        params.quantize,
        root / "export" / "teacher.onnx",
        root / "prepared",
        root / "quantize" / "teacher",
    )


def hashes(path: Path) -> dict[str, str]:
    """{relative file name: sha256} of a file or of every file under a folder."""
    if path.is_file():
        return {path.name: file_sha256(path)}
    return {
        str(p.relative_to(path)): file_sha256(p) for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    params = tiny_params(SHRUNK)
    roots = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    for root in roots:
        run_stages(params, root)
    return roots


@pytest.mark.parametrize("stage", sorted(OUTPUTS))
def test_a_rerun_writes_the_same_bytes(stage: str, two_runs: tuple[Path, Path]) -> None:
    first, second = two_runs
    for name in OUTPUTS[stage]:
        assert (first / name).exists(), name
        assert hashes(first / name) == hashes(second / name), f"{stage}: {name} differs"
