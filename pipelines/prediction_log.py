"""The service's prediction log and feedback log: JSON lines in one directory, written off the
request path by the standard library's logging (a QueueHandler in the request, a QueueListener
thread writing RotatingFileHandlers), and read back here too (`read_lines`, `read_predictions`:
the one reader, used by pipelines/drift.py). Stdlib and numpy only: it runs inside the lean bento.

Files in the log directory (`serve.log_dir`, or MLOPS_LOG_DIR), one set per server worker:
- `predictions-w<worker>.jsonl` (rotated to `.1` ... `.<log_max_files>` at `log_max_bytes`): one
  object per sampled REQUEST: {"request_id", "timestamp" (ISO-8601 UTC, when it was served),
  "model_version", "request" (the /predict body as the client sent it, {"rows": [[...], ...]},
  copied byte for byte) or "features" (a list, per row {column: value}: for image-folder models
  the 4 image statistics of pipelines.reference.IMAGE_STATS), "response" (the response body as
  sent: per row {"label", "probabilities", "model_version"})}. The service neither parses nor
  encodes anything for it: the writer thread splices the two bodies into the line, and
  `read_predictions` expands a line into one record per row.
- `feedback-w<worker>.jsonl` (same rotation): one object per labelled row of POST /feedback:
  {"request_id", "row", "label", "timestamp"}.

Why bodies, not rows (issue 16's cost goal): one JSON line per served row, every feature decoded
and encoded again in the service's process, cost a logged digits request about as much CPU as
serving it (throughput at log_fraction 0.1 / 0: 0.907 on digits, 0.876 on 3,072 features).

A request is logged with probability `serve.log_fraction`; at 0 no prediction file is made.
Writing never fails a request: a full queue or disk drops records, counted, with one log line.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import math
import queue
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError

PREDICTIONS, FEEDBACK = "predictions", "feedback"
PREDICTIONS_GLOB, FEEDBACK_GLOB = "predictions*.jsonl*", "feedback*.jsonl*"
QUEUE_SIZE = 100_000  # records waiting for the writer thread; beyond: dropped and counted
log = logging.getLogger("mlops.prediction_log")


def utc_now(seconds: float | None = None) -> str:
    """`seconds` since the epoch (default: now), ISO-8601 in UTC with milliseconds (e.g.
    2026-11-30T12:00:00.123+00:00)."""
    at = datetime.now(UTC) if seconds is None else datetime.fromtimestamp(seconds, UTC)
    return at.isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class Served:
    """One sampled request as the request path hands it over: nothing parsed, nothing encoded.
    `time`: seconds since the epoch; `request`: the /predict body (JSON bytes), or `features`
    (per row {column: value}) when the service derived them; `response`: the response body."""

    request_id: str
    time: float
    model_version: str
    response: bytes
    request: bytes | None = None
    features: Sequence[dict[str, float]] | None = None

    def line(self) -> str:
        """The log line (module doc): the bodies spliced in as they are. A JSON body holds a
        line break only as whitespace (never inside a string), so it becomes a space."""
        inputs = (
            '"request":' + one_line(self.request)
            if self.request is not None
            else '"features":' + json.dumps(self.features, separators=(",", ":"))
        )
        return (
            f'{{"request_id":{json.dumps(self.request_id)},"timestamp":"{utc_now(self.time)}",'
            f'"model_version":{json.dumps(self.model_version)},{inputs},'
            f'"response":{one_line(self.response)}}}'
        )


def one_line(body: bytes) -> str:
    """A JSON body as text on one line (UTF-8; an undecodable byte becomes U+FFFD)."""
    text = body.decode("utf-8", "replace")
    if "\n" in text or "\r" in text:
        text = text.replace("\r", " ").replace("\n", " ")
    return text


class JsonLine(logging.Formatter):
    """A record whose `msg` is a Served (-> its line) or a dict (-> its JSON), on one line. The
    line is kept on the record: RotatingFileHandler formats each record twice (to size it)."""

    def format(self, record: logging.LogRecord) -> str:
        line = getattr(record, "line", None)
        if line is None:
            msg = record.msg
            line = msg.line() if isinstance(msg, Served) else json.dumps(msg, separators=(",", ":"))
            record.line = line
        return str(line)


class Dropped:
    """Counts records that could not be written; says so once per kind of failure."""

    def __init__(self) -> None:
        self.count = 0
        self.said: set[str] = set()
        self.lock = threading.Lock()

    def add(self, where: str, exc: BaseException | None) -> None:
        with self.lock:
            self.count += 1
            first = where not in self.said
            self.said.add(where)
        if first:
            log.error(
                "prediction log: %s failed (%r); records are dropped, requests go on", where, exc
            )


class Writer(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler that counts a failed write (a full disk) instead of printing a
    traceback per record."""

    def __init__(self, path: Path, max_bytes: int, max_files: int, dropped: Dropped) -> None:
        super().__init__(
            path, maxBytes=max_bytes, backupCount=max_files, encoding="utf-8", delay=True
        )
        self.setFormatter(JsonLine())
        self.dropped = dropped

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        import sys

        self.dropped.add(f"writing {self.baseFilename}", sys.exc_info()[1])


class Enqueue(logging.handlers.QueueHandler):
    """QueueHandler that hands the record over as it is (formatting happens in the writer
    thread) and counts a full queue instead of raising."""

    def __init__(self, q: queue.Queue[Any], dropped: Dropped) -> None:
        super().__init__(q)
        self.dropped = dropped

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        import sys

        self.dropped.add("queueing (writer behind)", sys.exc_info()[1])


class PredictionLog:
    """The writer of one server worker. `fraction` (serve.log_fraction) of requests are sampled
    (`sampled()`); `max_bytes` and `max_files` (serve.log_max_bytes, log_max_files) cap each file
    set at max_bytes x (max_files + 1) bytes (a single request's line larger than max_bytes is
    the only excess). Call `close()` to write out what is queued."""

    def __init__(
        self,
        directory: Path,
        fraction: float,
        max_bytes: int,
        max_files: int,
        worker: int = 1,
        seed: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.fraction = fraction
        self.random = random.Random(seed)
        self.dropped = Dropped()
        self.queue: queue.Queue[Any] = queue.Queue(QUEUE_SIZE)
        self.handler = Enqueue(self.queue, self.dropped)
        self.writers = {
            kind: Writer(
                self.directory / f"{kind}-w{worker}.jsonl", max_bytes, max_files, self.dropped
            )
            for kind in (PREDICTIONS, FEEDBACK)
        }
        for kind, writer in self.writers.items():
            writer.addFilter(logging.Filter(kind))  # records are named after their file
        self.listener = logging.handlers.QueueListener(self.queue, *self.writers.values())
        self.started = False
        self.lock = threading.Lock()

    def sampled(self) -> bool:
        """Whether to log the request now being served (probability `fraction`)."""
        return self.fraction > 0 and self.random.random() < self.fraction

    def served(
        self,
        request_id: str,
        model_version: str,
        response: bytes,
        request: bytes | None = None,
        features: Sequence[dict[str, float]] | None = None,
    ) -> None:
        """Queue one line for a served request (see the module doc and `Served`): its raw
        /predict body (`request`) or the `features` of its rows, and its raw response body.
        Returns at once; the writer thread makes the line."""
        if (request is None) == (features is None):
            raise ValueError("served: give the request body or the features, one of the two")
        self.emit(
            PREDICTIONS,
            Served(request_id, time.time(), model_version, response, request, features),
        )

    def feedback(self, request_id: str, labels: Sequence[Any]) -> None:
        """Queue one line per labelled row of a request (see the module doc); returns at once."""
        timestamp = utc_now()
        for row, label in enumerate(labels):
            line = {"request_id": request_id, "row": row, "label": label, "timestamp": timestamp}
            self.emit(FEEDBACK, line)

    def emit(self, kind: str, line: Served | dict[str, Any]) -> None:
        if not self.started:
            self.start()
        self.handler.handle(logging.makeLogRecord({"name": kind, "msg": line, "levelno": 20}))

    def start(self) -> None:
        """Make the directory and start the writer thread (on the first record)."""
        with self.lock:
            if self.started:
                return
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                self.dropped.add(f"making {self.directory}", exc)
            self.listener.start()
            self.started = True

    def close(self) -> None:
        """Write out every queued record and close the files (the writer thread stops)."""
        with self.lock:
            if self.started:
                self.listener.stop()
                self.started = False
        for writer in self.writers.values():
            writer.close()


# --- reading (the monitor: pipelines/drift.py) -----------------------------------------------


class LogError(PipelineError):
    """The prediction log cannot be used (missing directory, no feature columns it needs)."""


def read_lines(directory: Path, pattern: str) -> list[dict[str, Any]]:
    """Every JSON object in the files matching `pattern` (PREDICTIONS_GLOB, FEEDBACK_GLOB;
    rotated ones too) in `directory` and its subfolders (an inference host logs each replica of a
    version in a folder of its own), oldest file first, as written. A line that is not a JSON
    object (a write cut by a full disk) is skipped. Raises LogError when `directory` does
    not exist."""
    if not directory.is_dir():
        raise LogError(f"{directory}: no such directory (the service's prediction log)")
    files = sorted(directory.rglob(pattern), key=lambda p: (p.stat().st_mtime, -_rotation(p)))
    records = []
    for path in files:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _rotation(path: Path) -> int:
    """`x.jsonl.3` -> 3 (older), `x.jsonl` -> 0."""
    suffix = path.name.rpartition(".")[2]
    return int(suffix) if suffix.isdigit() else 0


def read_predictions(directory: Path, columns: Sequence[str]) -> list[dict[str, Any]]:
    """The prediction log of `directory` (read_lines) as one record per served row, oldest file
    first: {"request_id", "row" (position in the request), "timestamp", "model_version",
    "features" ({column: value}; a /predict body's row i is zip(columns, row)), "prediction"
    (the label served), "confidence" (its probability)}. `columns`: the model's feature columns
    (pipelines.reference.profile_columns). Lines in this per-row form (written by an older
    service, with a "features" object) pass as they are; any other line without a response, and
    a request line whose bodies are malformed (rows and answers of different lengths, no rows,
    a null request), is skipped. Raises LogError (see read_lines), and naming the
    request for a row of another width than `columns` (a log of another model)."""
    out: list[dict[str, Any]] = []
    for record in read_lines(directory, PREDICTIONS_GLOB):
        if "response" not in record:  # the older per-row form, when it is one
            if isinstance(record.get("features"), dict):
                out.append(record)
            continue
        try:
            out.extend(expand(record, columns))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def expand(record: dict[str, Any], columns: Sequence[str]) -> list[dict[str, Any]]:
    """A request line -> its per-row records (see read_predictions). LogError for a row of
    another width than `columns`; ValueError, KeyError or TypeError for malformed bodies."""
    answers = record["response"]
    if "request" in record:
        rows = record["request"]["rows"]
        wrong = next((len(row) for row in rows if len(row) != len(columns)), None)
        if wrong is not None:
            raise LogError(
                f"request {record.get('request_id')}: a logged row of {wrong} values, the "
                f"reference profile has {len(columns)} columns (a log of another model?)"
            )
        features = [dict(zip(columns, row, strict=True)) for row in rows]
    else:
        features = list(record["features"])
    if len(features) != len(answers):
        raise ValueError(f"{len(features)} rows, {len(answers)} answers")
    head = {k: record.get(k) for k in ("request_id", "timestamp", "model_version")}
    return [
        {
            **head,
            "row": row,
            "features": values,
            "prediction": answer["label"],
            "confidence": float(max(answer["probabilities"], default=math.nan)),
        }
        for row, (values, answer) in enumerate(zip(features, answers, strict=True))
    ]
