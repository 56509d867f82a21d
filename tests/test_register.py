import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
from mlflow import MlflowClient

from flows.package import PackageError, package
from flows.register import ONNX_HASH_TAG, register
from pipelines.artifacts import file_sha256
from pipelines.champion import CHALLENGER, CHAMPION
from pipelines.export import export
from pipelines.select import GOLDEN
from pipelines.tracking import start_parent_run
from tests.helpers.modelzoo import tamper, trained_model, write_golden
from tests.helpers.params import tiny_params


def select_dir(root: Path, onnx_path: Path, prepared: Path | None = None) -> Path:
    """What `select` leaves for `register`; with `prepared`, its golden set (50 rows) and its
    reference profile (100 rows) too."""
    from pipelines.reference import build_reference
    from pipelines.runtime import logits, read_metadata, session

    out = root / "select"
    out.mkdir()
    shutil.copy(onnx_path, out / "model.onnx")
    if prepared is not None:
        write_golden(out / "model.onnx", prepared, out / GOLDEN)
        graph, spec = (
            session(out / "model.onnx"),
            read_metadata(out / "model.onnx")["preprocessing"],
        )
        build_reference(prepared, spec, lambda x: logits(graph, x), out, rows=100, seed=0)
    winner = {"name": "teacher/onnxruntime-fp32", "engine": "onnxruntime", "precision": "fp32"}
    (out / "winner.json").write_text(json.dumps({"winner": winner}))
    (out / "candidates.md").write_text("| table |\n")
    return out


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'registry.db'}")
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def test_champion_gate_refuses_a_worse_model_and_keeps_the_alias(
    tmp_path: Path, registry: MlflowClient
) -> None:
    params = tiny_params(**{"evaluate.min_accuracy": 0.3})  # the tiny model scores ~0.54
    prepared, model = trained_model(tmp_path, params)
    export(params.export, model, prepared, tmp_path / "good.onnx")
    tamper(tmp_path / "good.onnx", tmp_path / "bad.onnx")
    parent = start_parent_run(params, tmp_path)
    name = params.register_.model_name

    first = register(
        params, tmp_path, parent, select_dir(tmp_path / "a", tmp_path / "good.onnx"), prepared
    )
    assert (first.alias, first.champion_version) == (CHAMPION, None)

    worse = register(
        params, tmp_path, parent, select_dir(tmp_path / "b", tmp_path / "bad.onnx"), prepared
    )
    assert worse.alias == CHALLENGER and worse.accuracy < first.accuracy
    assert str(registry.get_model_version_by_alias(name, CHAMPION).version) == first.version
    assert str(registry.get_model_version_by_alias(name, CHALLENGER).version) == worse.version
    assert (
        "kept as challenger" in registry.get_model_version(name, worse.version).tags["gate.reason"]
    )

    retrained(tmp_path / "good.onnx", tmp_path / "same.onnx")
    same = register(
        params, tmp_path, parent, select_dir(tmp_path / "c", tmp_path / "same.onnx"), prepared
    )
    assert same.alias == CHAMPION and same.champion_version == first.version and same.promoted
    old = registry.get_model_version(name, first.version).tags
    assert old["demoted_by"] == same.version and "demoted_at" in old
    assert registry.get_model_version(name, same.version).tags["promoted_over"] == first.version


def retrained(src: Path, dst: Path) -> None:
    """The same weights in a new file (another doc string): as accurate, another graph hash."""
    proto = onnx.load(str(src))
    proto.doc_string = "retrained"
    onnx.save(proto, str(dst))


def test_a_model_below_the_floor_is_never_champion(tmp_path: Path, registry: MlflowClient) -> None:
    params = tiny_params()  # evaluate.min_accuracy 0.8; the tiny model scores ~0.54
    prepared, model = trained_model(tmp_path, params)
    export(params.export, model, prepared, tmp_path / "weak.onnx")
    parent = start_parent_run(params, tmp_path)
    weak = register(
        params, tmp_path, parent, select_dir(tmp_path / "a", tmp_path / "weak.onnx"), prepared
    )
    assert (weak.alias, weak.promoted, weak.champion_version) == (CHALLENGER, False, None)
    assert "< evaluate.min_accuracy 0.8" in weak.reason
    name = params.register_.model_name
    assert registry.get_registered_model(name).aliases == {CHALLENGER: int(weak.version)}


def test_registering_the_same_graph_again_changes_nothing(
    tmp_path: Path, registry: MlflowClient
) -> None:
    params = tiny_params(**{"evaluate.min_accuracy": 0.3})
    prepared, model = trained_model(tmp_path, params)
    export(params.export, model, prepared, tmp_path / "model.onnx")
    parent = start_parent_run(params, tmp_path)
    name = params.register_.model_name
    first = register(
        params, tmp_path, parent, select_dir(tmp_path / "a", tmp_path / "model.onnx"), prepared
    )
    assert first.promoted
    tags = registry.get_model_version(name, first.version).tags
    assert tags[ONNX_HASH_TAG] == file_sha256(tmp_path / "model.onnx")

    again = register(
        params, tmp_path, parent, select_dir(tmp_path / "b", tmp_path / "model.onnx"), prepared
    )
    assert (again.version, again.alias, again.promoted) == (first.version, CHAMPION, False)
    assert "champion unchanged" in again.reason
    versions = registry.search_model_versions(f"name = '{name}'")
    assert [str(v.version) for v in versions] == [first.version]
    assert registry.get_model_version(name, first.version).tags == tags  # no new history
    runs = registry.search_runs(
        [registry.get_run(parent).info.experiment_id], "tags.`mlops.stage` = 'register'"
    )
    assert len(runs) == 1  # no second register run for the same graph


def test_the_golden_set_goes_with_the_model_and_package_requires_it(
    tmp_path: Path, registry: MlflowClient
) -> None:
    """`select`'s golden.json (and its reference profile) is logged in the version's `model/`
    artifact; a champion registered without a golden set is refused by `package`, naming the
    version and the file."""
    params = tiny_params(**{"evaluate.min_accuracy": 0.3})
    prepared, model = trained_model(tmp_path, params)
    export(params.export, model, prepared, tmp_path / "model.onnx")
    proto = onnx.load(str(tmp_path / "model.onnx"))
    proto.doc_string = "the same model, another graph file"
    onnx.save(proto, str(tmp_path / "other.onnx"))
    parent = start_parent_run(params, tmp_path)
    bare = register(
        params, tmp_path, parent, select_dir(tmp_path / "a", tmp_path / "model.onnx"), prepared
    )
    assert bare.promoted
    with pytest.raises(PackageError, match=rf"^version {bare.version}: no model/golden.json "):
        package(params, tmp_path)

    name = params.register_.model_name
    registry.delete_registered_model_alias(name, CHAMPION)  # the next version becomes champion
    out = select_dir(tmp_path / "b", tmp_path / "other.onnx", prepared)
    golden = register(params, tmp_path, parent, out, prepared)
    assert golden.version != bare.version
    run_id = registry.get_model_version(name, golden.version).run_id
    listed = {f.path for f in registry.list_artifacts(run_id, "model")}
    assert listed == {
        "model/model.onnx",
        "model/metadata.json",
        f"model/{GOLDEN}",
        "model/reference",  # the reference profile (issue 16), next to the golden set
    }
    fetched = registry.download_artifacts(run_id, f"model/{GOLDEN}", str(tmp_path))
    assert Path(fetched).read_bytes() == (out / GOLDEN).read_bytes()
    profile = registry.list_artifacts(run_id, "model/reference")
    assert {f.path for f in profile} == {
        "model/reference/features.parquet",
        "model/reference/reference.json",
    }


@pytest.fixture(autouse=True)
def _dirs(tmp_path: Path) -> None:
    for sub in ("a", "b", "c"):
        (tmp_path / sub).mkdir()


def test_a_cascade_is_registered_with_both_graphs_gated_as_a_cascade_and_packed(
    tmp_path: Path, registry: MlflowClient
) -> None:
    """The cascade's student graph and cascade.json go into the version's `model/` artifact
    (tag cascade_sha256); the gate scores the cascade, not the teacher alone; the same teacher
    graph alone is another version; the same cascade again registers nothing; the BentoML model
    `package` makes holds both graphs."""
    import bentoml

    from flows.package import save_bento_model
    from flows.register import CASCADE_HASH_TAG
    from pipelines.cascade import CASCADE, STUDENT, Cascade
    from pipelines.quantize import split_inputs
    from pipelines.runtime import logits, read_metadata, session
    from tests.helpers.cascade import cascade_folder

    params = tiny_params(**{"evaluate.min_accuracy": 0.3, "register.tolerance": 1.0})
    folder, prepared = cascade_folder(tmp_path / "c", golden=True)
    parent = start_parent_run(params, tmp_path)
    name = params.register_.model_name
    alone = register(
        params, tmp_path, parent, select_dir(tmp_path / "a", folder / "model.onnx"), prepared
    )

    out = select_dir(tmp_path / "b", folder / "model.onnx")
    for extra in (STUDENT, CASCADE, "golden.json"):
        shutil.copy(folder / extra, out / extra)
    cascade = register(params, tmp_path, parent, out, prepared)
    assert cascade.version != alone.version and cascade.champion_version == alone.version
    teacher, student = session(folder / "model.onnx"), session(folder / STUDENT)
    threshold = json.loads((folder / CASCADE).read_text())["threshold"]
    x, y = split_inputs(prepared, "test", read_metadata(folder / "model.onnx")["preprocessing"])
    routed = Cascade(lambda r: logits(student, r), lambda r: logits(teacher, r), threshold)(x)
    assert cascade.accuracy == float((routed.argmax(axis=1) == y).mean())
    assert cascade.champion_accuracy == alone.accuracy
    tags = registry.get_model_version(name, cascade.version).tags
    assert tags[CASCADE_HASH_TAG] == file_sha256(folder / CASCADE)
    assert tags[ONNX_HASH_TAG] == file_sha256(folder / "model.onnx")
    run_id = registry.get_model_version(name, cascade.version).run_id
    listed = {f.path for f in registry.list_artifacts(run_id, "model")}
    assert {f"model/{STUDENT}", f"model/{CASCADE}", "model/model.onnx"} <= listed

    again = register(params, tmp_path, parent, out, prepared)
    assert again.version == cascade.version
    assert len(registry.search_model_versions(f"name = '{name}'")) == 2

    local = Path(registry.download_artifacts(run_id, "model", str(tmp_path / "dl")))
    stored = bentoml.models.get(save_bento_model(name, local, cascade.version))
    assert (Path(stored.path) / STUDENT).read_bytes() == (folder / STUDENT).read_bytes()
    assert stored.info.metadata["cascade_sha256"] == file_sha256(folder / CASCADE)
