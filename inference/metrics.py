"""The versions' own Prometheus figures (BentoML's /metrics), read with prometheus_client's
parser, and the canary/watch arithmetic over a window (the delta of two scrapes)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

TOTAL = "bentoml_service_request_total"
DURATION = "bentoml_service_request_duration_seconds"
IN_PROGRESS = "bentoml_service_request_in_progress"
JUDGED = ("/predict", "/predict_image")  # endpoints the canary judges (not probes or /metrics)


@dataclass
class Scrape:
    """Cumulative counters of one version (summed over its replicas) at one moment."""

    requests: float = 0.0
    errors: float = 0.0  # 5xx answers
    buckets: dict[float, float] = field(default_factory=dict)  # le (s) -> cumulative count
    in_progress: float = 0.0
    found: bool = False  # a request counter of the endpoints was there (BentoML lists it at start)

    def add(self, other: Scrape) -> Scrape:
        buckets = dict(self.buckets)
        for le, n in other.buckets.items():
            buckets[le] = buckets.get(le, 0.0) + n
        return Scrape(
            self.requests + other.requests,
            self.errors + other.errors,
            buckets,
            self.in_progress + other.in_progress,
            self.found or other.found,
        )


@dataclass(frozen=True)
class Window:
    """One version's figures over a window: requests, 5xx share, p99 (s; NaN when no request)."""

    requests: float
    errors: float
    p99_s: float

    @property
    def error_share(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def parse(text: str, endpoints: Iterable[str] = JUDGED) -> Scrape:
    """A Scrape from /metrics text: request and 5xx totals, duration buckets and requests in
    progress, of the `endpoints` only. The duration buckets leave out 4xx answers: their time is
    the client's (a body that stalls is a 408 after 0.6 x serve.timeout_s, a rejected one a 400
    in microseconds), and a client's mistakes must move neither a canary's p99 nor a shared
    host's SLO (one stalled request every 1.5 s held training paused at a 50 ms SLO)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = set(endpoints)
    scrape = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("endpoint") not in wanted:
                continue
            if sample.name == TOTAL:
                scrape.found = True
                scrape.requests += sample.value
                if sample.labels.get("http_response_code", "").startswith("5"):
                    scrape.errors += sample.value
            elif sample.name == DURATION + "_bucket":
                if sample.labels.get("http_response_code", "").startswith("4"):
                    continue
                le = float(sample.labels["le"])
                scrape.buckets[le] = scrape.buckets.get(le, 0.0) + sample.value
            elif sample.name == IN_PROGRESS:
                scrape.in_progress += sample.value
    return scrape


def quantile(buckets: dict[float, float], q: float) -> float:
    """The q-quantile (s) of a cumulative histogram {le: count}, interpolated linearly inside the
    bucket that holds it, as Prometheus's histogram_quantile does; NaN when it is empty. A
    quantile in the +Inf bucket is the largest finite bound."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return math.nan
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, count
    return lower


def since(before: Scrape, after: Scrape) -> Scrape:
    """What `after` counted since `before` (its requests, errors and duration buckets; in
    progress as `after` read it). A counter that went down (a replica restarted) counts from
    zero: the later scrape alone."""
    if after.requests < before.requests:
        before = Scrape()
    buckets = {le: n - before.buckets.get(le, 0.0) for le, n in after.buckets.items()}
    return Scrape(
        after.requests - before.requests,
        after.errors - before.errors,
        buckets,
        after.in_progress,
        after.found,
    )


def window(before: Scrape, after: Scrape) -> Window:
    """The figures between two scrapes of one version (`since`)."""
    counted = since(before, after)
    return Window(counted.requests, counted.errors, quantile(counted.buckets, 0.99))


def breach(
    candidate: Window, stable: Window, max_5xx_ratio: float, max_p99_ratio: float, min_requests: int
) -> str | None:
    """Why `candidate` fails against `stable`, or None: its 5xx share above the stable's +
    max_5xx_ratio; its p99 above max_p99_ratio x the stable's when both windows have at least
    min_requests requests."""
    limit = stable.error_share + max_5xx_ratio
    if candidate.requests and candidate.error_share > limit:
        return (
            f"5xx share {candidate.error_share:.3f} ({candidate.errors:.0f} of "
            f"{candidate.requests:.0f}) > limit {limit:.3f} (stable {stable.error_share:.3f} "
            f"+ deploy.max_5xx_ratio {max_5xx_ratio})"
        )
    judged = min(candidate.requests, stable.requests) >= max(min_requests, 1)
    if judged and candidate.p99_s > max_p99_ratio * stable.p99_s:
        return (
            f"p99 {candidate.p99_s * 1000:.1f} ms > limit {max_p99_ratio * stable.p99_s * 1000:.1f}"
            f" ms (deploy.max_p99_ratio {max_p99_ratio} x stable {stable.p99_s * 1000:.1f} ms)"
        )
    return None
