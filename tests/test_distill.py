from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from pipelines.distill import distill, distillation_loss
from pipelines.errors import InUseError
from pipelines.models import load_model, save_model
from tests.helpers.locks import held_elsewhere
from tests.helpers.modelzoo import trained_model
from tests.helpers.params import tiny_params


def test_loss_mixes_soft_targets_and_labels() -> None:
    teacher = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    logits = torch.randn(8, 3)
    hard_only = distillation_loss(teacher, temperature=4.0, alpha=0.0)(logits, x, y)
    assert torch.allclose(hard_only, F.cross_entropy(logits, y))
    with torch.no_grad():
        copy = distillation_loss(teacher, temperature=4.0, alpha=1.0)(teacher(x), x, y)
    assert copy.abs().item() < 1e-6  # a student equal to its teacher has nothing to learn


def test_student_is_smaller_learns_and_describes_its_teacher(tmp_path: Path) -> None:
    params = tiny_params(
        **{"distill.model": {"arch": "mlp", "width": 16, "depth": 1, "dropout": 0.0}}
    )
    prepared, teacher = trained_model(tmp_path, params)
    result = distill(params.train, params.distill, teacher, prepared, tmp_path / "ckpt")
    save_model(tmp_path / "student.pt", result)
    student, meta = load_model(tmp_path / "student.pt")
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert size(student) < size(load_model(teacher)[0])
    assert meta["arch"] == "mlp" and meta["distillation"]["alpha"] == params.distill.alpha
    assert result.metrics["val_accuracy"] > 0.2  # ten classes: chance is 0.1
    assert meta["fingerprint"] != load_model(teacher)[1]["fingerprint"]


def test_a_second_distill_into_a_held_checkpoint_dir_fails_fast(tmp_path: Path) -> None:
    params = tiny_params()
    prepared, teacher = trained_model(tmp_path, params)
    with held_elsewhere(tmp_path / "ckpt") as pid, pytest.raises(InUseError) as refused:
        distill(params.train, params.distill, teacher, prepared, tmp_path / "ckpt")
    assert str(refused.value) == f"{tmp_path / 'ckpt'} is in use by PID {pid}"


def test_a_tabular_student_gets_the_teachers_input_scaling(tmp_path: Path) -> None:
    """Both fit the same scaling on the same training split: the student's buffers equal the
    teacher's, and `auto` made both MLPs."""
    from pipelines.scaling import Scaled
    from tests.helpers.modelzoo import tabular_params

    params = tabular_params(tmp_path)
    prepared, teacher_path = trained_model(tmp_path, params)
    teacher, _ = load_model(teacher_path)
    student = distill(
        params.train, params.distill, teacher_path, prepared, tmp_path / "student-checkpoints"
    )
    assert params.train.model.arch == params.distill.model.arch == "mlp"
    assert isinstance(student.model, Scaled) and isinstance(teacher, Scaled)
    for name in ("shift", "scale"):
        assert torch.equal(getattr(student.model.scaler, name), getattr(teacher.scaler, name))
