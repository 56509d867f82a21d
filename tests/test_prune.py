"""`prune`: channel pruning that shrinks the network and keeps it valid, the stage's folder
written whole, a bad ratio refused in one line, and the pruned families in select's tournament."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pipelines import prune as prune_module
from pipelines import select as select_module
from pipelines.artifacts import read_json
from pipelines.cli import EXIT_REJECTED
from pipelines.errors import ParamsError
from pipelines.export import export
from pipelines.models import load_model, rebuild, resize
from pipelines.prune import FAMILIES, prune_model, read_families, shapes
from pipelines.quantize import MANIFEST, quantize
from tests.helpers.modelzoo import trained_model
from tests.helpers.params import tiny_params, write_params_file

ARCHS = {  # (arch, input shape): a tabular MLP, the digits CNN, the image model
    "mlp": [64],
    "cnn": [1, 8, 8],
    "resnet18": [3, 32, 32],
}


def model_of(arch: str) -> tuple[dict[str, Any], nn.Module]:
    """(construction args, a fresh model) of `arch` at width 8, 10 classes."""
    kwargs = {"input_shape": ARCHS[arch], "num_classes": 10, "width": 8, "depth": 2, "dropout": 0}
    args = {"arch": arch, "kwargs": kwargs}
    return args, rebuild(args).eval()


def layer_sizes(model: nn.Module) -> list[int]:
    """Output channels / features of every conv and linear layer, in order."""
    return [
        m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_pruning_removes_channels_and_the_pruned_layout_rebuilds(arch: str) -> None:
    torch.manual_seed(0)
    args, model = model_of(arch)
    x = torch.randn(4, *ARCHS[arch])
    before = layer_sizes(model)
    figures = prune_model(model, x[:2], 0.5, "l2", 10)

    after = layer_sizes(model)
    assert after[-1] == before[-1] == 10  # the classifier head keeps its classes
    assert all(a <= b for a, b in zip(after, before, strict=True))
    assert sum(after[:-1]) < sum(before[:-1])  # channels went
    assert figures["params_after"] < figures["params_before"]
    assert figures["macs_after"] < figures["macs_before"]
    assert figures["params_after"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    # The model file's path: a fresh model of the args, resized to the pruned shapes, loads the
    # pruned weights (strict) and computes the same logits.
    again = rebuild({**args, "shapes": shapes(model)})
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(x), out)


def test_resize_names_what_it_cannot_do() -> None:
    _, model = model_of("cnn")
    with pytest.raises(ValueError, match=r"no tensor 'nope\.weight'"):
        resize(model, {"nope.weight": [1]})


@pytest.mark.parametrize(
    ("ratios", "line"),
    [
        ([0.3, 1.0], "prune.ratios.1: Input should be less than 1 (got 1.0)"),
        ([0], "prune.ratios.0: Input should be greater than 0 (got 0)"),
        ([-0.2], "prune.ratios.0: Input should be greater than 0 (got -0.2)"),
    ],
)
def test_a_bad_ratio_is_one_line_naming_the_key(
    ratios: list[float],
    line: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import yaml

    from tests.helpers import REPO

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["prune"]["ratios"] = ratios
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    argv = ["--prepared", "p", "--teacher", "t.pt", "--out", "out", "--metrics", "m.json"]
    with pytest.raises(SystemExit) as info:
        prune_module.main(argv)
    assert info.value.code == EXIT_REJECTED
    err = capsys.readouterr().err
    assert err == f"error: params.yaml: invalid parameters: {line}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_no_ratios_writes_an_empty_family_list(tmp_path: Path) -> None:
    """`prune.ratios: []` turns pruning off: select then reads no extra family."""
    params = tiny_params({"prune.ratios": []})
    assert prune_module.prune(params, tmp_path / "unused.pt", tmp_path, tmp_path / "out") == {}
    assert read_families(tmp_path / "out" / FAMILIES) == []


RATIOS = [0.3, 0.5]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """(project root, prepared dir, teacher model file, prune's output folder): the stage's
    CLI run once on a tiny digits teacher, two ratios, one fine-tuning epoch."""
    root = tmp_path_factory.mktemp("prune")
    params = tiny_params(
        {"prune.ratios": RATIOS, "prune.epochs": 1, "quantize.parity_min_agreement": 0.05}
    )
    prepared, teacher = trained_model(root, params)
    write_params_file(params, root)
    out = root / "models" / "prune"
    argv = ["--prepared", str(prepared), "--teacher", str(teacher), "--out", str(out)]
    argv += ["--metrics", str(root / "prune.json"), "--params", str(root / "params.yaml")]
    prune_module.main(argv)  # no exit
    return root, prepared, teacher, out


def test_the_stage_writes_one_family_per_ratio(pruned: tuple[Path, Path, Path, Path]) -> None:
    root, _, teacher, out = pruned
    families = read_families(out / FAMILIES)
    assert [f[0] for f in families] == ["pruned30", "pruned50"]
    assert sorted(p.name for p in out.iterdir()) == [FAMILIES, "pruned30", "pruned50"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left
    metrics = read_json(root / "prune.json")
    teacher_model, _ = load_model(teacher)
    teacher_params = sum(p.numel() for p in teacher_model.parameters())
    previous = teacher_params
    for name, model_file, onnx_file, variants in families:
        model, meta = load_model(model_file)  # the pruned layout rebuilds from the file alone
        count = sum(p.numel() for p in model.parameters())
        assert count == metrics[name]["params_after"] < previous  # a higher ratio: smaller
        previous = count
        assert metrics[name]["params_before"] == teacher_params
        assert meta["pruning"]["ratio"] == metrics[name]["ratio"]
        assert onnx_file.is_file() and (variants / MANIFEST).is_file()
        assert 0 <= metrics[name]["test_accuracy"] <= 1


def test_a_failed_run_leaves_the_previous_folder_whole(
    pruned: tuple[Path, Path, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _, prepared, teacher, out = pruned
    target = tmp_path / "prune"
    shutil.copytree(out, target)
    before = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    calls: list[float] = []
    real = prune_module.prune_family_files

    def second_fails(params: Any, ratio: float, *args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(ratio)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(params, ratio, *args, **kwargs)

    monkeypatch.setattr(prune_module, "prune_family_files", second_fails)
    params = tiny_params({"prune.ratios": RATIOS, "prune.epochs": 1})
    with pytest.raises(RuntimeError, match="killed"):
        prune_module.prune(params, teacher, prepared, target)
    assert calls == RATIOS
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prune"]  # no staging folder left


def test_select_lists_the_pruned_families(
    pruned: tuple[Path, Path, Path, Path], monkeypatch: pytest.MonkeyPatch, mlflow_uri: str
) -> None:
    root, prepared, teacher, out = pruned
    params = tiny_params(
        {
            "quantize.parity_min_agreement": 0.05,
            "select.latency_iters": 20,
            "select.throughput_iters": 3,
            "select.max_accuracy_drop": 1.0,
        }
    )
    export(params.export, teacher, prepared, root / "teacher.onnx")
    quantize(params.quantize, root / "teacher.onnx", prepared, root / "teacher-variants")
    write_params_file(params, root)
    monkeypatch.chdir(root)
    teacher_family = [str(teacher), str(root / "teacher.onnx"), str(root / "teacher-variants")]
    select_module.main(
        [
            *("--family", "teacher", *teacher_family),
            *("--families", str(out / FAMILIES)),
            *("--prepared", str(prepared), "--out", str(root / "select")),
            *("--metrics", str(root / "select.json")),
        ]
    )
    summary = read_json(root / "select" / "winner.json")
    measured = {c["family"] for c in summary["candidates"] if not c["extra"].get("dropped")}
    assert measured == {"teacher", "pruned30", "pruned50"}
    names = {c["name"] for c in summary["candidates"]}
    for family in ("pruned30", "pruned50"):
        assert {f"{family}/pytorch-fp32", f"{family}/onnxruntime-fp32"} <= names
        kept = read_json(out / family / "variants" / MANIFEST)
        for variant in ("int8_cpu", "int8_qdq", "fp16"):
            assert f"{family}/onnxruntime-{variant}" in names  # measured, or listed as dropped
            assert kept[variant]["status"] in ("kept", "dropped")
    assert "pruned30/onnxruntime-fp32" in (root / "select" / "candidates.md").read_text()


@pytest.mark.parametrize(("arch", "ratio"), [("mlp", 0.9), ("cnn", 0.99), ("resnet18", 0.99)])
def test_a_ratio_that_removes_nothing_is_refused_naming_the_key(arch: str, ratio: float) -> None:
    """torch-pruning leaves a layer whole rather than empty it, so a high ratio on narrow layers
    removes nothing: refused, naming prune.ratios, instead of a "pruned" copy of the teacher."""
    torch.manual_seed(0)
    _, model = model_of(arch)
    x = torch.randn(2, *ARCHS[arch])
    with pytest.raises(ParamsError, match=rf"prune\.ratios: {ratio:g} removed no channel"):
        prune_model(model, x, ratio, "l2", 10)
