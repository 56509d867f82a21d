"""The service's prediction log and feedback log: JSON lines in one directory, written off the
request path by the standard library's logging (a QueueHandler in the request, a QueueListener
thread writing RotatingFileHandlers). Stdlib and numpy only: it runs inside the lean bento.

Files in the log directory (`serve.log_dir`, or MLOPS_LOG_DIR), one set per server worker:
- `predictions-w<worker>.jsonl` (rotated to `.1` ... `.<log_max_files>` at `log_max_bytes`): one
  object per served row of a sampled request: {"request_id", "row" (position in the request),
  "timestamp" (ISO-8601 UTC, when it was served), "model_version", "features" ({column: value};
  for image-folder models the 4 image statistics of pipelines.reference.IMAGE_STATS),
  "prediction" (the label as served), "confidence" (its probability)}.
- `feedback-w<worker>.jsonl` (same rotation): one object per labelled row of POST /feedback:
  {"request_id", "row", "label", "timestamp"}.

A request is logged with probability `serve.log_fraction`; at 0 no prediction file is made.
Writing never fails a request: a full queue or disk drops records, counted, with one log line.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import random
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PREDICTIONS, FEEDBACK = "predictions", "feedback"
QUEUE_SIZE = 100_000  # records waiting for the writer thread; beyond: dropped and counted
log = logging.getLogger("mlops.prediction_log")


def utc_now() -> str:
    """The current time, ISO-8601 in UTC with milliseconds (e.g. 2026-11-30T12:00:00.123+00:00)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class JsonLine(logging.Formatter):
    """A record whose `msg` is a dict -> its JSON (one line)."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(record.msg, separators=(",", ":"))


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
        super().__init__(path, maxBytes=max_bytes, backupCount=max_files, delay=True)
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
    set at max_bytes x (max_files + 1) bytes (a single row's line larger than max_bytes is the
    only excess). Call `close()` to write out what is queued."""

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

    def predictions(
        self,
        request_id: str,
        features: Sequence[dict[str, float]],
        labels: Sequence[Any],
        confidences: Sequence[float],
        model_version: str,
    ) -> None:
        """Queue one line per served row (see the module doc); returns at once."""
        timestamp = utc_now()
        for row, (values, label, confidence) in enumerate(
            zip(features, labels, confidences, strict=True)
        ):
            line = {
                "request_id": request_id,
                "row": row,
                "timestamp": timestamp,
                "model_version": model_version,
                "features": values,
                "prediction": label,
                "confidence": float(confidence),
            }
            self.emit(PREDICTIONS, line)

    def feedback(self, request_id: str, labels: Sequence[Any]) -> None:
        """Queue one line per labelled row of a request (see the module doc); returns at once."""
        timestamp = utc_now()
        for row, label in enumerate(labels):
            line = {"request_id": request_id, "row": row, "label": label, "timestamp": timestamp}
            self.emit(FEEDBACK, line)

    def emit(self, kind: str, line: dict[str, Any]) -> None:
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
