"""The champion gate's figures (pipelines/champion.py): the policy, and both graphs scored on the
same test split. The registry side is tests/test_register.py."""

from pathlib import Path

import pytest

from pipelines.champion import accuracy_on, gate, judge
from pipelines.config import Params
from pipelines.evaluate import evaluate
from pipelines.export import export
from tests.helpers.modelzoo import tamper, trained_model
from tests.helpers.params import tiny_params


def test_gate_policy() -> None:
    assert gate(0.90, None, 0.0, 0.8) == (True, "no champion yet; accuracy 0.9000")
    assert gate(0.95, 0.95, 0.0, 0.8)[0] and gate(0.949, 0.95, 0.002, 0.8)[0]
    refused, why = gate(0.90, 0.95, 0.01, 0.8)
    assert not refused and "0.9000 < champion's 0.9500" in why and "challenger" in why


def test_gate_applies_the_absolute_floor_with_or_without_a_champion() -> None:
    refused, why = gate(0.11, None, 0.0, 0.8)  # chance level, nothing to compare with
    assert not refused and why.startswith("accuracy 0.1100 < evaluate.min_accuracy 0.8")
    assert not gate(0.79, 0.5, 0.0, 0.8)[0]  # better than a weak champion is not enough
    assert gate(0.8, None, 0.0, 0.8)[0]
    assert not gate(float("nan"), None, 0.0, 0.0)[0]  # a NaN accuracy is below every floor


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, Path, Path, Path]:
    """(params, prepared dir, a good ONNX graph, a tampered one), floor 0.3 (the tiny model
    scores ~0.54); `model.pt` beside them."""
    root = tmp_path_factory.mktemp("champion")
    params = tiny_params(**{"evaluate.min_accuracy": 0.3})
    prepared, model = trained_model(root, params)
    export(params.export, model, prepared, root / "good.onnx")
    tamper(root / "good.onnx", root / "bad.onnx")
    return params, prepared, root / "good.onnx", root / "bad.onnx"


def test_accuracy_on_scores_the_test_split_as_evaluate_does(
    graphs: tuple[Params, Path, Path, Path], tmp_path: Path
) -> None:
    params, prepared, good, _ = graphs
    torch_accuracy = evaluate(params.evaluate, good.parent / "model.pt", prepared, tmp_path)
    test_rows = torch_accuracy["test_rows"]
    # the exported graph matches PyTorch's within export's parity tolerance: a near-tie may flip
    assert abs(accuracy_on(good, prepared) - torch_accuracy["accuracy"]) <= 1 / test_rows


def test_judge_scores_both_graphs_on_the_same_split(
    graphs: tuple[Params, Path, Path, Path],
) -> None:
    params, prepared, good, bad = graphs
    good_accuracy, bad_accuracy = accuracy_on(good, prepared), accuracy_on(bad, prepared)
    assert bad_accuracy < good_accuracy

    first = judge(good, None, prepared, params)
    assert (first.accuracy, first.champion_accuracy, first.promote) == (good_accuracy, None, True)

    worse = judge(bad, good, prepared, params)
    assert (worse.accuracy, worse.champion_accuracy) == (bad_accuracy, good_accuracy)
    assert not worse.promote and "kept as challenger" in worse.reason

    better = judge(good, bad, prepared, params)
    assert better.promote and better.champion_accuracy == bad_accuracy
