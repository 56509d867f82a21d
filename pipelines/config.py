"""Typed, frozen models of `params.yaml`, loaded once.

Every key is required (no second default in code) and unknown keys are rejected. A bad value or
an unknown key raises `ParamsError` naming the key and what is allowed.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import NoneType, UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Json,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipelines.errors import EnvironmentVariableError, ParamsError
from pipelines.models import ARCHITECTURES, IMAGE_INPUT

DEFAULT_PARAMS = Path("params.yaml")
BUILTIN_SOURCES = ("digits",)
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
DATA_DIR = "data"  # user tables live under it (relative to the project root)

# Upper bounds: far above any sensible value, low enough that a typo (100000000 epochs) is refused
# before it ties up a host. Every numeric setting has one (tests/test_config.py checks them all).
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536  # rows in one batch (training, evaluation, serving, TensorRT profiles)
MAX_COUNT = 1_000_000  # counts of rows, samples, iterations, features
MAX_SECONDS = 7 * 24 * 3600.0  # timeouts: a week
MAX_PROCESSES = 256  # workers, threads


# Value types shared by params.yaml's models and the flow's UI parameters (one definition each).
Epochs = Annotated[
    int,
    Field(gt=0, le=MAX_EPOCHS, description="training epochs (early stopping may end sooner)"),
]
LearningRate = Annotated[float, Field(gt=0, lt=10, description="AdamW learning rate")]
BatchSize = Annotated[int, Field(gt=0, le=MAX_BATCH, description="training batch size")]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="random seed (numpy's range)")]
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS)]


STORAGE_DRIVERS = ("sqlite", "postgresql", "postgresql+psycopg")  # tune.storage URL schemes


def check_storage_url(url: str) -> str:
    """`url` if it is an Optuna storage the project supports: `sqlite:///<file>` (relative to the
    project root, or `sqlite:////abs/path`) or `postgresql[+psycopg]://user:pass@host[:port]/db`.
    Raises ValueError (without the password) otherwise."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    allowed = "sqlite:///<file> or postgresql://user:pass@host/db"
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ValueError(f"not a database URL; expected {allowed}") from None
    if parsed.drivername not in STORAGE_DRIVERS:
        raise ValueError(f"unsupported scheme {parsed.drivername!r}; expected {allowed}")
    if parsed.drivername == "sqlite" and not (parsed.database and url.startswith("sqlite:///")):
        raise ValueError("an SQLite storage needs a file: sqlite:///<file>")
    if parsed.drivername != "sqlite" and not (
        (parsed.host or parsed.query.get("host")) and parsed.database
    ):
        raise ValueError("a PostgreSQL storage needs a host and a database")
    return url


def check_http_url(url: str) -> str:
    """`url` if it is an absolute http(s) URL with a host and, if given, a numeric port (what
    httpx and MLflow's client accept); ValueError naming the fault otherwise (the URL itself
    only without its credentials). `http://`, `http://:3000/x` and `http://[::1]:3911x/` are
    refused here instead of failing at the first request, or never (a controller reading an
    unreachable URL throttles training for good)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"expected http(s)://host[:port]/..., got scheme {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("no host; expected http(s)://host[:port]/...")
    if port == 0:
        raise ValueError("port 0; expected 1-65535")
    return url


HttpUrl = Annotated[str, AfterValidator(check_http_url)]


def check_gateway_url(url: str) -> str:
    """`url` if check_http_url takes it, `http://` assumed when it has no scheme
    (prometheus_client's push_to_gateway takes `host:port`)."""
    check_http_url(url if "://" in url else f"http://{url}")
    return url


# Tracking stores this project runs against: MLflow's server (http/https), a database store
# (SQLAlchemy URLs), Databricks. MLflow 3 refuses its file store ("maintenance mode") unless
# MLFLOW_ALLOW_FILE_STORE is set: `file:` and bare paths are refused here with that reason.
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")


def check_tracking_uri(uri: str) -> str:
    """`uri` if it names a tracking store this project supports (TRACKING_SCHEMES, a database
    driver after `+` allowed); ValueError naming the scheme otherwise, never the URI (it may hold
    a password)."""
    scheme = uri.split("://", 1)[0].split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme in ("http", "https"):
        return check_http_url(uri)
    if scheme in TRACKING_SCHEMES:
        return uri
    expected = "http(s)://host:port, sqlite:///<file>, postgresql://... or databricks"
    if scheme in ("", "file"):
        return _file_store(uri, expected)
    raise ValueError(f"unsupported scheme {scheme!r}; expected {expected}")


def _file_store(uri: str, expected: str) -> str:
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true"):
        return uri
    raise ValueError(f"a file store (MLflow 3 refuses it); expected {expected}")


def _registered(value: str) -> str:
    if value not in ARCHITECTURES:
        raise ValueError(f"{value!r} is not registered; allowed: {', '.join(ARCHITECTURES)}")
    return value


Arch = Annotated[
    str,
    AfterValidator(_registered),
    Field(description="a registered architecture", json_schema_extra={"enum": list(ARCHITECTURES)}),
]


def _data_source(value: str) -> str:
    """The built-in "digits", or a relative path under data/ (no `..`) to a table file or to a
    folder of images (one sub-folder per class: `is_image_folder`)."""
    if value in BUILTIN_SOURCES:
        return value
    if not value.lower().endswith(TABLE_SUFFIXES) and PurePosixPath(value).suffix:
        raise ValueError(
            f"neither a built-in source ({', '.join(BUILTIN_SOURCES)}), "
            f"a table file ({', '.join(TABLE_SUFFIXES)}) nor a folder of images (no suffix)"
        )
    posix, windows = PurePosixPath(value), PureWindowsPath(value)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
        raise ValueError(f"must be a relative path under {DATA_DIR}/, without '..'")
    if posix.parts[0] != DATA_DIR or len(posix.parts) < 2:
        raise ValueError(f"must be a path under {DATA_DIR}/ (e.g. {DATA_DIR}/raw/mydata.csv)")
    return value


def is_image_folder(source: str) -> bool:
    """A `data.source` that names a folder of images: neither built in nor a table file."""
    return source not in BUILTIN_SOURCES and not source.lower().endswith(TABLE_SUFFIXES)


DataSource = Annotated[
    str,
    AfterValidator(_data_source),
    Field(
        min_length=1,
        description='"digits" or a CSV/Parquet file or a folder of images under data/',
        # The same rule for the flow's form (JSON Schema, checked when a run is created).
        json_schema_extra={"pattern": r"^(digits|data/(?!(.*[/\\])?\.\.([/\\]|$)).+)$"},
    ),
]


def _wrong_scalar(annotation: Any, value: Any) -> tuple[Any, str] | None:
    """(the item of `value` that is not what `annotation`, a field's type, wants, and what it
    wants: "a number" or "true or false") or None when there is none.

    Pydantic's lax mode converts YAML's true/false and text ('0.3', quoted) into numbers, and
    'yes', 'on', 1 or 0.0 into bools; here they are refused, in lists, tuples and dict values
    too. A YAML int for a float field is a number and passes. Unions that also take text (a
    Literal, a str) are not judged."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):
        branches = [a for a in args if _same_shape(a, value)]
        return _wrong_scalar(branches[0], value) if len(branches) == 1 else None
    if origin in (list, tuple) and isinstance(value, list | tuple):
        items = args[:1] * len(value) if origin is list or args[-1:] == (...,) else args
        pairs = zip(items, value, strict=False)  # a tuple of the wrong length: pydantic's
        return next((w for a, v in pairs if (w := _wrong_scalar(a, v))), None)
    if origin is dict and isinstance(value, Mapping) and len(args) == 2:
        return next((w for v in value.values() if (w := _wrong_scalar(args[1], v))), None)
    if annotation is bool:
        lax = isinstance(value, int | float | str) and not isinstance(value, bool)
        return (value, "true or false") if lax else None  # null, lists: pydantic's message
    if annotation not in (int, float):
        return None
    return (value, "a number") if isinstance(value, bool | str) else None


def _same_shape(annotation: Any, value: Any) -> bool:
    """A union branch that `value` could be: a list/tuple type for a list, a dict type for a
    mapping, a number type for a scalar (no other scalar type: then text may be meant)."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    origin = get_origin(annotation)
    if isinstance(value, list | tuple):
        return origin in (list, tuple)
    if isinstance(value, Mapping):
        return origin is dict
    return annotation is not NoneType


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _scalars_are_what_they_say(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's true/false and quoted text are no numbers, and numbers and text are no
        true/false: pydantic alone would read `epochs: true` as 1, `ratios: ['0.3']` as [0.3]
        and `bf16: yes` (quoted), `resume: 1` or `hflip: 0.0` as bools."""
        if info.field_name in cls.model_fields:
            wrong = _wrong_scalar(cls.model_fields[info.field_name].annotation, value)
            if wrong is not None:
                item, wanted = wrong
                what = _kind(item)
                shown = "" if item is value else f": {item!r}"  # a scalar's is shown as 'got'
                raise ValueError(f"{wanted} is required, not {what}{shown}")
        return value


def _kind(item: Any) -> str:
    """How `_wrong_scalar`'s item reads to a user: true/false, text or a number."""
    if isinstance(item, bool):
        return "true/false"
    return "text (quoted in YAML?)" if isinstance(item, str) else "a number"


class FeatureRange(Section):
    """Columns named `{prefix}0` .. `{prefix}{count-1}`."""

    prefix: str = Field(min_length=1)
    count: int = Field(gt=0, le=MAX_COUNT)


FeatureValue = Annotated[float, Field(ge=-1e12, le=1e12, allow_inf_nan=False)]
Range = tuple[FeatureValue, FeatureValue]
Pixels = Annotated[int, Field(gt=0, le=MAX_BATCH)]
# A name for MLflow, Optuna, the registry and the bento: letters, digits, '.', '_', '-'.
DataName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][\w.-]*$")]
# Settings named after the data set (null in params.yaml): (section, key, name from data.name).
NAMED_AFTER_DATA = (
    ("register", "model_name", "{}-classifier"),
    ("tracking", "experiment", "{}"),
    ("tune", "study_name", "{}"),
)
AUTO_ARCH = "auto"  # train.model.arch / distill.model.arch: by the input's shape (Params)
LEARN = "learn"  # data.value_range learned from the training split (see pipelines/prepare.py)


class DataConfig(Section):
    name: DataName
    source: DataSource
    label_column: str = Field(min_length=1)
    features: list[str] | FeatureRange
    labels: list[int] | list[str] = Field(min_length=2)
    # The validation contract: one [low, high] for every feature, one per feature, or `learn`.
    value_range: Range | dict[str, Range] | Literal["learn"]
    image_shape: tuple[Pixels, Pixels] | None
    # Scaling inside the model, fitted on the training split; auto: standard for tabular rows,
    # none for images (their pixels are mapped from value_range to [0, 1] before the model).
    scaling: Literal["auto", "standard", "minmax", "none"]
    # Colour channels of the model input: 1 (gray) or 3 (RGB, a folder of images only).
    channels: Literal[1, 3]

    @model_validator(mode="after")
    def _image_folder(self) -> DataConfig:
        """A folder of images needs image_shape; 3 channels need a folder of images."""
        if is_image_folder(self.source) and self.image_shape is None:
            raise ValueError("image_shape: a folder of images needs [H, W] (the model's input)")
        if self.channels != 1 and not is_image_folder(self.source):
            raise ValueError("channels: 3 channels need a folder of images as data.source")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        self._check_features()
        self._check_ranges()
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels: the label set has repeated values")
        if self.image_shape is not None:
            h, w = self.image_shape
            c = self.channels
            if c * h * w != len(self.feature_columns):
                size = f"{c}x{h}x{w}={c * h * w}" if c > 1 else f"{h}x{w}={h * w}"
                count = len(self.feature_columns)
                raise ValueError(f"image_shape: {size} does not match {count} feature columns")
        return self

    def _check_features(self) -> None:
        """An explicit feature list: at least one column, each named once, blank names and the
        label column refused (a label among the features would train on the answer)."""
        if self.label_column in self.feature_columns:
            raise ValueError(
                f"features: {self.label_column!r} is the label column (data.label_column);"
                " a model cannot take its own answer as a feature"
            )
        if isinstance(self.features, FeatureRange):
            return
        if not self.features:
            raise ValueError("features: the list is empty; name the feature columns")
        blank = [i for i, name in enumerate(self.features) if not name.strip()]
        if blank:
            raise ValueError(f"features: entry {blank[0]} is a blank column name")
        repeated = sorted({name for name in self.features if self.features.count(name) > 1})
        if repeated:
            names = ", ".join(repr(name) for name in repeated)
            raise ValueError(f"features: {names} listed more than once")

    def _check_ranges(self) -> None:
        if isinstance(self.value_range, tuple):
            low, high = self.value_range
            if low > high:
                raise ValueError(f"value_range: low {low} is above high {high}")
            return
        if self.image_shape is not None:
            raise ValueError(
                "value_range: images (data.image_shape set) take one [low, high] for every "
                "pixel, not a mapping or `learn`"
            )
        if isinstance(self.value_range, dict):
            columns = self.feature_columns
            unknown = [c for c in self.value_range if c not in columns]
            missing = [c for c in columns if c not in self.value_range]
            if unknown:
                raise ValueError(f"value_range: {', '.join(unknown)}: not a feature column")
            if missing:
                raise ValueError(f"value_range: no [low, high] for {', '.join(missing)}")
            for column, (low, high) in self.value_range.items():
                if low > high:
                    raise ValueError(f"value_range.{column}: low {low} is above high {high}")

    @property
    def feature_columns(self) -> list[str]:
        if isinstance(self.features, FeatureRange):
            return [f"{self.features.prefix}{i}" for i in range(self.features.count)]
        return list(self.features)

    @property
    def model_scaling(self) -> Literal["standard", "minmax", "none"]:
        """The scaling the model applies (`auto` resolved by the input's shape)."""
        if self.scaling == "auto":
            return "none" if self.image_shape is not None else "standard"
        return self.scaling

    def ranges(self, learned: Mapping[str, Sequence[float]] | None = None) -> list[Range]:
        """[low, high] per feature column; `learned` (prepare's, from the training split) when
        value_range is `learn`. Raises ValueError when it is `learn` and `learned` is None."""
        if isinstance(self.value_range, tuple):
            return [self.value_range] * len(self.feature_columns)
        table = self.value_range if isinstance(self.value_range, dict) else learned
        if table is None:
            raise ValueError("value_range is `learn`: the ranges come from prepare's manifest")
        return [(float(table[c][0]), float(table[c][1])) for c in self.feature_columns]


class PrepareConfig(Section):
    val_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)
    seed: Seed

    @model_validator(mode="after")
    def _leaves_training_rows(self) -> PrepareConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must stay below 0.9")
        return self


class ValidateConfig(Section):
    min_rows_per_class: int = Field(ge=1, le=MAX_COUNT)
    max_class_imbalance: float = Field(ge=1.0, le=MAX_COUNT)
    max_duplicate_fraction: float = Field(ge=0.0, le=1.0)


class ModelConfig(Section):
    arch: Arch
    width: int = Field(gt=0, le=4096)
    depth: int = Field(gt=0, le=8)
    dropout: float = Field(ge=0.0, lt=1.0)
    # A local weights file to start from (a state dict, or a model file of an earlier run),
    # relative to the project root; read with torch.load(weights_only=True). None: from scratch.
    weights: str | None


Fraction = Annotated[float, Field(gt=0, le=1)]
AspectRatio = Annotated[float, Field(gt=0, le=100)]


class RandomResizedCrop(Section):
    """A random crop of `scale` x the image's area and `ratio` (width / height) resized to
    data.image_shape (torchvision's RandomResizedCrop, with its defaults)."""

    scale: tuple[Fraction, Fraction] = (0.08, 1.0)
    ratio: tuple[AspectRatio, AspectRatio] = (0.75, 4 / 3)

    @model_validator(mode="after")
    def _ordered(self) -> RandomResizedCrop:
        for key in ("scale", "ratio"):
            low, high = getattr(self, key)
            if low > high:
                raise ValueError(f"{key}: low {low} is above high {high}")
        return self


class AugmentConfig(Section):
    """Augmentations of the training images (a folder of images only; none at evaluation)."""

    random_resized_crop: RandomResizedCrop | None
    hflip: bool  # mirror left-right with probability 0.5

    @property
    def active(self) -> bool:
        return self.random_resized_crop is not None or self.hflip


class TrainConfig(Section):
    model: ModelConfig
    epochs: Epochs
    batch_size: BatchSize
    lr: LearningRate
    weight_decay: float = Field(ge=0, le=10)
    scheduler: Literal["cosine", "constant"]
    patience: int = Field(gt=0, le=MAX_EPOCHS)
    # batch_size is capped at training rows // this, so a small split still gets this many
    # optimizer steps an epoch (pipelines/training/loop.py, `fitted_to`).
    min_batches_per_epoch: int = Field(ge=1, le=MAX_COUNT)
    min_delta: float = Field(ge=0, le=100)
    seed: Seed
    device: Literal["auto", "cpu", "cuda"]
    bf16: bool
    num_workers: int = Field(ge=0, le=MAX_PROCESSES)
    resume: bool
    augment: AugmentConfig


class SpaceParam(Section):
    """One dimension of the search space: a float or int range (log scale or not), or choices."""

    type: Literal["float", "int", "categorical"]
    # Bounded by the train key's own bounds (each bound and choice is checked as that key).
    low: float | None = Field(default=None, allow_inf_nan=False)
    high: float | None = Field(default=None, allow_inf_nan=False)
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
    startup_trials: int = Field(ge=0, le=MAX_COUNT)  # median: trials finished before any is pruned
    warmup_epochs: int = Field(ge=0, le=MAX_EPOCHS)  # median: epochs before a trial can be pruned
    min_epochs: int = Field(ge=1, le=MAX_EPOCHS)  # hyperband: the smallest budget a trial gets
    reduction_factor: int = Field(ge=2, le=100)  # hyperband: 1/factor of trials go on per rung


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
    trials: int = Field(gt=0, le=MAX_COUNT)
    # failed trials one worker retries in one run before it stops with an error
    max_failed_trials: int = Field(ge=0, le=1000)
    timeout_s: Seconds
    workers: int = Field(ge=1, le=MAX_PROCESSES)
    storage: Annotated[str, AfterValidator(check_storage_url)] = Field(min_length=1)
    study_name: str = Field(min_length=1)
    seed: int = Field(ge=0, le=2**32 - 1 - MAX_PROCESSES)  # worker k samples with seed + k
    sampler: Literal["tpe", "random"]
    startup_trials: int = Field(ge=0, le=MAX_COUNT)  # TPE: random trials before the model kicks in
    pruner: PrunerConfig
    metric: Literal["val_accuracy", "val_loss"]
    heartbeat_s: int = Field(ge=1, le=3600)
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
    batch_size: int = Field(gt=0, le=MAX_BATCH)
    # The absolute floor: a model below it on the test split is rejected before export, and the
    # champion gate never promotes one below it. Set per data set (chance level is 1/classes).
    min_accuracy: float = Field(ge=0, le=1)


class ExportConfig(Section):
    opset: int = Field(ge=17, le=30)
    max_batch: int = Field(gt=1, le=MAX_BATCH)
    parity_max_abs_diff: float = Field(gt=0, le=100)
    parity_min_agreement: float = Field(gt=0, le=1)


class QuantizeConfig(Section):
    calibration_samples: int = Field(gt=0, le=MAX_COUNT)
    calibration_method: Literal["minmax", "entropy", "percentile"]
    parity_min_agreement: float = Field(gt=0, le=1)


class DistillConfig(Section):
    model: ModelConfig
    temperature: float = Field(gt=0, le=100)
    alpha: float = Field(ge=0, le=1)


class PruneConfig(Section):
    """Structured (channel) pruning of the teacher (pipelines/prune.py): one family per ratio."""

    ratios: list[Annotated[float, Field(gt=0, lt=1)]]  # share of each layer's channels removed
    epochs: Epochs  # fine-tuning epochs after pruning
    lr: LearningRate  # fine-tuning learning rate
    importance: Literal["l1", "l2", "bn_scale", "lamp"]  # which channels go (lowest first)

    @field_validator("ratios")
    @classmethod
    def _distinct_names(cls, value: list[float]) -> list[float]:
        names = [prune_family(r) for r in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"two ratios make the same family {twice[0]} (percent, rounded)")
        return value


def prune_family(ratio: float) -> str:
    """The candidate family of a pruning ratio: `pruned30` for 0.3 (percent, rounded)."""
    return f"pruned{round(ratio * 100):02d}"


class ConvertConfig(Section):
    precisions: list[Literal["fp16", "int8"]]
    max_batch: int = Field(gt=0, le=MAX_BATCH)
    opt_batch: int = Field(gt=0, le=MAX_BATCH)
    workspace_mib: int = Field(gt=0, le=1_048_576)  # 1 TiB
    timeout_s: Seconds
    parity_min_agreement: float = Field(gt=0, le=1)

    @model_validator(mode="after")
    def _profile(self) -> ConvertConfig:
        if self.opt_batch > self.max_batch:
            raise ValueError(f"opt_batch {self.opt_batch} exceeds max_batch {self.max_batch}")
        return self


class SelectConfig(Section):
    policy: Literal["throughput", "p99"]
    max_accuracy_drop: float = Field(ge=0, le=1)
    serving_batch: int = Field(gt=0, le=MAX_BATCH)
    latency_iters: int = Field(gt=0, le=MAX_COUNT)
    throughput_iters: int = Field(gt=0, le=MAX_COUNT)
    threads: int = Field(ge=0, le=MAX_PROCESSES)
    # a challenger replaces the FP32 reference only with this relative lead (0.1: 10%)
    min_gain: float = Field(ge=0, le=10)
    # the cascade's disagreement bound (pipelines/cascade.py: bounded_threshold): 0 turns it off,
    # else in [0.5, 1) (below 0.5 the "upper" bound would lie below the observed rate)
    cascade_confidence: float = Field(ge=0, lt=1)

    @field_validator("cascade_confidence")
    @classmethod
    def _a_confidence_level(cls, value: float) -> float:
        if 0 < value < 0.5:
            raise ValueError(
                "must be 0 (no bound) or in [0.5, 1): below 0.5 the upper bound lies below "
                "the observed disagreement rate"
            )
        return value


class RegisterConfig(Section):
    model_name: str = Field(min_length=1)
    tolerance: float = Field(ge=0, le=1)


class TrackingConfig(Section):
    uri: Annotated[str, Field(min_length=1), AfterValidator(check_tracking_uri)]
    artifacts: str = Field(min_length=1)
    experiment: str = Field(min_length=1)
    ui_url: HttpUrl


# dvc.yaml's stage names (tests/test_cli.py checks they match): what orchestration can refer to.
STAGES = (
    "prepare", "validate", "tune", "train", "evaluate", "distill", "export", "quantize",
    "convert", "select", "prune",
)  # fmt: skip


def _stage_names(names: Any) -> Any:
    """Every name a dvc.yaml stage (`export@teacher`: a `foreach` stage's item)."""
    unknown = [name for name in names if str(name).split("@")[0] not in STAGES]
    if unknown:
        raise ValueError(
            f"not a stage: {', '.join(map(str, unknown))}; stages: {', '.join(STAGES)}"
        )
    return names


def cron_expression(value: str) -> str:
    """`value`, parsed as Prefect's CronSchedule parses it (croniter; no random/hashed fields);
    ValueError otherwise."""
    from croniter import croniter

    if not croniter.is_valid(value) or any(
        field.casefold() in ("r", "h") for field in value.split()
    ):
        raise ValueError(
            "not a cron expression (5 fields: minute hour day month weekday, e.g. '0 2 * * *')"
        )
    return value


class OrchestrationConfig(Section):
    # Stages not named get the largest timeout given.
    stage_timeout_s: Annotated[dict[str, Seconds], AfterValidator(_stage_names)] = Field(
        min_length=1
    )
    retries: int = Field(ge=0, le=10)
    retry_delay_s: float = Field(ge=0, le=3600)
    # Past its timeout a stage gets SIGTERM (training saves a checkpoint at its next step and
    # exits), then SIGKILL after this many seconds; 0: SIGKILL at once.
    stop_grace_s: float = Field(ge=0, le=3600)
    gpu_stages: Annotated[list[str], AfterValidator(_stage_names)]
    # How long a GPU stage waits for a slot of the `gpu` limit before the run fails, seconds.
    gpu_wait_s: float = Field(gt=0, le=7 * 86400)
    nightly_cron: str = Field(min_length=1)  # the `train/nightly` deployment's schedule
    timezone: str = Field(min_length=1)  # IANA name the cron is read in

    @field_validator("nightly_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        return cron_expression(value)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        return known_zone(value)


def known_zone(value: str) -> str:
    """`value` if it is an IANA time zone name; ValueError naming it otherwise."""
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
    max_latency_ms: int = Field(ge=1, le=600_000)
    trace_predictions: bool
    timeout_s: float = Field(gt=0, le=3600)
    workers: int = Field(ge=1, le=MAX_PROCESSES)
    threads: int = Field(ge=0, le=MAX_PROCESSES)
    max_rows: int = Field(ge=1, le=MAX_BATCH)
    max_body_bytes: int = Field(ge=1024, le=2**30)
    max_image_pixels: int = Field(ge=1, le=2**28)
    # The prediction log (service.py, pipelines/prediction_log.py): a sample of what is served.
    log_fraction: float = Field(ge=0, le=1)  # share of requests logged; 0: nothing written
    log_dir: Path  # relative: to the server's working directory; MLOPS_LOG_DIR replaces it
    log_max_bytes: int = Field(ge=1024, le=2**40)  # one file's size before it rotates
    log_max_files: int = Field(ge=1, le=1000)  # rotated files kept beside the current one
    batch_max_bytes: int = Field(ge=1024, le=2**34)  # a batch-scoring file's upload limit


class DeployConfig(Section):
    """The inference host's rollout policy (flows/deploy.py, inference/): read there, from the
    worker's checkout. Host facts (its serving address, its state directory) are environment
    variables of that host, not settings: see the README's "Two machines"."""

    on_new_champion: bool  # the train flow starts `deploy/on-demand` after packaging a champion
    keep_versions: int = Field(ge=1, le=100)  # bentos kept imported on the host (rollback targets)
    replicas: int = Field(ge=1, le=MAX_PROCESSES)  # `bentoml serve` processes per version
    ready_timeout_s: float = Field(gt=0, le=3600)  # start to /readyz 200, per replica
    warmup_requests: int = Field(ge=0, le=MAX_COUNT)  # sent to each replica before the checks
    golden_rows: int = Field(ge=1, le=MAX_COUNT)  # golden-set rows `select` picks (stratified)
    golden_min_accuracy: float = Field(ge=0, le=1)
    golden_min_agreement: float = Field(ge=0, le=1)  # same label as the training host's select
    canary_percent: int = Field(ge=0, le=100)  # of requests, by proxy weight; 0 skips the canary
    canary_s: float = Field(ge=0, le=86400)
    max_5xx_ratio: float = Field(ge=0, le=1)  # candidate 5xx share may exceed the stable's by this
    max_p99_ratio: float = Field(ge=1, le=100)  # candidate p99 <= this x the stable version's p99
    min_requests: int = Field(ge=0, le=MAX_COUNT)  # fewer in a window: latency not judged
    watch_s: float = Field(ge=0, le=86400)  # after promotion; a breach rolls back by itself
    poll_s: float = Field(gt=0, le=3600)  # how often canary and watch read /metrics
    drain_timeout_s: float = Field(gt=0, le=3600)  # old version: wait for in-flight requests


class MonitorConfig(Section):
    """Watching what the inference host serves (the reference profile `select` writes; the
    `monitor` flow)."""

    reference_rows: int = Field(ge=1, le=MAX_COUNT)  # training-split rows in the reference profile
    window_rows: int = Field(ge=2, le=MAX_COUNT)  # newest logged rows the flow judges at once
    min_rows: int = Field(ge=2, le=MAX_COUNT)  # fewer logged rows: not judged
    drift_alpha: float = Field(gt=0, lt=1)  # per-feature K-S test level
    drift_threshold: float = Field(ge=0, le=1)  # share of drifting features that is drift
    min_accuracy: float = Field(ge=0, le=1)  # production accuracy (with feedback) floor
    min_feedback_rows: int = Field(ge=1, le=MAX_COUNT)  # fewer labelled rows: accuracy not judged
    schedule: str | None  # cron of `monitor/scheduled` in orchestration.timezone; None: no schedule

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return None if value is None else cron_expression(value)

    @model_validator(mode="after")
    def _window_holds_min_rows(self) -> MonitorConfig:
        if self.min_rows > self.window_rows:
            raise ValueError(
                f"min_rows ({self.min_rows}) > window_rows ({self.window_rows}): no window"
                " could ever be judged"
            )
        return self


Core = Annotated[int, Field(ge=0, le=4095)]  # a CPU number, as os.sched_setaffinity takes it


def _some_cores(cores: list[int]) -> list[int]:
    """A core list with at least one core: os.sched_setaffinity refuses an empty set (OSError at
    train start). Cores this host lacks are checked where the host is known, at train start
    (pipelines/host.py: training_cpus)."""
    if not cores:
        raise ValueError("an empty list: give at least one core number (e.g. [0])")
    return cores


Cores = Annotated[list[Core], AfterValidator(_some_cores)]
WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def _window(value: str) -> str:
    if not WINDOW.match(value) or value[:5] == value[6:]:
        raise ValueError(f"{value!r} is not a window; expected HH:MM-HH:MM (e.g. 22:00-06:00)")
    return value


Window = Annotated[str, AfterValidator(_window)]


class TrainingShare(Section):
    """What training may use in shared mode (pipelines/host.py applies it to the training
    process): its cores, torch threads at full and at throttled share, CPU and I/O priority,
    its cgroup v2 weights (where writable) and on CUDA its GPU memory fraction."""

    # affinity (at least one core); None: every core not in host.service.cpus
    cpus: Cores | None
    threads: int | None = Field(ge=1, le=MAX_PROCESSES)  # torch threads at full; None: one a core
    throttled_threads: int = Field(ge=1, le=MAX_PROCESSES)  # torch threads when throttled
    # Throttled: the share of wall time training steps (sleeps after a step for the rest).
    throttled_duty: float = Field(gt=0, le=1)
    nice: int = Field(ge=0, le=19)  # added niceness (0: unchanged)
    ionice: Literal["idle", "best-effort", "none"]
    cpu_weight: int = Field(ge=1, le=10_000)  # cgroup v2 cpu.weight (the service's: 100)
    io_weight: int = Field(ge=1, le=10_000)  # cgroup v2 io.weight
    gpu_memory_fraction: float = Field(gt=0, le=1)  # torch.cuda.set_per_process_memory_fraction
    # Linux: training also runs on host.service.cpus, the whole training process at SCHED_IDLE
    # (it gets a core only when nothing else wants it, and any normal task preempts it at once),
    # so it borrows the cycles the service leaves idle (niceness means nothing at SCHED_IDLE).
    borrow_idle: bool


class ServiceReserve(Section):
    """What is kept for the service: training never gets these cores."""

    cpus: Cores  # at least one: the service runs on them
    memory_mib: int = Field(ge=0, le=16_777_216)  # checked against free memory at start (warns)


class Slo(Section):
    """The local service's objective, read from its Prometheus /metrics every host.poll_ms."""

    metrics_url: HttpUrl
    p99_ms: float = Field(gt=0, le=600_000)  # p99 latency over the last window_s
    max_in_flight: int = Field(ge=1, le=MAX_COUNT)  # bentoml_service_request_in_progress
    # The p99 is over the requests of the last window_s (read every poll; 0: since the previous
    # poll). A window holding a few hundred requests makes it a p99, not the slowest one.
    window_s: float = Field(ge=0, le=3600)


class HostConfig(Section):
    """One host for training and serving (pipelines/host.py). dedicated: training runs as if
    alone (nothing below applies). shared: training gets `training`'s share, pauses at its next
    optimizer step when the service is over its `slo`, and resumes once both figures stayed below
    `resume_below` x the SLO for `resume_after_s`; outside `windows` it waits or is throttled."""

    mode: Literal["dedicated", "shared"]
    training: TrainingShare
    service: ServiceReserve
    slo: Slo
    on_breach: Literal["pause", "throttle"]  # what an SLO breach does to training
    poll_ms: int = Field(ge=10, le=3_600_000)
    resume_below: float = Field(gt=0, lt=1)
    resume_after_s: float = Field(ge=0, le=86_400)
    # After a pause: straight back to full share (full), or first at the throttled share for
    # another resume_after_s below resume_below (throttle: a step up, each resume costs less).
    resume_via: Literal["full", "throttle"]
    windows: list[Window]  # off-peak hours (HH:MM-HH:MM, may wrap midnight); [] = always
    timezone: str = Field(min_length=1)
    outside_window: Literal["wait", "throttle"]

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        return known_zone(value)

    @model_validator(mode="after")
    def _disjoint(self) -> HostConfig:
        shared = set(self.training.cpus or ()) & set(self.service.cpus)
        if shared:
            cores = ", ".join(map(str, sorted(shared)))
            raise ValueError(f"training.cpus: cores {cores} are reserved for the service")
        threads = self.training.threads
        if threads is not None and self.training.throttled_threads > threads:
            raise ValueError("training.throttled_threads: more than training.threads")
        return self


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
    deploy: DeployConfig
    monitor: MonitorConfig
    host: HostConfig
    prune: PruneConfig

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _derived(cls, raw: Any) -> Any:
        """Resolved before the sections validate: `arch: auto` in train.model and distill.model
        (tabular rows -> mlp, images -> cnn, by data.image_shape) and the names that are null
        (NAMED_AFTER_DATA: from data.name, e.g. digits -> digits-classifier)."""
        if not isinstance(raw, Mapping) or not isinstance(raw.get("data"), Mapping):
            return raw
        data, raw = raw["data"], dict(raw)
        for section in ("train", "distill"):
            part = raw.get(section)
            model = part.get("model") if isinstance(part, Mapping) else None
            if isinstance(model, Mapping) and model.get("arch") == AUTO_ARCH:
                arch = "mlp" if data.get("image_shape") is None else "cnn"
                raw[section] = {**part, "model": {**model, "arch": arch}}
        name = data.get("name")
        for section, key, pattern in NAMED_AFTER_DATA:
            part = raw.get(section)
            if isinstance(name, str) and isinstance(part, Mapping) and part.get(key, "") is None:
                raw[section] = {**part, key: pattern.format(name)}
        return raw

    @model_validator(mode="after")
    def _compatible(self) -> Params:
        """Settings of different sections that cannot work together: all reported at once."""
        problems = [
            *arch_problems("train.model.arch", self.train.model.arch, self.data),
            *arch_problems("distill.model.arch", self.distill.model.arch, self.data),
            *augment_problems(self),
            *space_problems(self),
            *batch_problems(self),
        ]
        if problems:
            raise ValueError("\n  ".join(problems))
        return self


def arch_problems(key: str, arch: str, data: DataConfig) -> list[str]:
    """An architecture that takes images needs `data.image_shape` (rows reshaped to images)."""
    if arch in IMAGE_INPUT and data.image_shape is None:
        flat = ", ".join(a for a in ARCHITECTURES if a not in IMAGE_INPUT)
        return [
            f"{key}: {arch!r} takes images but data.image_shape is null (tabular rows); "
            f"set data.image_shape to [H, W] or use {flat}"
        ]
    return []


def augment_problems(params: Params) -> list[str]:
    """Augmentations transform image files: they need a folder of images as data.source."""
    if params.train.augment.active and not is_image_folder(params.data.source):
        return [
            "train.augment: augmentations need a folder of images as data.source "
            f"(got {params.data.source!r}); remove them or set them to null/false"
        ]
    return []


def space_problems(params: Params) -> list[str]:
    """Every bound and choice of `tune.space` must be a value its train key accepts, and one
    that works with the other sections (e.g. a cnn choice with tabular data)."""
    base = params.train.model_dump(mode="json")
    problems = []
    for key, dim in params.tune.space.items():
        if dim.type == "categorical":
            candidates = list(dim.choices or [])
        else:
            cast = int if dim.type == "int" else float
            candidates = [cast(b) for b in (dim.low, dim.high) if b is not None]
        for value in candidates:
            name = f"tune.space.{key}"
            raw = apply_overrides({"train": base}, {key: value})["train"]
            try:
                train = TrainConfig.model_validate(raw)
            except ValidationError as exc:
                why = "; ".join(_describe(e, raw, ("train",)) for e in exc.errors())
                problems.append(f"{name}: {value!r} is not allowed ({why})")
                continue
            if train.model.arch != params.train.model.arch:  # train's own arch: checked above
                found = arch_problems("train.model.arch", train.model.arch, params.data)
                problems += [f"{name}: {value!r} cannot work: {p}" for p in found]
    return problems


def batch_problems(params: Params) -> list[str]:
    """Batches that exceed the exported model's batch axis (or the TensorRT profile)."""
    limit = params.export.max_batch
    sizes = {
        "select.serving_batch": params.select.serving_batch,
        "serve.max_rows": params.serve.max_rows,
        "serve.max_batch_size": params.serve.max_batch_size,
    }
    problems = [
        f"{key}: {size} exceeds export.max_batch {limit} (the model's largest batch)"
        for key, size in sizes.items()
        if size > limit
    ]
    serving, profile = params.select.serving_batch, params.convert.max_batch
    if params.convert.precisions and serving > profile:
        problems.append(
            f"select.serving_batch: {serving} exceeds convert.max_batch {profile} "
            "(the TensorRT plans' largest batch)"
        )
    return problems


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (YAML 1.1) that also reads YAML 1.2's floats without a dot (`1e-3`)
    as numbers: 1.1 reads them as text, which the params models refuse (`_wrong_scalar`), while
    YAML 1.2 tools (and users) mean a number. Quoted scalars stay text."""


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_params(
    path: Path | str = DEFAULT_PARAMS, overrides: Mapping[str, Any] | None = None
) -> Params:
    """Read `path`, apply `overrides` (nested or dotted keys), validate everything once."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=ParamsLoader)  # a SafeLoader
    except FileNotFoundError as exc:
        raise ParamsError(f"{path}: no such params file") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return validate_params(apply_overrides(raw, overrides or {}), source=str(path))


def validate_params(raw: Mapping[str, Any], source: str = "params") -> Params:
    """`raw` as `Params`; a `ParamsError` whose first line names the first problem
    (`<source>: invalid parameters: train.lr: ...`), one more line per further problem."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        errors = _matched_branches(exc.errors())
        lines = [line for error in errors for line in _describe(error, raw).split("\n  ")]
        raise ParamsError(f"{source}: invalid parameters: " + "\n  ".join(lines)) from None


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


def _matched_branches(errors: list[Any]) -> list[Any]:
    """Of a union's errors (`features`: a list or a {prefix, count}), drop the shape mismatch of
    the branch the value does not have when another branch reports something deeper."""
    keys = [_key_parts(error["loc"]) for error in errors]
    return [
        error
        for error, key in zip(errors, keys, strict=True)
        if not error["type"].endswith("_type")
        or not any(len(other) > len(key) and other[: len(key)] == key for other in keys)
    ]


def _key_parts(loc: tuple[Any, ...]) -> list[str]:
    """The params.yaml key of an error location, without pydantic's union member tags."""
    branches = {model.__name__ for model in Section.__subclasses__()}
    return [
        str(part)
        for part in loc
        if not str(part).startswith(("list[", "tuple[")) and str(part) not in branches
    ]


def _describe(error: Any, raw: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> str:
    loc = _key_parts((*prefix, *error["loc"]))
    key = ".".join(loc)
    if error["type"] == "value_error":
        message = str(error["msg"]).removeprefix("Value error, ")
        if not loc:  # a check across sections: the message names its keys
            return message
        error = {**error, "msg": message}
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        return f"{key}: unknown key; allowed keys here: {', '.join(allowed)}"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    got = error.get("input")
    if isinstance(got, str) and "://" in got:  # a URL: never echo its password
        got = re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", got)
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


# --- environment variables --------------------------------------------------------------------
# Host facts and hand-offs between processes; every tunable value lives in params.yaml instead.
# Not here: the inference host's own variables (inference/settings.py: MLOPS_SERVING_*,
# MLOPS_SUPERVISORD, MLOPS_NGINX) and those that libraries read themselves (PREFECT_*, the MLflow
# client's MLFLOW_* credentials, CUDA_VISIBLE_DEVICES, torchrun's RANK / WORLD_SIZE / LOCAL_RANK).

# MLflow's rule for a run id (mlflow.utils.validation's, in ASCII; not imported: MLflow is heavy
# and the serving image has none)
RunId = Annotated[str, Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_-]{0,255}$")]


class Environment(BaseModel):
    """The environment variables the project reads itself: one field per variable, its
    `validation_alias` the variable's name (`Environment.name`). Read them with `environment()`;
    an empty value counts as unset. A process that starts another hands values on with
    `Environment(field=...).exported()`."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True)

    tracking_uri: str | None = Field(
        default=None,
        validation_alias="MLFLOW_TRACKING_URI",
        description="Set by the user or a worker's host: replaces params.yaml's tracking.uri "
        "(MLflow's client reads it too).",
    )
    parent_run_id: RunId | None = Field(
        default=None,
        validation_alias="MLOPS_PARENT_RUN_ID",
        description="Set by the train flow (or a user around `dvc repro`) for every stage "
        "process: the MLflow parent run its stage runs nest under (pipelines/tracking.py).",
    )
    dvc_experiment: str | None = Field(
        default=None,
        validation_alias="DVC_EXP_NAME",
        description="Set by `dvc exp run` for every stage command: its stages share one "
        "parent run named after the experiment.",
    )
    dvc_baseline: str = Field(
        default="",
        validation_alias="DVC_EXP_BASELINE_REV",
        description="Set by `dvc exp run` with DVC_EXP_NAME: the commit the experiment is on.",
    )
    tune_storage: str | None = Field(
        default=None,
        validation_alias="MLOPS_TUNE_STORAGE",
        description="Set by the user (a PostgreSQL URL shared by tuning hosts) or by the tune "
        "stage for its workers: replaces params.yaml's tune.storage.",
    )
    tune_run_id: RunId | None = Field(
        default=None,
        validation_alias="MLOPS_TUNE_RUN_ID",
        description="Set by the tune stage for its worker processes: the MLflow run their "
        "trials nest under.",
    )
    project_dir: Path | None = Field(
        default=None,
        validation_alias="MLOPS_PROJECT_DIR",
        description="Set on each training host (its worker's environment): the checkout the "
        "train and tune-worker flows run in (flows/deployments.py).",
    )
    pushgateway_url: Annotated[str, AfterValidator(check_gateway_url)] | None = Field(
        default=None,
        validation_alias="MLOPS_PUSHGATEWAY_URL",
        description="Set on the inference host (its worker's environment): the Prometheus "
        "Pushgateway the `monitor` flow pushes its gauges to (flows/monitor.py); unset: none.",
    )
    model_tag: str | None = Field(
        default=None,
        validation_alias="MLOPS_MODEL_TAG",
        description="Set by `flows.package` for `bentoml build` and by the inference host for "
        "each replica: the BentoML model service.py serves (default <register.model_name>:latest).",
    )
    serve_overrides: Json[dict[str, Any]] = Field(
        default_factory=dict,
        validation_alias="MLOPS_SERVE_OVERRIDES",
        description="Set by the user or a benchmark: a JSON object of `serve` keys for one "
        'service run, e.g. {"max_batch_size": 64}.',
    )
    trt_cache: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "mlops-trt",
        validation_alias="MLOPS_TRT_CACHE",
        description="Set by the user: where service.py caches TensorRT plans.",
    )
    log_dir: Path | None = Field(
        default=None,
        validation_alias="MLOPS_LOG_DIR",
        description="Set by the inference host for each version's replicas (or by the user): "
        "the service's prediction and feedback log directory; replaces serve.log_dir.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        validation_alias="MLOPS_API_KEY",
        description="Set on the serving host: the key /predict, /predict_image and /metadata "
        "ask for (unset: no key).",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _tracking(cls, uri: str | None) -> str | None:
        return None if uri is None else check_tracking_uri(uri)

    @field_validator("tune_storage")
    @classmethod
    def _storage(cls, url: str | None) -> str | None:
        """Checked where a study can be opened. The lean bento has no SQLAlchemy and never opens
        a study: a serving process on a shared host that has this variable set must start."""
        import importlib.util

        if url is None or importlib.util.find_spec("sqlalchemy") is None:
            return url
        return check_storage_url(url)

    @classmethod
    def name(cls, field: str) -> str:
        """The variable behind `field` ("parent_run_id" -> "MLOPS_PARENT_RUN_ID")."""
        return str(cls.model_fields[field].validation_alias)

    def exported(self) -> dict[str, str]:
        """The fields given to this instance as environment variables for a child process
        (None -> "", which the child reads as unset)."""
        given = [name for name in type(self).model_fields if name in self.model_fields_set]
        return {self.name(name): _env_text(getattr(self, name)) for name in given}


def _env_text(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return json.dumps(value)
    return "" if value is None else str(value)


def environment(env: Mapping[str, str] | None = None) -> Environment:
    """The project's variables from `env` (default: os.environ, read now, not cached). Raises
    EnvironmentVariableError naming each bad variable on one line, never echoing a value (a URL
    or a key may hold a secret)."""
    env = os.environ if env is None else env
    names = [Environment.name(field) for field in Environment.model_fields]
    try:
        return Environment.model_validate({name: env[name] for name in names if env.get(name)})
    except ValidationError as exc:
        problems = [f"{e['loc'][0]}: {e['msg']}" for e in exc.errors()]
        raise EnvironmentVariableError("; ".join(problems).replace("Value error, ", "")) from None
