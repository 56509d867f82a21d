import re
from collections.abc import Iterator
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from pipelines.config import (
    DataSource,
    Params,
    RandomResizedCrop,
    RunOverrides,
    SpaceParam,
    apply_overrides,
    load_params,
    validate_params,
)
from pipelines.errors import ParamsError
from tests.helpers import REPO


def test_params_yaml_loads_into_frozen_models() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.train.model.arch in {"cnn", "mlp"}
    assert len(params.data.feature_columns) == 64
    with pytest.raises(ValueError, match="frozen"):
        params.train.epochs = 1  # type: ignore[misc]


def test_unknown_key_names_the_key_and_the_allowed_keys() -> None:
    with pytest.raises(ParamsError) as info:
        load_params(REPO / "params.yaml", overrides={"train.epoch": 3})
    message = str(info.value)
    assert "train.epoch: unknown key" in message
    assert "epochs" in message and "batch_size" in message


def test_bad_value_names_the_key_and_the_allowed_values() -> None:
    with pytest.raises(ParamsError) as info:
        load_params(REPO / "params.yaml", overrides={"train.scheduler": "step"})
    assert "train.scheduler" in str(info.value)
    assert "'cosine' or 'constant'" in str(info.value)
    assert "got 'step'" in str(info.value)


def test_unregistered_architecture_lists_registered_ones() -> None:
    with pytest.raises(
        ParamsError, match=r"train\.model\.arch: .*'resnet' is not registered; allowed: mlp, cnn"
    ):
        load_params(REPO / "params.yaml", overrides={"train.model.arch": "resnet"})


def test_every_error_is_reported_at_once() -> None:
    with pytest.raises(ParamsError) as info:
        load_params(REPO / "params.yaml", overrides={"train.lr": -1, "prepare.val_fraction": 2})
    assert "train.lr" in str(info.value) and "prepare.val_fraction" in str(info.value)


def test_image_shape_must_match_feature_count() -> None:
    with pytest.raises(ParamsError, match="image_shape: 4x4=16 does not match 64"):
        load_params(REPO / "params.yaml", overrides={"data.image_shape": [4, 4]})


def test_missing_key_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        (REPO / "params.yaml").read_text().replace("  epochs: ", "  #")
    )
    with pytest.raises(ParamsError, match=r"train\.epochs: required key is missing"):
        load_params(tmp_path / "p.yaml")
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "absent.yaml")


def test_source_must_be_builtin_or_a_table() -> None:
    with pytest.raises(ParamsError, match="neither a built-in source"):
        load_params(REPO / "params.yaml", overrides={"data.source": "data/raw/x.xlsx"})


def test_overrides_merge_nested_and_dotted_keys() -> None:
    raw = {"train": {"model": {"arch": "cnn", "width": 32}, "epochs": 3}}
    merged = apply_overrides(raw, {"train": {"model": {"width": 8}}, "train.epochs": 5})
    assert merged == {"train": {"model": {"arch": "cnn", "width": 8}, "epochs": 5}}
    assert raw["train"]["epochs"] == 3


# --- the one-line form, bounds, sources, settings that cannot work together --------------------


def raw_params() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load((REPO / "params.yaml").read_text())
    return raw


def rejected(raw: dict[str, Any]) -> str:
    with pytest.raises(ParamsError) as info:
        validate_params(raw, source="params.yaml")
    return str(info.value)


def test_first_line_names_the_first_problem() -> None:
    raw = raw_params()
    raw["train"]["lr"] = 0
    raw["train"]["epochs"] = 0
    lines = rejected(raw).splitlines()
    assert lines[0].startswith("params.yaml: invalid parameters: train.epochs: Input should be")
    assert lines[1].startswith("  train.lr: Input should be greater than 0")


def numeric_leaves(
    model: type[BaseModel], raw: Any, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path in params.yaml, an absurdly large value of the field's shape) for every numeric
    setting of `model` (walked from its type hints, so a new field is covered without a test
    change); the tune space's bounds are checked through the train keys they range over."""
    for name, info in model.model_fields.items():
        key = info.alias or name
        sub = raw.get(key) if isinstance(raw, dict) else None
        yield from numeric_field((*path, key), info.annotation, sub)


def numeric_field(
    path: tuple[str, ...], annotation: Any, raw: Any
) -> Iterator[tuple[tuple[str, ...], Any]]:
    origin, args = get_origin(annotation), get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield from numeric_leaves(annotation, raw, path)
    elif annotation in (int, float):
        yield path, ABSURD
    elif origin is tuple and numeric(annotation):
        yield path, [ABSURD] * len(args)
    elif origin is dict and numeric(args[1]):
        yield path, {"train": ABSURD}
    elif origin is dict and args[1] is SpaceParam:
        for dim, spec in raw.items():
            if spec["type"] != "categorical":
                yield (*path, dim, "high"), ABSURD
    elif origin in (Union, UnionType):
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if models and isinstance(raw, dict):
            yield from numeric_leaves(models[0], raw, path)
        elif not models:
            for arg in args:
                if arg is not type(None) and numeric(arg):
                    yield from numeric_field(path, arg, raw)
                    break


def numeric(annotation: Any) -> bool:
    if annotation in (int, float):
        return True
    base = get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation
    return base in (int, float) or any(numeric(a) for a in get_args(base))


ABSURD = 10**15
NUMERIC = list(numeric_leaves(Params, raw_params()))


def parent_of(raw: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """The mapping in `raw` that holds the last key of `path` (the setting to change)."""
    node = raw
    for part in path[:-1]:
        node = node[part]
    return node


def test_every_numeric_setting_is_found() -> None:
    names = {".".join(path) for path, _ in NUMERIC}
    assert {"train.epochs", "data.value_range", "orchestration.stage_timeout_s"} <= names
    assert {"tune.space.train.lr.high", "serve.max_rows", "data.features.count"} <= names
    assert len(NUMERIC) > 50


@pytest.mark.parametrize(("path", "value"), NUMERIC, ids=[".".join(path) for path, _ in NUMERIC])
def test_every_numeric_setting_has_an_upper_bound(path: tuple[str, ...], value: Any) -> None:
    raw = raw_params()
    node = parent_of(raw, path)
    node[path[-1]] = value
    named = ".".join(path[:3] if path[:2] == ("tune", "space") else path)
    assert f": invalid parameters: {named}" in rejected(raw)


SCALARS = [(path, value) for path, value in NUMERIC if value == ABSURD]


@pytest.mark.parametrize("path", [p for p, _ in SCALARS], ids=[".".join(p) for p, _ in SCALARS])
def test_no_numeric_setting_takes_true_or_false(path: tuple[str, ...]) -> None:
    """YAML's `true` is no number: pydantic alone reads `epochs: true` as 1."""
    raw = raw_params()
    node = parent_of(raw, path)
    node[path[-1]] = True
    assert f"{'.'.join(path)}: a number is required, not true/false" in rejected(raw)


def as_text(value: Any) -> Any:
    """`value` with every number written as YAML text ('0.3'), in lists and dict values too."""
    if isinstance(value, list):
        return [as_text(v) for v in value]
    if isinstance(value, dict):
        return {k: as_text(v) for k, v in value.items()}
    return str(value)


@pytest.mark.parametrize(("path", "value"), NUMERIC, ids=[".".join(path) for path, _ in NUMERIC])
def test_no_numeric_setting_takes_text(path: tuple[str, ...], value: Any) -> None:
    """`ratios: ['0.3']` (quoted) is text: pydantic's lax mode alone would read it as 0.3."""
    raw = raw_params()
    node = parent_of(raw, path)
    node[path[-1]] = as_text(node.get(path[-1], value))
    named = ".".join(path[:3] if path[:2] == ("tune", "space") else path)
    problem = rejected(raw)
    assert f": invalid parameters: {named}" in problem
    assert "a number is required, not text (quoted in YAML?)" in problem


def test_a_quoted_ratio_is_refused_naming_the_key_and_the_item() -> None:
    raw = raw_params()
    raw["prune"]["ratios"] = [0.3, "0.5"]
    first = rejected(raw).splitlines()[0]
    assert first == (
        "params.yaml: invalid parameters: prune.ratios: "
        "a number is required, not text (quoted in YAML?): '0.5'"
    )


def test_yaml_ints_and_exponents_are_numbers(tmp_path: Path) -> None:
    """A YAML int for a float field is a number; so is YAML 1.2's `1e-3` (YAML 1.1, PyYAML's,
    reads it as text); a quoted '1e-3' stays text and is refused."""
    text = (REPO / "params.yaml").read_text()
    lr = re.search(r"^  lr: .*$", text, re.MULTILINE)
    assert lr is not None
    path = tmp_path / "params.yaml"
    path.write_text(
        text.replace(lr.group(0), "  lr: 1e-3", 1).replace(
            "  ratios: [0.3, 0.5]", "  ratios: [1e-1, 0.5]"
        )
    )
    params = load_params(path)
    assert params.train.lr == 0.001 and params.prune.ratios == [0.1, 0.5]
    path.write_text(text.replace(lr.group(0), "  lr: 1", 1))
    assert load_params(path).train.lr == 1.0
    path.write_text(text.replace(lr.group(0), "  lr: '1e-3'", 1))
    with pytest.raises(ParamsError, match=r"train\.lr: a number is required, not text"):
        load_params(path)


@pytest.mark.parametrize("field", ["epochs", "lr", "batch_size"])
def test_ui_parameters_share_the_bounds(field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        RunOverrides.model_validate({field: 100_000_000})


@pytest.mark.parametrize(
    "source",
    [
        "/etc/passwd.csv",
        "../outside.csv",
        "data/../outside.csv",
        "raw.csv",
        "C:/data/x.csv",
        "data\\..\\x.csv",
        "reports/x.parquet",
    ],
)
def test_data_source_must_be_a_relative_path_under_data(source: str) -> None:
    with pytest.raises(ParamsError, match=r"invalid parameters: data\.source: must be a"):
        load_params(REPO / "params.yaml", overrides={"data.source": source})
    with pytest.raises(ValidationError, match="data_source"):
        RunOverrides(data_source=source)
    schema = TypeAdapter(DataSource).json_schema()
    assert not re.match(schema["pattern"], source), "the UI form's pattern must refuse it too"


@pytest.mark.parametrize(
    "source", ["digits", "data/raw/my set.csv", "data/x.PARQUET", "data/a..b.pq", "data/raw/pets"]
)
def test_data_source_accepts_builtin_and_tables_under_data(source: str) -> None:
    load_params(REPO / "params.yaml", overrides={"data.source": source})
    assert RunOverrides(data_source=source).data_source == source
    assert re.match(TypeAdapter(DataSource).json_schema()["pattern"], source)


def tabular(raw: dict[str, Any]) -> dict[str, Any]:
    """The README's "your own data" shape: no image shape, flat-row models everywhere."""
    raw["data"]["image_shape"] = None
    raw["train"]["model"]["arch"] = "mlp"
    raw["distill"]["model"]["arch"] = "mlp"
    return raw


def test_tabular_data_with_flat_models_is_accepted() -> None:
    validate_params(tabular(raw_params()))


@pytest.mark.parametrize(
    ("change", "first", "second"),
    [
        (lambda r: r["train"]["model"].update(arch="cnn"), "train.model.arch", "data.image_shape"),
        (lambda r: r["distill"]["model"].update(arch="cnn"), "distill.model.arch", "image_shape"),
        (
            lambda r: r["tune"]["space"].update(
                {"train.model.arch": {"type": "categorical", "choices": ["mlp", "cnn"]}}
            ),
            "tune.space.train.model.arch: 'cnn'",
            "data.image_shape",
        ),
        (
            lambda r: r["select"].update(serving_batch=8192),
            "select.serving_batch",
            "export.max_batch",
        ),
        (lambda r: r["serve"].update(max_rows=5000), "serve.max_rows", "export.max_batch"),
        (
            lambda r: r["select"].update(serving_batch=512),
            "select.serving_batch",
            "convert.max_batch",
        ),
        (
            lambda r: r["tune"]["space"].update(
                {"train.lr": {"type": "float", "low": 0.1, "high": 20}}
            ),
            "tune.space.train.lr: 20.0 is not allowed",
            "train.lr",
        ),
    ],
)
def test_settings_that_cannot_work_together_name_both_keys(
    change: Any, first: str, second: str
) -> None:
    raw = tabular(raw_params())
    change(raw)
    message = rejected(raw)
    line = next(line for line in message.splitlines() if first in line)
    assert second in line.split(first, 1)[1]
    assert "Traceback" not in message


@pytest.mark.parametrize(
    ("features", "label_column", "shown"),
    [
        ([], "label", "features: the list is empty"),
        (["a", " ", "b"], "label", "features: entry 1 is a blank column name"),
        (["a", "b", "a", "b"], "label", "features: 'a', 'b' listed more than once"),
        (["species", "a", "b"], "species", "features: 'species' is the label column"),
        ({"prefix": "px_", "count": 3}, "px_1", "features: 'px_1' is the label column"),
    ],
    ids=["empty", "blank", "repeated", "label-listed", "label-generated"],
)
def test_a_feature_list_that_cannot_be_read_is_one_line_naming_the_column(
    features: Any, label_column: str, shown: str
) -> None:
    """Each of these used to reach `prepare` and end in a traceback (or, for the empty list, a
    half-written data/prepared/): now params.yaml is refused when it loads."""
    raw = tabular(raw_params())
    raw["data"].update(features=features, label_column=label_column, value_range="learn")
    message = rejected(raw)
    assert shown in message.splitlines()[0], message
    assert "Traceback" not in message


def test_the_readme_own_data_example_is_accepted() -> None:
    """The "Your own data" block, on top of params.yaml: tabular data with flat-row models."""
    text = (REPO / "README.md").read_text().split("### Your own data", 1)[1]
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    example = yaml.safe_load(block)
    params = load_params(REPO / "params.yaml", overrides=example)
    assert params.data.image_shape is None and params.distill.model.arch == "mlp"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("orchestration.gpu_stages", ["train", "trian"]),
        ("orchestration.stage_timeout_s", {"prepare": 60, "evalute": 60}),
        ("orchestration.stage_timeout_s", {}),
    ],
)
def test_orchestration_names_only_real_stages(key: str, value: Any) -> None:
    raw = raw_params()
    raw["orchestration"][key.split(".")[1]] = value
    assert f"invalid parameters: {key}: " in rejected(raw)


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("orchestration.nightly_cron", "bad cron", "not a cron expression"),
        ("orchestration.nightly_cron", "61 2 * * *", "not a cron expression"),
        ("orchestration.nightly_cron", "H 2 * * *", "not a cron expression"),
        ("orchestration.timezone", "Mars/Olympus", "unknown time zone"),
    ],
)
def test_the_schedule_is_checked_when_params_load(key: str, value: str, shown: str) -> None:
    with pytest.raises(ParamsError, match=re.escape(f"{key}: ")) as info:
        load_params(REPO / "params.yaml", overrides={key: value})
    assert shown in str(info.value)
    good = {"orchestration.nightly_cron": "30 3 * * 1-5", "orchestration.timezone": "Europe/Berlin"}
    assert (
        load_params(REPO / "params.yaml", overrides=good).orchestration.timezone == "Europe/Berlin"
    )


def test_arch_auto_follows_the_input_shape() -> None:
    """`auto` (params.yaml's default): images -> cnn, tabular rows -> mlp, in train and distill;
    an explicit arch is kept."""
    images = load_params(REPO / "params.yaml")
    assert (images.train.model.arch, images.distill.model.arch) == ("cnn", "cnn")
    raw = raw_params()
    raw["data"]["image_shape"] = None
    rows = validate_params(raw)
    assert (rows.train.model.arch, rows.distill.model.arch) == ("mlp", "mlp")
    raw["distill"]["model"]["arch"] = "cnn"
    line = next(line for line in rejected(raw).splitlines() if "distill.model.arch" in line)
    assert "data.image_shape" in line


def test_names_follow_data_name_unless_set() -> None:
    """The digits' effective names stay; another data.name renames what is null; an explicit
    name is kept."""
    params = load_params(REPO / "params.yaml")
    assert params.data.name == "digits"
    assert params.register_.model_name == "digits-classifier"
    assert (params.tracking.experiment, params.tune.study_name) == ("digits", "digits")
    wine = load_params(
        REPO / "params.yaml", overrides={"data.name": "wine", "tracking.experiment": "lab"}
    )
    assert wine.register_.model_name == "wine-classifier" and wine.tune.study_name == "wine"
    assert wine.tracking.experiment == "lab"
    with pytest.raises(ParamsError, match=r"data\.name"):
        load_params(REPO / "params.yaml", overrides={"data.name": "my data/x"})


def test_value_range_per_feature_or_learned() -> None:
    raw = raw_params()
    raw["data"].update(features=["a", "b"], image_shape=None)
    raw["data"]["value_range"] = {"a": [0, 1], "b": [-5, 1000]}
    data = validate_params(raw).data
    assert data.ranges() == [(0.0, 1.0), (-5.0, 1000.0)]
    assert data.model_scaling == "standard"  # auto, tabular rows
    raw["data"]["value_range"] = "learn"
    data = validate_params(raw).data
    assert data.ranges({"a": [0, 2], "b": [1, 3]}) == [(0.0, 2.0), (1.0, 3.0)]
    for mapping, problem in [
        ({"a": [0, 1]}, "value_range: no [low, high] for b"),
        ({"a": [0, 1], "b": [0, 1], "c": [0, 1]}, "value_range: c: not a feature column"),
        ({"a": [0, 1], "b": [2, 1]}, "value_range.b: low 2.0 is above high 1.0"),
    ]:
        raw["data"]["value_range"] = mapping
        assert problem in rejected(raw)


def test_images_take_one_value_range_and_no_model_scaling_by_default() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.data.scaling == "auto" and params.data.model_scaling == "none"
    with pytest.raises(ParamsError, match=r"value_range: images .*image_shape"):
        load_params(REPO / "params.yaml", overrides={"data.value_range": "learn"})
    chosen = load_params(REPO / "params.yaml", overrides={"data.scaling": "minmax"})
    assert chosen.data.model_scaling == "minmax"


# --- every key required; bools are bools; lists that must not be empty ------------------------

# Keys that may be left out: a tune dimension's keys depend on its type; a crop's scale and ratio
# are torchvision's documented defaults of an option that is off in params.yaml.
OPTIONAL = {(SpaceParam, "low"), (SpaceParam, "high"), (SpaceParam, "log"), (SpaceParam, "choices")}
OPTIONAL |= {(RandomResizedCrop, "scale"), (RandomResizedCrop, "ratio")}


def sections(model: type[BaseModel]) -> Iterator[type[BaseModel]]:
    """`model` and every model reachable from its fields' types."""
    yield model
    for info in model.model_fields.values():
        for arg in (info.annotation, *get_args(info.annotation)):
            for inner in (arg, *get_args(arg)):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    yield from sections(inner)


def test_every_params_key_is_required() -> None:
    """No second default in code: a params.yaml key left out is refused, not filled in."""
    defaulted = [
        f"{model.__name__}.{name}"
        for model in set(sections(Params))
        for name, info in model.model_fields.items()
        if not info.is_required() and (model, name) not in OPTIONAL
    ]
    assert defaulted == []


@pytest.mark.parametrize(
    "path", [("select", "cascade_confidence"), ("host", "training", "borrow_idle")]
)
def test_a_left_out_key_is_named(path: tuple[str, ...]) -> None:
    raw = raw_params()
    node = parent_of(raw, path)
    del node[path[-1]]
    assert f"{'.'.join(path)}: required key is missing" in rejected(raw)


def bool_leaves(
    model: type[BaseModel], raw: Any, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """The params.yaml path of every true/false setting of `model` (walked from its type hints,
    as `numeric_leaves`): those of optional sections where params.yaml sets the section, and
    `log` of each non-categorical tune dimension."""
    for name, info in model.model_fields.items():
        key = info.alias or name
        sub = raw.get(key) if isinstance(raw, dict) else None
        union = get_origin(info.annotation) in (Union, UnionType)
        args = get_args(info.annotation) if union else (info.annotation,)
        if bool in args:
            yield (*path, key)
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if models and isinstance(sub, dict):
            yield from bool_leaves(models[0], sub, (*path, key))
        if get_origin(info.annotation) is dict and get_args(info.annotation)[1] is SpaceParam:
            for dim, spec in sub.items():
                if spec["type"] != "categorical":
                    yield (*path, key, dim, "log")


BOOLS = list(bool_leaves(Params, raw_params()))


def test_every_bool_setting_is_found() -> None:
    names = {".".join(path) for path in BOOLS}
    assert {"train.bf16", "train.augment.hflip", "host.training.borrow_idle"} <= names
    assert {"tune.enabled", "serve.trace_predictions", "deploy.on_new_champion"} <= names
    assert any(name.startswith("tune.space.") and name.endswith(".log") for name in names)


@pytest.mark.parametrize(
    ("value", "what"),
    [("yes", "text (quoted in YAML?)"), ("on", "text (quoted in YAML?)"), (1, "a number"),
     (0.0, "a number")],
)  # fmt: skip
@pytest.mark.parametrize("path", BOOLS, ids=[".".join(p) for p in BOOLS])
def test_no_bool_setting_takes_a_number_or_text(
    path: tuple[str, ...], value: Any, what: str
) -> None:
    """Pydantic's lax mode alone reads 'yes', 'on', 1 and 0.0 as true/false."""
    raw = raw_params()
    node = parent_of(raw, path)
    node[path[-1]] = value
    named = ".".join(path[:3] if path[:2] == ("tune", "space") else path)
    lines = rejected(raw).splitlines()
    problem = next(line for line in lines if named in line)
    assert f"{'.'.join(path)}: true or false is required, not {what} (got {value!r})" in problem


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("host.training.cpus", [], "host.training.cpus: an empty list: give at least one core"),
        ("host.service.cpus", [], "host.service.cpus: an empty list: give at least one core"),
        ("host.training.cpus", [2, -1], "host.training.cpus.1: Input should be greater than or"),
        ("host.service.cpus", [-3], "host.service.cpus.0: Input should be greater than or equal"),
    ],
)
def test_core_lists_are_not_empty_nor_negative(key: str, value: Any, shown: str) -> None:
    """An empty affinity passes pydantic alone, then os.sched_setaffinity fails at train time."""
    with pytest.raises(ParamsError) as info:
        load_params(REPO / "params.yaml", overrides={key: value})
    assert len(str(info.value).splitlines()) == 1 and shown in str(info.value)


@pytest.mark.parametrize("level", [0.01, 0.3, 0.4999])
def test_the_cascade_confidence_is_0_or_at_least_one_half(level: float) -> None:
    with pytest.raises(ParamsError, match=r"select.cascade_confidence: must be 0 \(no bound\)"):
        load_params(REPO / "params.yaml", overrides={"select.cascade_confidence": level})


@pytest.mark.parametrize("level", [0, 0.5, 0.95, 0.999])
def test_the_cascade_confidence_takes_0_and_one_half_to_1(level: float) -> None:
    params = load_params(REPO / "params.yaml", overrides={"select.cascade_confidence": level})
    assert params.select.cascade_confidence == level
