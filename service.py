"""The BentoML service: `bentoml serve` (from the project root, or a built bento).

It serves the BentoML model that `python -m flows.package` made from the MLflow `champion`
(an ONNX graph + its metadata). Lean by design: numpy, onnxruntime, pydantic, Pillow and the
project's numpy-level preprocessing; never torch, MLflow, Prefect, DVC or Great Expectations.

Endpoints: POST /predict (feature rows, adaptive batching), POST /predict_image (an image file),
POST /feedback (true labels for an earlier request), the batch-scoring task /score_file (a CSV
file; /score_file/submit, /status, /get: BentoML's task endpoints), GET /metadata, GET /docs.json
(the OpenAPI contract: see HttpContract), plus BentoML's /healthz, /livez, /readyz and /metrics.
Every /predict and /predict_image response carries X-Request-ID (the client's own, or a new one);
a sample of those requests (`serve.log_fraction`) goes to the prediction log (RequestLog,
pipelines/prediction_log.py). Settings come from the `serve` section of params.yaml (inside the
bento: the copy it was built with). With the
environment variable MLOPS_API_KEY set, the prediction endpoints and /metadata need
`Authorization: Bearer <key>` (or `X-API-Key: <key>`) and answer 401 otherwise.
MLOPS_SERVE_OVERRIDES (a JSON object of `serve` keys) overrides settings for one run, e.g.
'{"max_batch_size": 64}' to switch adaptive batching on (benchmarks/serve_load.py does).
"""

import asyncio
import csv
import functools
import gc
import hmac
import io
import json
import logging
import re
import shutil
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, NotFound
from bentoml.validators import ContentType
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipelines import runtime
from pipelines.cascade import STUDENT, TEACHER, Cascade, read_cascade
from pipelines.config import (
    Environment,
    Params,
    ServeConfig,
    apply_overrides,
    environment,
    load_params,
    validate_params,
)
from pipelines.errors import EnvironmentVariableError, PipelineError
from pipelines.prediction_log import PredictionLog
from pipelines.preprocessing import ImageError, feature_ranges, image_to_rows, to_model_input
from pipelines.reference import image_statistics, is_image_model, profile_columns

ROOT = Path(__file__).resolve().parent
# Read at import because BentoML's decorators take them when the class is defined: workers,
# threads, `traffic.timeout`, the batching settings of `predict`, and the model tag that
# `bentoml build` packs. Everything else (the model, its contract, the API key) is read when the
# service starts, and lives on the instance.
OVERRIDES_ENV = Environment.name("serve_overrides")
# Exit status for settings refused at import: pipelines.cli.EXIT_REJECTED's value (that module is
# not in the lean bento: bentofile.yaml's `include`).
EXIT_REJECTED = 2


def import_settings(env: Mapping[str, str] | None = None) -> tuple[Environment, Params]:
    """The service's environment (MLOPS_SERVE_OVERRIDES, MLOPS_MODEL_TAG, ...: `env`, default
    os.environ) and params.yaml with the overrides applied. Raises EnvironmentVariableError
    naming the variable (and the key: `MLOPS_SERVE_OVERRIDES: invalid parameters: serve.max_rows:
    ...`) for a bad variable or an override params.yaml's checks refuse; ParamsError naming
    params.yaml for params.yaml's own errors."""
    found = environment(env)
    params = load_params(ROOT / "params.yaml")  # its own errors name params.yaml
    if not found.serve_overrides:
        return found, params
    overrides = {f"serve.{key}": value for key, value in found.serve_overrides.items()}
    try:
        merged = apply_overrides(params.model_dump(by_alias=True), overrides)
        return found, validate_params(merged, source=OVERRIDES_ENV)
    except PipelineError as exc:  # ParamsError: the override's key and what is wrong with it
        message = str(exc) if str(exc).startswith(OVERRIDES_ENV) else f"{OVERRIDES_ENV}: {exc}"
        raise EnvironmentVariableError(message) from None


try:
    AT_IMPORT, PARAMS = import_settings()
except PipelineError as exc:
    # Raised here, `bentoml serve` (which imports this module in its CLI process before it starts
    # a worker) would print ~60 lines of traceback and exit 1: one line and EXIT_REJECTED instead,
    # like the stage CLIs (pipelines/cli.py).
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(EXIT_REJECTED)
SERVE: ServeConfig = PARAMS.serve
# Adaptive batching only with a max batch over 1: otherwise each request is one model call, with no
# BentoML dispatcher in between (see `serve.max_batch_size` in params.yaml for when that pays).
BATCHING = SERVE.max_batch_size > 1
LARGEST_CALL = SERVE.max_batch_size if BATCHING else SERVE.max_rows  # rows in one model call
MODEL_TAG = AT_IMPORT.model_tag or f"{PARAMS.register_.model_name}:latest"
API_KEY_ENV = Environment.name("api_key")
# Bounds (s) of BentoML's request-duration histogram (`bentoml_service_request_duration_seconds`).
# Its default buckets (5, 10, 25, 50, 100 ms, ...) cannot tell a 7 ms p99 from a 9 ms one, and an
# SLO or a canary judged on p99 needs to: 0.5 ms to 1.9 s in steps of 25% (a quantile interpolated
# inside one is within ~11% of the true one), then long-call bounds to 120 s. 45 bounds, set
# through BentoML's documented `metrics.duration.buckets`; shared-host controllers
# (pipelines/host.py) and rollout checks (inference/metrics.py) read them. Every bound costs every
# /metrics read (prometheus_client's multiprocess collector, in the service's process): measured
# (benchmarks/shared_host.py's service, idle, median of 40): 16 ms a read with 76 bounds 15% apart,
# 5.8 ms with these; a reader every 0.5 s of the 16 ms kind doubled the service's p99 at half load.
LATENCY_BUCKETS_S = [float(f"{0.0005 * 1.25**i:.4g}") for i in range(38)]
LATENCY_BUCKETS_S += [2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0]
BATCH = "/score_file"  # the batch-scoring task and its /submit, /status, /get, ... routes
PROTECTED = ("/predict", "/predict_image", "/metadata", "/feedback")  # and everything under BATCH
log = logging.getLogger("mlops.service")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class OneLineClientErrors(logging.Filter):
    """BentoML logs a full traceback for every rejected request (a 4xx, or a 503 when it sheds
    load): keep those to one line without the traceback, so bad input cannot flood the log.
    Server errors (5xx other than shedding) keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        status = getattr(getattr(exc, "error_code", None), "value", None)
        if exc is not None and (type(exc).__name__ == "ValidationError" or status in CLIENT_SIDE):
            record.msg = f"{record.msg}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


CLIENT_SIDE = {*range(400, 500), 503}
BENTOML_REQUEST_LOG = "bentoml._internal.server.http_app"  # the logger's name, not an import


def one_line_client_errors() -> None:
    """Install OneLineClientErrors on BentoML's request logger (once per process)."""
    logger = logging.getLogger(BENTOML_REQUEST_LOG)
    if not any(isinstance(f, OneLineClientErrors) for f in logger.filters):
        logger.addFilter(OneLineClientErrors())


@dataclass(frozen=True)
class RowContract:
    """What a valid row is for one model: its feature count and each feature's legal [low, high]
    (`preprocessing.feature_columns`, and `feature_ranges` or the one `value_range`, of the
    model's metadata.json: what `validate` checked the training data against), the request
    limit `serve.max_rows`, and the feature columns' names (empty when the metadata has none)."""

    features: int
    low: tuple[float, ...]  # per feature
    high: tuple[float, ...]
    max_rows: int
    columns: tuple[str, ...] = ()
    # `low` and `high` as float64 arrays, made once: converting the tuples per request cost
    # ~130 us of a 1,024-feature request's ~210 us of checks (profiled, issue 15).
    bounds: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        arrays = (np.asarray(self.low, np.float64), np.asarray(self.high, np.float64))
        object.__setattr__(self, "bounds", arrays)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], max_rows: int) -> "RowContract":
        ranges = feature_ranges(spec)
        low, high = (tuple(r[k] for r in ranges) for k in (0, 1))
        names = tuple(str(c) for c in spec.get("feature_columns") or ())
        return cls(len(ranges), low, high, max_rows, names if len(names) == len(ranges) else ())

    def feature(self, j: int) -> str:
        """`feature j`, with the column's name when the model's metadata has it."""
        return f"feature {j} ({self.columns[j]!r})" if self.columns else f"feature {j}"


METADATA = "metadata.json"


class ModelFileError(PipelineError, ValueError):
    """A file of the served model's folder (metadata.json, model.onnx, the cascade's student)
    is unreadable or does not fit the others (labels vs the graph's outputs, the row contract vs
    the graph's input); the message names the file. Defined here: the lean bento has no
    inference/ package."""


class Preprocessing(BaseModel):
    """The `preprocessing` keys of metadata.json the service reads (the spec
    pipelines.preprocessing.make_spec writes); other keys are kept, unread here."""

    model_config = ConfigDict(extra="allow")

    feature_columns: list[Any] = Field(min_length=1)
    value_range: tuple[float, float] | None = None
    feature_ranges: list[tuple[float, float]] | None = None
    input_shape: list[Annotated[StrictInt, Field(ge=1)]] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> "Preprocessing":
        features = len(self.feature_columns)
        if self.feature_ranges is None and self.value_range is None:
            raise ValueError("neither feature_ranges nor value_range: no legal range per feature")
        if self.feature_ranges is not None and len(self.feature_ranges) != features:
            raise ValueError(
                f"{len(self.feature_ranges)} feature_ranges for {features} feature_columns"
            )
        if int(np.prod(self.input_shape)) != features:
            raise ValueError(
                f"input_shape {self.input_shape} holds {int(np.prod(self.input_shape))} values, "
                f"not the {features} of feature_columns"
            )
        return self


def unique_labels(labels: list[int | str]) -> list[int | str]:
    """The labels, refused when one appears twice (a prediction could not tell them apart)."""
    twice = sorted({repr(label) for label in labels if labels.count(label) > 1})
    if twice:
        raise ValueError(f"repeated: {', '.join(twice)}")
    return labels


class ModelMetadata(BaseModel):
    """The keys of a model's metadata.json the service reads (the export stage writes it into
    the graph: pipelines.runtime.read_metadata; `package` copies it beside the graph)."""

    model_config = ConfigDict(extra="allow")

    labels: Annotated[
        list[StrictInt | StrictStr], Field(min_length=1), AfterValidator(unique_labels)
    ]
    preprocessing: Preprocessing


def read_model_metadata(model_dir: Path) -> dict[str, Any]:
    """`model_dir`/metadata.json as a dict, checked against ModelMetadata. Raises ModelFileError,
    one line naming the file and what is wrong: missing, not JSON, not an object, or the first
    key that is missing or of the wrong kind (`labels: ...`, `preprocessing.input_shape: ...`)."""
    path = model_dir / METADATA
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{path}: missing from the model folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelFileError(f"{path}: a JSON object expected, got {type(raw).__name__}")
    try:
        ModelMetadata.model_validate(raw)
    except ValidationError as exc:
        first, more = exc.errors()[0], len(exc.errors()) - 1
        what = "missing" if first["type"] == "missing" else first["msg"]
        also = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
        message = f"{path}: {metadata_key(first['loc'])}: {what}{also}"
        raise ModelFileError(message.replace("Value error, ", "")) from None
    return raw


def metadata_key(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as the key a user finds in the file: ("labels", 3, "int") ->
    labels[3], ("preprocessing", "input_shape") -> preprocessing.input_shape."""
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif part not in ("int", "str"):  # the union member pydantic tried: not a key
            key += f".{part}" if key else part
    return key


def check_graph(
    path: Path, engine: Any, contract: RowContract, spec: dict[str, Any], labels: int
) -> None:
    """Run one row (every feature at its low end) through `engine` (the graph at `path`, on any
    engine): it must take metadata.json's input (`preprocessing.input_shape`, the row contract's
    features) and give one score per label, (1, `labels`). Raises ModelFileError naming `path`
    otherwise: a graph whose outputs do not match the labels would answer with an IndexError
    (fewer outputs) or silently wrong labels (more labels than outputs)."""
    x = to_model_input(np.asarray([contract.low], np.float32), spec)
    try:
        out = np.asarray(engine(x))
    except Exception as exc:  # ONNX Runtime's / TensorRT's own types: re-raised naming the file
        reason = " ".join(str(exc).split())
        raise ModelFileError(
            f"{path}: fails on one row of metadata.json's input {list(x.shape)} "
            f"({contract.features} features): {reason}"
        ) from None
    if out.shape != (1, labels):
        raise ModelFileError(
            f"{path}: gives outputs of shape {list(out.shape)} for one row, but metadata.json "
            f"has {labels} labels: expected [1, {labels}]"
        )


def check_rows(rows: list[list[float]], contract: RowContract) -> list[list[float]]:
    """Request-level checks that pydantic's types cannot express; ValueError naming the problem
    (BentoML answers it as a 400 validation error). Values outside the trained range are
    rejected, not clamped or flagged."""
    if not rows:
        raise ValueError("empty batch: send at least one row")
    if len(rows) > contract.max_rows:
        raise ValueError(f"{len(rows)} rows: over the limit of {contract.max_rows} per request")
    for i, row in enumerate(rows):
        if len(row) != contract.features:
            raise ValueError(f"row {i} has {len(row)} values; the model takes {contract.features}")
    x = np.asarray(rows, dtype=np.float64)
    low, high = contract.bounds
    outside = (x < low) | (x > high)
    if outside.any():
        i, j = (int(k) for k in np.argwhere(outside)[0])
        raise ValueError(
            f"row {i}, {contract.feature(j)}: {x[i, j]:g} is outside the trained range "
            f"[{low[j]:g}, {high[j]:g}] ({int(outside.sum())} such values)"
        )
    return rows


def served_rows(rows: list[list[float]]) -> list[list[float]]:
    """check_rows against the running service's model (`bentoml.get_current_service()`, the
    instance BentoML made at start-up). Runs in the API's input model, once per request, before
    adaptive batching merges requests, so each request's limits are its own."""
    return check_rows(rows, bentoml.get_current_service().contract)


FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Rows = Annotated[list[list[FiniteNumber]], AfterValidator(served_rows)]


class PredictInput(BaseModel):
    """POST /predict's body: {"rows": [[...], ...]} and nothing else. A key other than `rows` is
    refused (400, its name in the error's `loc`), so a misspelt optional key is not ignored."""

    model_config = ConfigDict(extra="forbid", title="Input")

    rows: Rows


class Prediction(BaseModel):
    label: int | str
    probabilities: list[float]
    model_version: str


# The declared media type: without it BentoML works out the response's media type from the output
# model's JSON schema, generated anew for every response (40% of the request's CPU before the
# other changes here).
Predictions = Annotated[list[Prediction], ContentType("application/json")]


class OnnxEngine:
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int) -> None:
        self.session = runtime.session(path, threads=threads)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input: x})[0], dtype=np.float32)


def tune_gc() -> None:
    """Per request, BentoML leaves ~30 objects in reference cycles and a timer (for
    `traffic.timeout`) behind. With CPython's defaults (a collection every 700 new objects, an
    older one every 10 of those) the timers and in-flight objects were promoted again and again,
    and with the ~120,000 objects made at start-up, collections of 15-200 ms stalled the event loop
    (p99 ~20 ms even at one connection; reference server 4 ms). Now: start-up objects are frozen
    out of collections; young collections run every 10,000 new objects (~2 ms) and free the
    cycles; the middle generation is collected every 1,000 of those (minutes apart), since what
    reaches it (timers) dies by reference counting anyway. Measured with `wrk` at one connection:
    p99 21 -> 6 ms, GC time / 2.6; memory flat over 140,000 requests at 16 connections."""
    gc.freeze()
    gc.set_threshold(10_000, 1_000, 100)


def pick_engine(model_dir: Path, serve: ServeConfig) -> Any:
    """TensorRT when TensorRT and a GPU are here (plan cached per graph, GPU and TensorRT
    version); otherwise ONNX Runtime on the CPU with `serve.threads` intra-op threads."""
    from pipelines import tensorrt_engine  # numpy-level; TensorRT itself only when present

    onnx_path = model_dir / TEACHER
    reason = tensorrt_engine.unavailable_reason()
    if reason is not None:
        log.info("engine: ONNX Runtime (TensorRT unavailable: %s)", reason)
        return OnnxEngine(onnx_path, serve.threads)
    cache = environment().trt_cache
    key = tensorrt_engine.plan_key(onnx_path, tensorrt_engine.device_info())
    plan = cache / f"{key}-b{LARGEST_CALL}.plan"  # the plan's batch range is part of its key
    if not plan.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = plan.with_suffix(".building")
        tensorrt_engine.build_plan(onnx_path, tmp, LARGEST_CALL, min(8, LARGEST_CALL), 1024)
        shutil.move(tmp, plan)
        shutil.move(tmp.with_suffix(".json"), plan.with_suffix(".json"))
    return tensorrt_engine.predictor(plan)


def load_engines(
    model_dir: Path, serve: ServeConfig
) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """(the engine `infer` calls, the engines to check and warm up by their graph's file name in
    `model_dir`, the cascade's description or None).

    A model folder with a cascade.json (pipelines/cascade.py: `select` picked the cascade) runs
    the cascade: the student graph on ONNX Runtime (as `select` measured it), the teacher
    (model.onnx) on `pick_engine`'s engine; each answered row counts in the Prometheus counter
    `mlops_cascade_rows_total{model="student"|"teacher"}`. Otherwise `pick_engine`'s engine, as
    before. Raises pipelines.cascade.CascadeError when the cascade's files do not match."""
    teacher = pick_engine(model_dir, serve)
    spec = read_cascade(model_dir)
    if spec is None:
        return teacher, {TEACHER: teacher}, None
    student = OnnxEngine(model_dir / STUDENT, serve.threads)
    counter = cascade_counter()
    student_rows, teacher_rows = counter.labels(model="student"), counter.labels(model="teacher")

    def count(by_student: int, by_teacher: int) -> None:
        if by_student:
            student_rows.inc(by_student)
        if by_teacher:
            teacher_rows.inc(by_teacher)

    described = {
        "threshold": spec["threshold"],
        "student": {"engine": student.name, "candidate": spec.get("student_candidate")},
        "teacher": {"engine": teacher.name},
        "metric": "mlops_cascade_rows_total",
    }
    engines = {STUDENT: student, TEACHER: teacher}
    return Cascade(student, teacher, float(spec["threshold"]), count), engines, described


@functools.cache
def cascade_counter() -> Any:
    """The rows each model of a cascade answered (one counter per process: prometheus_client
    refuses a second with the same name). Made when a cascade is served, after BentoML has set
    up its multiprocess metrics directory, as BentoML's docs ask."""
    from prometheus_client import Counter

    return Counter(
        "mlops_cascade_rows", "Rows answered by each model of the cascade", labelnames=["model"]
    )


@bentoml.service(
    name=PARAMS.register_.model_name,
    workers=SERVE.workers,
    threads=max(SERVE.threads, 1),
    logging={"access": {"enabled": False}},
    # BentoML traces every request even with no exporter; see `serve.trace_predictions`.
    tracing={"excluded_urls": [] if SERVE.trace_predictions else ["/predict", "/predict_image"]},
    http={"host": "127.0.0.1"},
    traffic={"timeout": SERVE.timeout_s},
    metrics={
        "enabled": True,
        "namespace": "bentoml_service",
        "duration": {"buckets": LATENCY_BUCKETS_S},
    },
)
class Classifier:
    """One model, loaded by tag from the local BentoML store (or from inside the bento). All
    state is on the instance: the model's metadata and contract, the engine, the settings."""

    # `bentoml build` packs this model into the bento (`package` sets MLOPS_MODEL_TAG to the
    # exact tag); inside a bento, `latest` is the only model it holds.
    model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        """Load the model and warm it up. Any load error (no such model, a missing or corrupt
        model.onnx, metadata.json or cascade.json, a graph that fails its first call, a graph
        whose input or outputs do not fit metadata.json's features and labels) is kept
        in `load_error`, logged as one line naming the model folder and what is wrong, and the
        worker keeps running: /readyz answers 503 (`__is_ready__`), GET /metadata 503 with the
        reason, the prediction endpoints 503. Raising here instead would make BentoML restart
        the worker every few seconds, with a traceback each time, while /readyz hangs."""
        one_line_client_errors()
        self.serve = SERVE
        self.load_error: str | None = None
        try:
            self.load()
        except Exception as exc:  # every load error: kept, logged, served as 503
            self.load_error = load_problem(exc, getattr(self, "model_dir", None))
            log.error("model failed to load: %s", self.load_error)

    def load(self) -> None:
        """What __init__ does when it succeeds: the model's metadata, contract and engines, the
        prediction log, the warm-up."""
        try:
            stored = bentoml.models.get(MODEL_TAG)
        except NotFound:
            raise RuntimeError(
                f"no BentoML model {MODEL_TAG}: run `python -m flows.package` first "
                "(it packages the MLflow champion), or `bentoml import` a bento archive"
            ) from None
        model_dir = self.model_dir = Path(stored.path)
        self.metadata = read_model_metadata(model_dir)
        self.version = str(stored.info.metadata.get("registry_version", stored.tag.version))
        self.tag = str(stored.tag)
        self.spec = self.metadata["preprocessing"]
        self.labels: list[Any] = list(self.metadata["labels"])
        self.contract = RowContract.from_spec(self.spec, self.serve.max_rows)
        self.engine, self.engines, self.cascade = load_engines(model_dir, self.serve)
        for name, engine in self.engines.items():
            check_graph(model_dir / name, engine, self.contract, self.spec, len(self.labels))
        self.log_columns = profile_columns(self.spec)  # the log's `features` keys
        self.image_model = is_image_model(self.spec)
        self.known_labels = {(type(label), label) for label in self.labels}
        self.warm_up()
        self.prediction_log = open_prediction_log(self.serve)
        tune_gc()

    def __is_ready__(self) -> bool:
        """BentoML's readiness hook (/readyz): 503 when the model failed to load."""
        return self.load_error is None

    @bentoml.on_shutdown
    def close_prediction_log(self) -> None:
        """Write out what the prediction log still has queued (none: the model never loaded)."""
        if self.load_error is None:
            self.prediction_log.close()

    def warm_up(self) -> None:
        """Run the batch sizes requests most often have once before the first request, so they
        do not pay for a first call's allocations: every size up to WARM_EVERY_SIZE_UP_TO, then
        powers of two, and the largest call (the max batch with batching, `max_rows` without).

        Not every size up to the largest: with `max_rows` 256 that is 32,896 rows, and on a model
        whose call costs ~3 ms (benchmarks/deploy_rollout.py's `large` CNN) it held a replica's
        start at ~71 s, the bulk of a rollout's time to all traffic; these 9-24 sizes are 616
        rows."""
        start = time.perf_counter()
        row = np.asarray([self.contract.low], np.float32)
        for size in warm_up_sizes(LARGEST_CALL):
            # a cascade's both models, whatever the rows' route
            for engine in self.engines.values():
                engine(to_model_input(np.repeat(row, size, axis=0), self.spec))
        log.info("warm-up: %.0f ms", (time.perf_counter() - start) * 1000)

    def infer(self, rows: np.ndarray) -> list[dict[str, Any]]:
        """One `Prediction` (as a plain dict) per row."""
        probs = runtime.softmax(self.engine(to_model_input(rows, self.spec)))
        return [
            {"label": self.labels[k], "probabilities": p, "model_version": self.version}
            for k, p in zip(probs.argmax(axis=1).tolist(), probs.tolist(), strict=True)
        ]

    @bentoml.api(
        input_spec=PredictInput,
        batchable=BATCHING,
        max_batch_size=max(SERVE.max_batch_size, 2),  # BentoML insists on > 1 even unbatched
        max_latency_ms=SERVE.max_latency_ms,
    )
    async def predict(self, rows: Rows) -> Predictions:
        """Feature rows in, one prediction per row out (label, probabilities, model version).
        With `serve.max_batch_size` > 1, concurrent requests are merged into one model call
        (adaptive batching). `async`: the call runs on the event loop, since a thread hop costs
        more than this model's call."""
        predictions = self.infer(np.asarray(rows, dtype=np.float32))
        if BATCHING:  # BentoML splits the returned list between the requests it merged
            return [Prediction(**p) for p in predictions]
        return as_json(predictions)

    @bentoml.api
    async def predict_image(self, image: Path) -> Predictions:
        """An image file (PNG, JPEG, ...; any Pillow mode with a fixed range) through the training
        data's preprocessing. HttpContract has already checked that `image` is one uploaded file
        (BentoML itself would fetch a URL given as text)."""
        data = image.read_bytes()
        try:
            row = image_to_rows(data, self.spec, self.serve.max_image_pixels)
        except ImageError as exc:  # the error body of every other 4xx here (see ERROR_SCHEMA)
            return as_json({"error": f"image: {exc}"}, status=400)
        sample = SAMPLE.get()
        if sample is not None:  # RequestLog logs this request: its features, from the image
            sample.features = [self.row_features(row[0], image_size(data))]
        return as_json(self.infer(row))

    @bentoml.task
    def score_file(self, file: Path) -> Predictions:
        """Batch scoring: a CSV file (UTF-8, a header naming the model's feature columns; other
        columns are ignored) -> one prediction per data line, in order, as /predict answers. A
        task: POST /score_file/submit returns a task id, /score_file/status and /score_file/get
        give its state and result. A file that is not such a table fails the task (status
        `failed`) with a 400 and the error body naming the line and column. (Returned, not raised:
        BentoML 1.4 wraps a raised InvalidArgument's body in a list.)"""
        try:
            rows = read_csv_rows(file.read_bytes(), self.spec["feature_columns"], self.contract)
        except ValueError as exc:
            return as_json({"error": f"file: {exc}"}, status=400)
        x = rows.astype(np.float32)  # as /predict builds its input
        answers: list[dict[str, Any]] = []
        for start in range(0, len(x), LARGEST_CALL):
            answers.extend(self.infer(x[start : start + LARGEST_CALL]))
        return as_json(answers)

    def row_features(self, row: np.ndarray, size: tuple[int, int]) -> dict[str, float]:
        """One served row as the log's `features`: {column: value}, or for a model trained on
        image files the 4 image statistics (pipelines.reference.image_statistics) of the
        decoded row with the source image's (width, height) `size`."""
        if self.image_model:
            return image_statistics(row, self.spec["value_range"], *size)
        return dict(zip(self.log_columns, map(float, row), strict=True))

    def log_sample(self, request_id: str, path: str, sample: "Sample") -> None:
        """Queue a sampled, answered (200) request for the prediction log: the request and
        response bodies as they were sent, nothing parsed here (the writer thread splices them
        into one line, pipelines/prediction_log.py). A model trained on image files logs the 4
        image statistics of each row instead (predict_image keeps them; for /predict they are
        computed from the body here). Never raises: a body it cannot read is one log line."""
        try:
            response = b"".join(sample.response)
            if path == "/predict" and not self.image_model:
                self.prediction_log.served(
                    request_id, self.version, response, request=b"".join(sample.request)
                )
                return
            if path == "/predict":
                rows = np.asarray(json.loads(b"".join(sample.request))["rows"], np.float64)
                size = tuple(reversed(self.spec.get("image_shape") or (0, 0)))
                sample.features = [self.row_features(row, size) for row in rows]
            self.prediction_log.served(request_id, self.version, response, features=sample.features)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("prediction log: request %s not logged (%r)", request_id, exc)

    def is_label(self, value: Any) -> bool:
        """Whether `value` is one of the model's labels, type included (1 is not "1")."""
        return (type(value), value) in self.known_labels

    def describe(self) -> dict[str, Any]:
        """GET /metadata's body: the served model (`model_version` is its registry version;
        `cascade`, only when a cascade is served: its threshold and both models' engines)."""
        described = {
            "model_tag": self.tag,
            "model_version": self.version,
            "engine": self.engine.name,
            "precision": self.metadata.get("precision"),
            "input_schema": {
                "rows": "a list of rows, each a list of numbers",
                "features": self.spec["feature_columns"],
                "value_range": self.spec["value_range"],
                "feature_ranges": self.spec.get("feature_ranges"),  # per feature, or null
                "image_shape": self.spec.get("image_shape"),
                "max_rows": self.serve.max_rows,
            },
            "labels": self.labels,
            "batching": {
                "enabled": BATCHING,
                "max_batch_size": self.serve.max_batch_size,
                "max_latency_ms": self.serve.max_latency_ms,
            },
        }
        if self.cascade is not None:
            described["cascade"] = self.cascade
        return described


def open_prediction_log(serve: ServeConfig) -> PredictionLog:
    """This worker's prediction log: in MLOPS_LOG_DIR, else `serve.log_dir` (relative: to the
    working directory), files named after the worker (`bentoml.server_context.worker_index`), so
    several workers never share a file."""
    directory = environment().log_dir or serve.log_dir
    worker = int(getattr(bentoml.server_context, "worker_index", None) or 1)
    return PredictionLog(
        directory, serve.log_fraction, serve.log_max_bytes, serve.log_max_files, worker
    )


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image file from its header (the pixels are not decoded again)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return int(image.width), int(image.height)


def read_csv_rows(data: bytes, columns: list[str], contract: RowContract) -> np.ndarray:
    """A CSV file's rows as float64 (rows, features) in `columns` order. ValueError naming the
    line and column: not UTF-8, no header or a missing column, a line of the wrong length, a
    value that is no finite number or is outside the trained range (contract.low/high)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text: send a CSV file with a header line") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    missing = [c for c in columns if c not in (header or [])]
    if header is None or missing:
        raise ValueError(f"the header has no column(s) {missing[:5]} (of {len(columns)} needed)")
    where = [header.index(c) for c in columns]
    rows = []
    for line, record in enumerate(reader, start=2):
        if not record:
            continue
        if len(record) != len(header):
            raise ValueError(f"line {line}: {len(record)} fields, the header has {len(header)}")
        rows.append([record[k] for k in where])
    if not rows:
        raise ValueError("no data lines after the header")
    return checked_values(rows, columns, contract)


def checked_values(rows: list[list[str]], columns: list[str], contract: RowContract) -> np.ndarray:
    """The text cells of read_csv_rows as numbers, checked as /predict checks its rows."""
    try:
        x = np.asarray(rows, dtype=np.float64)
    except ValueError:
        for i, row in enumerate(rows):
            for j, cell in enumerate(row):
                try:
                    float(cell)
                except ValueError:
                    raise ValueError(
                        f"line {i + 2}, column {columns[j]!r}: {cell!r} is not a number"
                    ) from None
        raise
    bad = ~np.isfinite(x) | (x < contract.bounds[0]) | (x > contract.bounds[1])
    if bad.any():
        i, j = (int(k) for k in np.argwhere(bad)[0])
        raise ValueError(
            f"line {i + 2}, column {columns[j]!r}: {x[i, j]:g} is not a finite number in the "
            f"trained range [{contract.low[j]:g}, {contract.high[j]:g}] ({int(bad.sum())} such)"
        )
    return x


WARM_EVERY_SIZE_UP_TO = 16


def warm_up_sizes(largest: int) -> list[int]:
    """1..16, the powers of two above, and `largest` itself, none over `largest`: for 256,
    [1, 2, ..., 16, 32, 64, 128, 256]."""
    sizes = set(range(1, min(largest, WARM_EVERY_SIZE_UP_TO) + 1))
    power = WARM_EVERY_SIZE_UP_TO * 2
    while power < largest:
        sizes.add(power)
        power *= 2
    sizes.add(largest)
    return sorted(sizes)


def as_json(content: list[dict[str, Any]] | dict[str, Any], status: int = 200) -> Any:
    """The response body, made here: BentoML sends a returned Response as it is, while a returned
    list is validated into its output model, dumped and serialized again (12% of the request's
    CPU). Same JSON as the declared `Predictions` (or, with a 4xx, the documented error body)."""
    return Response(json.dumps(content), status, media_type="application/json")


def running_service() -> Any:
    """The Classifier instance BentoML made in this worker (`bentoml.get_current_service()`);
    None before start-up has made it, or when its model failed to load (`load_failure`)."""
    try:
        service = bentoml.get_current_service()
    except BentoMLException:
        return None
    return None if getattr(service, "load_error", None) else service


def load_failure() -> str | None:
    """Why this worker's model failed to load (Classifier.load_error), or None."""
    try:
        return getattr(bentoml.get_current_service(), "load_error", None)
    except BentoMLException:
        return None


def load_problem(exc: BaseException, model_dir: Path | None) -> str:
    """One line: the model folder (when known), what went wrong, the exception's type. The
    folder's files name themselves in most messages (ONNX Runtime's, cascade.json's)."""
    text = " ".join(str(exc).split()) or "no message"
    where = f"{model_dir}: " if model_dir is not None and str(model_dir) not in text else ""
    return f"{where}{text} ({type(exc).__name__})"


async def metadata(request: Request) -> JSONResponse:
    """GET /metadata: the running instance's `describe()`; 503 before the model is loaded."""
    service = running_service()
    if service is None:
        failure = load_failure()
        error = "model not loaded yet" if failure is None else f"model failed to load: {failure}"
        return JSONResponse({"error": error}, status_code=503)
    return JSONResponse(service.describe())


RequestId = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]


class FeedbackBody(BaseModel):
    """POST /feedback's body: the true label of each row of an earlier request, in its order."""

    model_config = ConfigDict(extra="forbid")

    request_id: RequestId
    labels: list[StrictInt | StrictStr] = Field(min_length=1, max_length=SERVE.max_rows)


async def feedback(request: Request) -> JSONResponse:
    """POST /feedback {"request_id": ..., "labels": [label per row]}: written to the feedback
    log (pipelines/prediction_log.py), to be joined with the prediction log by request id. 400
    naming the problem (a label the model does not have, a malformed body); 503 before start-up."""
    service = running_service()
    if service is None:
        return JSONResponse({"error": "model not loaded yet"}, status_code=503)
    try:
        body = FeedbackBody.model_validate_json(await request.body() or b"{}")
    except ValidationError as exc:
        first = exc.errors(include_context=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        return JSONResponse({"error": f"feedback: {where}: {first['msg']}"}, status_code=400)
    unknown = [(i, v) for i, v in enumerate(body.labels) if not service.is_label(v)]
    if unknown:
        row, value = unknown[0]
        return JSONResponse(
            {
                "error": f"feedback: labels[{row}]: unknown label {value!r}; the model's labels "
                f"are {service.labels} ({len(unknown)} unknown)"
            },
            status_code=400,
        )
    service.prediction_log.feedback(body.request_id, body.labels)
    return JSONResponse({"request_id": body.request_id, "rows": len(body.labels)})


SERVICE: Any = Classifier  # a bentoml.Service (the decorator's type hints say the class)
SERVICE.mount_asgi_app(
    Starlette(
        routes=[
            Route("/metadata", metadata, methods=["GET"]),
            Route("/feedback", feedback, methods=["POST"]),
        ]
    ),
    path="/",
)


class Sample:
    """What RequestLog keeps of a request it logs: the bodies, the status, and the features
    predict_image has derived from its image."""

    __slots__ = ("features", "request", "response", "status")

    def __init__(self) -> None:
        self.request: list[bytes] = []
        self.response: list[bytes] = []
        self.status = 0
        self.features: list[dict[str, float]] = []


SAMPLE: ContextVar[Sample | None] = ContextVar("mlops_sample", default=None)
REQUEST_ID_HEADER = b"x-request-id"
LOG_REQUEST_HEADER = b"x-log-request"  # "1": log this request whatever the sampling says
LOGGED_PATHS = {"/predict", "/predict_image"}
REQUEST_ID_RULE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestLog:
    """ASGI middleware on POST /predict and /predict_image: the request id, and the sample.

    Every response carries `X-Request-ID`: the client's own (1-128 characters of A-Z a-z 0-9 .
    _ : -; anything else is a 400), or a new one. A request is sampled with probability
    `serve.log_fraction` (or always with `X-Log-Request: 1`, e.g. by a client that will send
    feedback, unless the fraction is 0); a sampled request answered 200 is logged after its
    response is sent (`Classifier.log_sample`), read from its bodies, so the same record comes
    from DirectPredict, BentoML's dispatch and adaptive batching alike."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in LOGGED_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(REQUEST_ID_HEADER)
        request_id = uuid.uuid4().hex if given is None else given.decode("latin-1")
        if given is not None and not REQUEST_ID_RULE.fullmatch(request_id):
            error = "X-Request-ID: 1 to 128 characters of A-Z a-z 0-9 . _ : - expected"
            await send_json(send, 400, {"error": error})
            return
        id_header = (REQUEST_ID_HEADER, request_id.encode())
        service = running_service()
        if service is None or not self.sampled(service, headers):

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()), id_header]
                await send(message)

            await self.app(scope, receive, send_with_id)
            return
        sample = Sample()
        token = SAMPLE.set(sample)
        try:
            await self.app(
                scope, self.copying(receive, sample), self.keeping(send, sample, id_header)
            )
        finally:
            SAMPLE.reset(token)
        if sample.status == 200:
            service.log_sample(request_id, scope["path"], sample)

    @staticmethod
    def sampled(service: Any, headers: dict[bytes, bytes]) -> bool:
        log_: PredictionLog = service.prediction_log
        if log_.fraction > 0 and headers.get(LOG_REQUEST_HEADER) == b"1":
            return True
        return log_.sampled()

    @staticmethod
    def copying(receive: Receive, sample: Sample) -> Receive:
        async def receive_copy() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                sample.request.append(message.get("body", b""))
            return message

        return receive_copy

    @staticmethod
    def keeping(send: Send, sample: Sample, id_header: tuple[bytes, bytes]) -> Send:
        async def send_copy(message: Message) -> None:
            if message["type"] == "http.response.start":
                sample.status = int(message["status"])
                message["headers"] = [*message.get("headers", ()), id_header]
            elif message["type"] == "http.response.body":
                sample.response.append(message.get("body", b""))
            await send(message)

        return send_copy


class Guard:
    """ASGI middleware: the optional API key, the request-body limit and the body's arrival,
    before any parsing.

    A body shorter than its Content-Length, or a chunked one that stops (a client's mistake, or a
    client that stalls), on the prediction, feedback and batch endpoints (and a chunked body
    anywhere) would otherwise wait for BentoML's request timeout (`serve.timeout_s`) and get its
    504, a server error: here it is read within `body_timeout_s` (0.6 x serve.timeout_s) and a
    body that has not arrived by then gets a 408 saying how much did, at most an eighth of
    body_timeout_s later (0.675 x serve.timeout_s: before BentoML's timer, which runs from the
    request's start, upload included). A batch file must therefore arrive within 0.6 x
    serve.timeout_s: 1.2 s at the default 2 s, ~450 Mbit/s for a 64 MiB file.

    The deadline is kept by one sweeper task a process that wakes every body_timeout_s / 8 while
    bodies are being read and cancels the reads past it, not by a timer a request: measured
    in-process under uvloop (20,000 one-row /predict bodies a run, median of 9 runs, 2-core host
    with a test run beside it), Guard took 3.1 us a request without the check, 15.9 us with an
    `asyncio.timeout` around each read (~5% of a ~230 us digits request), 6.0 us with the
    sweeper."""

    def __init__(
        self,
        app: Any,
        max_body: int,
        max_batch_body: int | None = None,
        body_timeout_s: float | None = None,
    ) -> None:
        self.app = app
        self.limits = (max_body, max_batch_body or max_body)  # elsewhere, under BATCH
        self.body_timeout_s = body_timeout_s
        self.deadlines: dict[asyncio.Task[Any], float] = {}  # reads in progress: loop time
        self.expired: set[asyncio.Task[Any]] = set()  # reads the sweeper cancelled
        self.sweeper: asyncio.Task[None] | None = None
        key = environment().api_key
        self.key = key.get_secret_value() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        path = scope["path"]
        batch = path == BATCH or path.startswith(f"{BATCH}/")
        protected = path in PROTECTED or batch
        if self.key is not None and protected and not self.authorized(headers):
            await send_json(
                send, 401, {"error": f"missing or wrong API key (set by {API_KEY_ENV})"}
            )
            return
        limit = self.limits[batch]
        too_large = {"error": f"request body over {limit} bytes"}
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            # the body is not read: close, or its bytes would be read as the next request
            await send_json(send, 413, too_large, (b"connection", b"close"))
            return
        # Read here, before any parsing: a body without a Content-Length (chunked) anywhere, as
        # it must stay under the limit, and every POST body under the prediction and batch paths,
        # so that one that stalls gets its 408 rather than BentoML's 504.
        if scope["method"] in {"POST", "PUT", "PATCH"} and (length is None or protected):
            try:
                arrived = await self.read_in_time(receive, limit)
            except ClientGone:
                return  # no one to answer; the app never sees the partial body
            if arrived is None:
                await send_json(send, 413, too_large, (b"connection", b"close"))
                return
            if isinstance(arrived, int):
                announced = f"Content-Length {length.decode()} announced, " if length else ""
                error = (
                    f"request body incomplete: {announced}{arrived} bytes arrived within "
                    f"{self.body_timeout_s:g} s"
                )
                await send_json(send, 408, {"error": error}, (b"connection", b"close"))
                return
            receive = replay(arrived)
        await self.app(scope, receive, send)

    async def read_in_time(self, receive: Receive, limit: int) -> bytes | int | None:
        """The whole request body if it arrives within `body_timeout_s` (no deadline when that is
        None); None as soon as it grows over `limit` bytes; else the count of bytes that did
        arrive (int), once the sweeper has cancelled the read."""
        if self.body_timeout_s is None:
            return await read_body(receive, limit)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self.deadlines[task] = loop.time() + self.body_timeout_s
        if self.sweeper is None or self.sweeper.done():
            self.sweeper = loop.create_task(self.sweep(self.body_timeout_s / 8))
        chunks: list[bytes] = []
        try:
            return await read_body(receive, limit, into=chunks)
        except asyncio.CancelledError:
            if task not in self.expired:
                raise
            task.uncancel()
            return sum(map(len, chunks))
        finally:
            del self.deadlines[task]
            self.expired.discard(task)

    async def sweep(self, period_s: float) -> None:
        """While reads are in progress: every `period_s`, cancel those past their deadline
        (each is suspended in its `receive()`, the only await of the read). Ends when none
        is left; the next read starts it again."""
        loop = asyncio.get_running_loop()
        while self.deadlines:
            await asyncio.sleep(period_s)
            now = loop.time()
            for task, deadline in list(self.deadlines.items()):
                if deadline <= now and task not in self.expired:
                    self.expired.add(task)
                    task.cancel()

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"x-api-key", b"")
        bearer = headers.get(b"authorization", b"")
        if bearer.lower().startswith(b"bearer "):
            given = bearer[7:].strip()
        return hmac.compare_digest(given, (self.key or "").encode())


def replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


class DirectPredict:
    """ASGI middleware, only with adaptive batching off: it answers `POST /predict` itself, a
    fast path kept for its measured figure (below); with batching on, BentoML's dispatch does.

    It uses the API's own input model (`SERVICE.apis["predict"].input_spec`, built by BentoML from
    `Classifier.predict`, with the same row checks), the same `infer`, and the same bodies and
    headers as BentoML's dispatch (tests/test_serve_live.py compares both paths request by
    request). What it skips is BentoML's per-request dispatch (request context, routing, a method
    wrapper rebuilt with `inspect.signature`). HttpContract, in front, has already refused every
    media type but JSON on /predict. BentoML's metrics, tracing, timeout and concurrency
    middleware still wrap it. Measured (issue 13, in-process CPU per one-row request, best of 3 x
    400, two rounds): on the realistic model (benchmarks/model_speed.py's CNN, width 64, depth 3,
    32x32 inputs, 1.6 ms a call) 4.03-4.45 ms with it vs 4.54-5.04 ms without, so without it
    throughput is ~0.89x; `serve_load.py --model large` on a busy machine: 0.67x at saturation,
    0.94x at one connection. On the digits CNN: 0.60x without it."""

    def __init__(self, app: Any, input_model: Any) -> None:
        self.app = app
        self.input_model = input_model
        self.server = (b"server", f"BentoML Service/{SERVICE.name}".encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = running_service()
        if (
            service is None  # not loaded yet: BentoML answers as it does before start-up
            or scope["type"] != "http"
            or scope["path"] != "/predict"
            or scope["method"] != "POST"
        ):
            await self.app(scope, receive, send)
            return
        try:
            rows = self.input_model.model_validate_json(await read_body(receive) or b"{}").rows
        except ValidationError as exc:  # as BentoML answers and (with OneLineClientErrors) logs
            log.info("Exception on /predict [POST]: ValidationError: %s", str(exc).splitlines()[0])
            error = {
                "error": f"{exc.error_count()} validation error for {exc.title}",
                "detail": exc.errors(include_context=False, include_input=False),
            }
            await send_json(send, 400, error, self.server)
            return
        try:
            x = np.asarray(rows, dtype=np.float32)
            predictions = service.infer(x)
        except Exception:
            log.exception("Exception on /predict [POST]")
            error = {"error": "An unexpected error has occurred, please check the server log."}
            await send_json(send, 500, error, self.server)
            return
        await send_json(send, 200, predictions, self.server)


class ClientGone(Exception):
    """The client disconnected before its body was whole: nothing is to be run or answered."""


async def read_body(
    receive: Receive, limit: int | None = None, into: list[bytes] | None = None
) -> bytes | None:
    """The whole request body; None as soon as it grows over `limit` bytes. The chunks read so
    far are kept in `into` when given (what arrived, should the read be cancelled). Raises
    ClientGone when the client disconnects first: a body cut short must not run as if whole
    (a /feedback body short of its Content-Length was once written to the log)."""
    chunks, size = into if into is not None else [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_json(send: Send, status: int, content: Any, *headers: tuple[bytes, bytes]) -> None:
    body = json.dumps(content).encode()
    start = [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": [*start, *headers]})
    await send({"type": "http.response.body", "body": body})


JSON_TYPE = "application/json"
FORM_TYPE = "multipart/form-data"
BODY_TYPES = {"/predict": JSON_TYPE, "/predict_image": FORM_TYPE}  # what each endpoint reads
IMAGE_FIELD = "image"
FILE_FIELD = "file"  # the batch task's upload
UPLOADS = {  # what HttpContract checks: the form endpoints and their one file field
    "/predict_image": IMAGE_FIELD,
    BATCH: FILE_FIELD,
    f"{BATCH}/submit": FILE_FIELD,
}
UTF_8 = {"utf-8", "utf8", "us-ascii", "ascii"}


class HttpContract:
    """ASGI middleware, in front of both /predict paths (DirectPredict and BentoML's dispatch):
    the requests the service takes, and the OpenAPI document that says so (GET /docs.json).

    /predict takes `application/json` (UTF-8; no Content-Type is read as JSON); /predict_image
    takes `multipart/form-data` with exactly one uploaded file in the field `image` and nothing
    else. Anything else is answered here: 415 for another media type or charset, 400 naming the
    problem for a malformed multipart body or form. Never a URL: BentoML would fetch a text value
    of a file field on the server (a server-side request forgery), so only file parts pass."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/docs.json" and scope["method"] == "GET":
            await send_json(send, 200, openapi_document())
            return
        path = scope["path"]
        if (path in PROTECTED or path.startswith(BATCH)) and path != "/metadata" and load_failure():
            error = "the model failed to load; GET /metadata or the server log says why"
            await send_json(send, 503, {"error": error})
            return
        expected = FORM_TYPE if path in UPLOADS else BODY_TYPES.get(path)
        if expected is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        refused = content_type_problem(scope, expected)
        if refused is None and expected == FORM_TYPE:
            body = await read_body(receive) or b""  # Guard has bounded it
            refused = await upload_problem(scope, body, UPLOADS[path])
            receive = replay(body)
        if refused is not None:
            await send_json(send, refused[0], {"error": refused[1]})
            return
        await self.app(scope, receive, send)


def content_type(scope: Scope) -> tuple[str | None, dict[str, str]]:
    """The request's media type (lower case; None without the header) and its parameters."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            kind, *params = value.decode("latin-1").split(";")
            pairs = (p.partition("=") for p in params)
            return kind.strip().lower(), {
                k.strip().lower(): v.strip().strip('"') for k, _, v in pairs
            }
    return None, {}


def content_type_problem(scope: Scope, expected: str) -> tuple[int, str] | None:
    """(status, message) when the Content-Type is not what the endpoint reads; else None."""
    kind, params = content_type(scope)
    path = scope["path"]
    if kind is None and expected == JSON_TYPE:
        return None
    if kind != expected:
        return 415, f"Content-Type {kind or '(none)'}: {path} takes {expected}" + (
            f" with the file in the field '{UPLOADS.get(path, IMAGE_FIELD)}'"
            if expected == FORM_TYPE
            else ""
        )
    charset = params.get("charset")
    if expected == JSON_TYPE and charset is not None and charset.lower() not in UTF_8:
        return 415, f"charset {charset}: {path} reads JSON as UTF-8 (send charset=utf-8 or none)"
    boundary = params.get("boundary", "")
    if expected == FORM_TYPE and not 0 < len(boundary) <= 70:
        return 400, f"Content-Type {FORM_TYPE} needs a boundary parameter of 1 to 70 characters"
    return None


async def upload_problem(
    scope: Scope, body: bytes, field: str = IMAGE_FIELD
) -> tuple[int, str] | None:
    """(400, message) unless the multipart body holds exactly one non-empty uploaded file in
    `field` (`image`; `file` for the batch task) and no other field; else None. Parsed with
    Starlette's form parser, the one BentoML uses next, so both see the same parts."""
    boundary = content_type(scope)[1]["boundary"]
    if f"--{boundary}--".encode() not in body:
        return 400, "multipart body is cut short or malformed: no closing boundary"
    try:
        form = await Request(scope, replay(body)).form(max_files=2, max_fields=2)
    except (HTTPException, MultiPartException) as exc:
        return 400, f"malformed multipart body: {getattr(exc, 'detail', exc)}"
    try:
        items = form.multi_items()
        others = sorted({name for name, _ in items} - {field})
        files = [value for name, value in items if name == field]
        kind = "an uploaded image file" if field == IMAGE_FIELD else "an uploaded file"
        if not files:
            got = f" (got {others})" if others else ""
            return 400, f"missing the form field '{field}' ({kind}){got}"
        if others:
            return 400, f"unexpected form field(s) {others}: send only the field '{field}'"
        if len(files) > 1:
            return 400, f"field '{field}': {len(files)} values; send exactly one file"
        if not isinstance(files[0], UploadFile):
            return 400, (
                f"field '{field}' must be an uploaded file (a part with a filename), not "
                "text: URLs are not fetched"
            )
        if not files[0].size:
            return 400, f"field '{field}' is an empty file"
        return None
    finally:
        await form.close()


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "what was wrong, in one line"},
        "detail": {
            "type": "array",
            "description": "with a 400 from validation: one item per problem (pydantic's form)",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {
                        "type": "array",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    },
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}
ERRORS = {
    400: "Bad request: the body or a field is invalid (`error` names it)",
    401: "Missing or wrong API key (only when MLOPS_API_KEY is set)",
    408: "The body did not arrive whole within 0.6 x serve.timeout_s",
    413: "Request body over serve.max_body_bytes",
    415: "Unsupported Content-Type or charset",
    500: "Internal error (a bug: see the server log)",
}


def openapi_document() -> dict[str, Any]:
    """BentoML's OpenAPI document with the service's real contract: request bodies with their
    limits (rows: 1 to serve.max_rows, each of exactly the model's feature count, values in
    data.value_range; one image file), this service's error body and statuses, and the API key
    (a security scheme and 401) when one is set. Read at request time: the feature count and
    range come from the loaded model."""
    doc = json.loads(json.dumps(SERVICE.openapi_spec.asdict()))  # as served: string keys
    schemas = doc["components"]["schemas"]
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas.pop(name, None)
    schemas["Error"] = ERROR_SCHEMA
    schemas["predict__Input"] = rows_schema()
    schemas["predict_image__Input"] = image_schema()
    keyed = environment().api_key is not None
    if keyed:
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
    for path, kind in BODY_TYPES.items():
        post = doc["paths"][path]["post"]
        name = "predict__Input" if kind == JSON_TYPE else "predict_image__Input"
        post["requestBody"] = {
            "required": True,
            "content": {kind: {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        }
        post["responses"] = {
            "200": post["responses"]["200"],
            **{str(code): error_response(text) for code, text in ERRORS.items()},
        }
    described = {"description": "OK", "content": {JSON_TYPE: {"schema": {"type": "object"}}}}
    doc["paths"]["/metadata"] = {
        "get": {
            "description": "The served model: tag, version, engine, input schema, labels.",
            "responses": {"200": described, "401": error_response(ERRORS[401])},
        }
    }
    document_feedback(doc, described)
    document_batch(doc)
    batch = [path for path in doc["paths"] if path == BATCH or path.startswith(f"{BATCH}/")]
    for path in [*PROTECTED, *batch]:
        for operation in doc["paths"][path].values():
            if keyed:
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
            else:
                operation["responses"].pop("401", None)
    return doc


def document_feedback(doc: dict[str, Any], described: dict[str, Any]) -> None:
    """POST /feedback in the OpenAPI document: FeedbackBody's schema and its statuses."""
    body = FeedbackBody.model_json_schema()
    body["additionalProperties"] = False
    service = running_service()
    if service is not None:  # the labels the running model has (others are a 400)
        body["properties"]["labels"]["items"] = {"enum": service.labels}
    errors = {code: ERRORS[code] for code in (400, 401, 408, 413, 500)}
    doc["components"]["schemas"]["feedback__Input"] = body
    doc["paths"]["/feedback"] = {
        "post": {
            "description": "True labels for the rows of an earlier request (by X-Request-ID).",
            "requestBody": {
                "required": True,
                "content": {
                    JSON_TYPE: {"schema": {"$ref": "#/components/schemas/feedback__Input"}}
                },
            },
            "responses": {
                "200": described,
                **{str(code): error_response(text) for code, text in errors.items()},
            },
        }
    }


TASK_STATES = ["pending", "in_progress", "completed", "failed", "canceled"]  # as BentoML answers
TASK_ERRORS = {
    400: "No task_id, or the task has not finished (`error` says which)",
    401: ERRORS[401],
    404: "No task with this id",
    500: ERRORS[500],
}


def document_batch(doc: dict[str, Any]) -> None:
    """The batch task's routes with this service's contract: /score_file and /score_file/submit
    take one uploaded CSV file in `file` (HttpContract checks it) and answer as /predict does;
    the task routes (status, get, retry, cancel) answer this service's error body."""
    doc["components"]["schemas"]["score_file__Input"] = upload_schema(
        FILE_FIELD, "a CSV file: a header naming the model's feature columns, a row per line"
    )
    for path in (BATCH, f"{BATCH}/submit"):
        post = doc["paths"][path]["post"]
        form = {"$ref": "#/components/schemas/score_file__Input"}
        post["requestBody"] = {
            "required": True,
            "content": {
                FORM_TYPE: {"schema": form, "encoding": {FILE_FIELD: {"contentType": "text/csv"}}}
            },
        }
        post["responses"] = {
            "200": post["responses"]["200"],
            **{str(code): error_response(text) for code, text in ERRORS.items()},
        }
    # BentoML's own schema of a task's status lists other values than its server answers, and
    # requires fields that /submit and /retry do not send.
    status = doc["components"]["schemas"]["TaskStatusResponse"]
    status["properties"]["status"]["enum"] = TASK_STATES
    status["required"] = ["task_id", "status"]
    # Cancelling is not supported by `bentoml serve` (always a 400): not part of the contract.
    doc["paths"].pop(f"{BATCH}/cancel", None)
    for path in (f"{BATCH}/{route}" for route in ("status", "get", "retry")):
        for operation in doc["paths"][path].values():
            operation["responses"] = {
                "200": operation["responses"]["200"],
                **{str(code): error_response(text) for code, text in TASK_ERRORS.items()},
            }


def error_response(description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": description, "content": {JSON_TYPE: {"schema": schema}}}


def rows_schema() -> dict[str, Any]:
    """The /predict body's schema; the feature count and range are the running model's (left
    open before start-up has loaded it)."""
    service = running_service()
    value: dict[str, Any] = {"type": "number"}
    row: dict[str, Any] = {"type": "array", "items": value}
    if service is not None:
        low, high = service.contract.low, service.contract.high
        if len(set(low)) == 1 and len(set(high)) == 1:  # one range for every feature
            value.update(minimum=low[0], maximum=high[0])
        else:  # per feature (JSON Schema's prefixItems: item k has the k-th bounds)
            row["prefixItems"] = [
                {"type": "number", "minimum": lo, "maximum": hi}
                for lo, hi in zip(low, high, strict=True)
            ]
        row.update(minItems=service.contract.features, maxItems=service.contract.features)
    return {
        "type": "object",
        "title": "Input",
        "required": ["rows"],
        "properties": {
            "rows": {
                "type": "array",
                "description": "feature rows, each of the model's features in data.value_range",
                "items": row,
                "minItems": 1,
                "maxItems": SERVE.max_rows,
            }
        },
        "additionalProperties": False,
    }


def image_schema() -> dict[str, Any]:
    return upload_schema(
        IMAGE_FIELD,
        "an image file Pillow reads (PNG, JPEG, ...): 8/16-bit grayscale, RGB(A), palette, CMYK "
        "or YCbCr",
    )


def upload_schema(field: str, what: str) -> dict[str, Any]:
    """A multipart form of one uploaded file in `field` and nothing else."""
    upload = {
        "type": "string",
        "format": "binary",
        "description": f"{what}; an uploaded file part, never a URL",
    }
    return {
        "type": "object",
        "title": "Input",
        "required": [field],
        "properties": {field: upload},
        "additionalProperties": False,
    }


SERVICE.add_asgi_middleware(
    Guard,
    max_body=SERVE.max_body_bytes,
    max_batch_body=SERVE.batch_max_bytes,
    body_timeout_s=0.6 * SERVE.timeout_s,
)
SERVICE.add_asgi_middleware(RequestLog)
SERVICE.add_asgi_middleware(HttpContract)
if not BATCHING:  # the fast path's figure: see DirectPredict
    SERVICE.add_asgi_middleware(DirectPredict, input_model=SERVICE.apis["predict"].input_spec)
