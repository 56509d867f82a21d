"""Typed, frozen models of `params.yaml`, loaded once.

Every key is required (no second default in code) and unknown keys are rejected. A bad value or
an unknown key raises `ParamsError` naming the key and what is allowed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipelines.errors import ParamsError
from pipelines.models import ARCHITECTURES

DEFAULT_PARAMS = Path("params.yaml")
BUILTIN_SOURCES = ("digits",)
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


# Value types shared by params.yaml's models and the flow's UI parameters (one definition each).
Epochs = Annotated[int, Field(gt=0, description="training epochs (early stopping may end sooner)")]
LearningRate = Annotated[float, Field(gt=0, lt=10, description="AdamW learning rate")]
BatchSize = Annotated[int, Field(gt=0, le=65536, description="training batch size")]


def _registered(value: str) -> str:
    if value not in ARCHITECTURES:
        raise ValueError(f"{value!r} is not registered; allowed: {', '.join(ARCHITECTURES)}")
    return value


Arch = Annotated[
    str,
    AfterValidator(_registered),
    Field(description="a registered architecture", json_schema_extra={"enum": list(ARCHITECTURES)}),
]
DataSource = Annotated[
    str,
    Field(
        min_length=1,
        description='"digits" or a CSV/Parquet path under data/',
        pattern=r"^(digits|.+\.([cC][sS][vV]|[pP][aA][rR][qQ][uU][eE][tT]|[pP][qQ]))$",
    ),
]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FeatureRange(Section):
    """Columns named `{prefix}0` .. `{prefix}{count-1}`."""

    prefix: str = Field(min_length=1)
    count: int = Field(gt=0)


class DataConfig(Section):
    source: str
    label_column: str = Field(min_length=1)
    features: list[str] | FeatureRange
    labels: list[int] | list[str] = Field(min_length=2)
    value_range: tuple[float, float]
    image_shape: tuple[int, int] | None

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value in BUILTIN_SOURCES or value.lower().endswith(TABLE_SUFFIXES):
            return value
        raise ValueError(
            f"{value!r} is neither a built-in source ({', '.join(BUILTIN_SOURCES)}) "
            f"nor a table file ({', '.join(TABLE_SUFFIXES)})"
        )

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        low, high = self.value_range
        if low > high:
            raise ValueError(f"value_range: low {low} is above high {high}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels: the label set has repeated values")
        if self.image_shape is not None:
            h, w = self.image_shape
            if h * w != len(self.feature_columns):
                raise ValueError(
                    f"image_shape: {h}x{w}={h * w} does not match "
                    f"{len(self.feature_columns)} feature columns"
                )
        return self

    @property
    def feature_columns(self) -> list[str]:
        if isinstance(self.features, FeatureRange):
            return [f"{self.features.prefix}{i}" for i in range(self.features.count)]
        return list(self.features)


class PrepareConfig(Section):
    val_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)
    seed: int

    @model_validator(mode="after")
    def _leaves_training_rows(self) -> PrepareConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must stay below 0.9")
        return self


class ValidateConfig(Section):
    min_rows_per_class: int = Field(ge=1)
    max_class_imbalance: float = Field(ge=1.0)
    max_duplicate_fraction: float = Field(ge=0.0, le=1.0)


class ModelConfig(Section):
    arch: Arch
    width: int = Field(gt=0)
    depth: int = Field(gt=0, le=8)
    dropout: float = Field(ge=0.0, lt=1.0)


class TrainConfig(Section):
    model: ModelConfig
    epochs: Epochs
    batch_size: BatchSize
    lr: LearningRate
    weight_decay: float = Field(ge=0)
    scheduler: Literal["cosine", "constant"]
    patience: int = Field(gt=0)
    min_delta: float = Field(ge=0)
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    bf16: bool
    num_workers: int = Field(ge=0)
    resume: bool


class SpaceParam(Section):
    """One dimension of the search space: a float or int range (log scale or not), or choices."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[str | int | float | bool] | None = None

    @model_validator(mode="after")
    def _complete(self) -> SpaceParam:
        if self.type == "categorical":
            if not self.choices or self.low is not None or self.high is not None or self.log:
                raise ValueError(
                    "categorical: give `choices` (a non-empty list) and no low/high/log"
                )
            return self
        if self.low is None or self.high is None or self.choices is not None:
            raise ValueError(f"{self.type}: give `low` and `high`, and no `choices`")
        if self.low >= self.high:
            raise ValueError(f"{self.type}: low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"{self.type}: a log scale needs low > 0 (got {self.low})")
        if self.type == "int" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError(
                f"int: low and high must be whole numbers (got {self.low}, {self.high})"
            )
        return self


class PrunerConfig(Section):
    kind: Literal["median", "hyperband", "none"]
    startup_trials: int = Field(ge=0)  # median: trials that finish before any is pruned
    warmup_epochs: int = Field(ge=0)  # median: epochs a trial runs before it can be pruned
    min_epochs: int = Field(ge=1)  # hyperband: the smallest budget a trial gets
    reduction_factor: int = Field(ge=2)  # hyperband: 1/reduction_factor of trials go on per rung


def train_leaves(model: type[BaseModel] = TrainConfig, prefix: str = "train.") -> list[str]:
    """The dotted names of every value of the train section: train.lr, train.model.width ..."""
    names = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += train_leaves(annotation, f"{prefix}{name}.")
        else:
            names.append(f"{prefix}{name}")
    return names


class TuneConfig(Section):
    enabled: bool
    trials: int = Field(gt=0)
    # failed trials one worker retries in one run before it stops with an error
    max_failed_trials: int = Field(ge=0, le=1000)
    timeout_s: float = Field(gt=0)
    workers: int = Field(ge=1)
    storage: str = Field(min_length=1)
    study_name: str = Field(min_length=1)
    seed: int
    sampler: Literal["tpe", "random"]
    startup_trials: int = Field(ge=0)  # TPE: random trials before the model kicks in
    pruner: PrunerConfig
    metric: Literal["val_accuracy", "val_loss"]
    heartbeat_s: int = Field(ge=1)
    space: dict[str, SpaceParam] = Field(min_length=1)

    @field_validator("space")
    @classmethod
    def _real_train_params(cls, value: dict[str, SpaceParam]) -> dict[str, SpaceParam]:
        known = train_leaves()
        unknown = [key for key in value if key not in known]
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)}: not a train param; allowed: {', '.join(known)}"
            )
        return value

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        return "maximize" if self.metric == "val_accuracy" else "minimize"


class EvaluateConfig(Section):
    batch_size: int = Field(gt=0)
    # The absolute floor: a model below it on the test split is rejected before export, and the
    # champion gate never promotes one below it. Set per data set (chance level is 1/classes).
    min_accuracy: float = Field(ge=0, le=1)


class ExportConfig(Section):
    opset: int = Field(ge=17)
    max_batch: int = Field(gt=1)
    parity_max_abs_diff: float = Field(gt=0)
    parity_min_agreement: float = Field(gt=0, le=1)


class QuantizeConfig(Section):
    calibration_samples: int = Field(gt=0)
    calibration_method: Literal["minmax", "entropy", "percentile"]
    parity_min_agreement: float = Field(gt=0, le=1)


class DistillConfig(Section):
    model: ModelConfig
    temperature: float = Field(gt=0)
    alpha: float = Field(ge=0, le=1)


class ConvertConfig(Section):
    precisions: list[Literal["fp16", "int8"]]
    max_batch: int = Field(gt=0)
    opt_batch: int = Field(gt=0)
    workspace_mib: int = Field(gt=0)
    timeout_s: float = Field(gt=0)
    parity_min_agreement: float = Field(gt=0, le=1)

    @model_validator(mode="after")
    def _profile(self) -> ConvertConfig:
        if self.opt_batch > self.max_batch:
            raise ValueError(f"opt_batch {self.opt_batch} exceeds max_batch {self.max_batch}")
        return self


class SelectConfig(Section):
    policy: Literal["throughput", "p99"]
    max_accuracy_drop: float = Field(ge=0, le=1)
    serving_batch: int = Field(gt=0)
    latency_iters: int = Field(gt=0)
    throughput_iters: int = Field(gt=0)
    threads: int = Field(ge=0)


class RegisterConfig(Section):
    model_name: str = Field(min_length=1)
    tolerance: float = Field(ge=0, le=1)


class TrackingConfig(Section):
    uri: str = Field(min_length=1)
    artifacts: str = Field(min_length=1)
    experiment: str = Field(min_length=1)
    ui_url: str = Field(min_length=1)


class OrchestrationConfig(Section):
    stage_timeout_s: dict[str, float]
    retries: int = Field(ge=0, le=10)
    retry_delay_s: float = Field(ge=0)
    gpu_stages: list[str]
    nightly_cron: str = Field(min_length=1)  # the `train/nightly` deployment's schedule
    timezone: str = Field(min_length=1)  # IANA name the cron is read in

    @field_validator("stage_timeout_s")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {stage: t for stage, t in value.items() if t <= 0}
        if bad:
            raise ValueError(f"timeouts must be positive: {bad}")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name, e.g. UTC)") from None
        return value


class PackageConfig(Section):
    export_to: str | None  # an absolute directory or a URI; None: <project>/dist/bentos

    @field_validator("export_to")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value and not Path(value).is_absolute():
            raise ValueError(
                f"must be an absolute path or a URI such as s3://bucket/bentos (got {value!r})"
            )
        return value


class ServeConfig(Section):
    max_batch_size: int = Field(ge=1, le=4096)
    max_latency_ms: int = Field(ge=1)
    trace_predictions: bool
    timeout_s: float = Field(gt=0)
    workers: int = Field(ge=1)
    threads: int = Field(ge=0)
    max_rows: int = Field(ge=1)
    max_body_bytes: int = Field(ge=1024)
    max_image_pixels: int = Field(ge=1)


class RunOverrides(Section):
    """The values users change between runs (the Prefect UI's form); None keeps params.yaml's."""

    epochs: Epochs | None = None
    lr: LearningRate | None = None
    batch_size: BatchSize | None = None
    arch: Arch | None = None
    data_source: DataSource | None = None

    KEYS: ClassVar[dict[str, str]] = {
        "epochs": "train.epochs",
        "lr": "train.lr",
        "batch_size": "train.batch_size",
        "arch": "train.model.arch",
        "data_source": "data.source",
    }

    def as_dotted(self) -> dict[str, Any]:
        """{"train.epochs": 5, ...} for the values that are set."""
        return {self.KEYS[k]: v for k, v in self.model_dump().items() if v is not None}


class Params(Section):
    data: DataConfig
    prepare: PrepareConfig
    validate_: ValidateConfig = Field(alias="validate")
    tune: TuneConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    export: ExportConfig
    quantize: QuantizeConfig
    distill: DistillConfig
    convert: ConvertConfig
    select: SelectConfig
    register_: RegisterConfig = Field(alias="register")
    tracking: TrackingConfig
    orchestration: OrchestrationConfig
    package: PackageConfig
    serve: ServeConfig

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def load_params(
    path: Path | str = DEFAULT_PARAMS, overrides: Mapping[str, Any] | None = None
) -> Params:
    """Read `path`, apply `overrides` (nested or dotted keys), validate everything once."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ParamsError(f"{path}: no such params file") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return validate_params(apply_overrides(raw, overrides or {}), source=str(path))


def validate_params(raw: Mapping[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(error, raw) for error in exc.errors()]
        raise ParamsError(f"{source}: invalid parameters:\n  " + "\n  ".join(lines)) from None


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into a copy of `raw`; a key "train.epochs" means nested keys."""
    merged = copy.deepcopy(dict(raw))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = merged
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {key}: {part} is not a section")
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf] = apply_overrides(node[leaf], value)
        else:
            node[leaf] = copy.deepcopy(value)
    return merged


def _describe(error: Any, raw: Mapping[str, Any]) -> str:
    loc = [str(part) for part in error["loc"] if not str(part).startswith(("list[", "tuple["))]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        return f"{key}: unknown key; allowed keys here: {', '.join(allowed)}"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    got = error.get("input")
    shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
    return f"{key}: {error['msg']}{shown}"


def _allowed_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Params
    for part in loc:
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(f.alias or n for n, f in model.model_fields.items())


def section_dict(section: BaseModel) -> dict[str, Any]:
    """The section as plain data (for hashing, MLflow params, metadata)."""
    return section.model_dump(mode="json", by_alias=True)
