"""Drift of what is served against the reference profile, with NannyML (no Prefect here).

The `monitor` flow (flows/monitor.py) reads the newest `monitor.window_rows` rows of the
prediction log (pipelines/prediction_log.py) and judges them against the serving version's
reference profile (pipelines/reference.py):

- per feature, NannyML's univariate Kolmogorov-Smirnov drift: the statistic D of the window
  against the reference, alerting above the test's critical value at `monitor.drift_alpha` (a
  constant NannyML threshold; NannyML's default band, mean +- 3 std of D over the reference's
  own chunks, raised 14 of 64 alerts on unshifted digits with 3 chunks: each chunk is part of
  the reference it is compared with); overall, the share of features that alert;
- the predicted-label distribution against the one measured on the test split (Jensen-Shannon
  distance and a chi-square test, scipy);
- where feedback exists (POST /feedback, joined on request id and row), production accuracy.

The window has drifted when the share of drifting features is above `monitor.drift_threshold`,
or accuracy on at least `monitor.min_feedback_rows` labelled rows is below `monitor.min_accuracy`.

Why NannyML: of the three libraries the issue names, only it installs and imports beside our
pinned stack (Evidently 0.7.23 installs but fails at import on pandas 3: it imports a function
pandas removed; alibi-detect 0.13 needs numpy < 2). It brings the per-column statistics, the
chunking of reference and analysis data, thresholds as objects, and the plots of the report.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.config import MonitorConfig
from pipelines.prediction_log import (  # the log's one reader
    FEEDBACK_GLOB,
    LogError,
    read_lines,
    read_predictions,
)

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.reference import Reference

METHOD = "kolmogorov_smirnov"


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's drift: NannyML's K-S statistic D of the window against the reference, the
    critical value it is compared with (ks_critical) and the alert."""

    statistic: float
    threshold: float
    drifted: bool


@dataclass
class DriftResult:
    """What the monitor found in one window (all shares in [0, 1]; NaN: not measured)."""

    rows: int  # logged rows judged
    requests: int  # distinct request ids among them
    model_version: str | None
    features: dict[str, FeatureDrift] = field(default_factory=dict)
    drift_share: float = math.nan  # share of the features that drift
    prediction_js: float = math.nan  # Jensen-Shannon distance (base 2) of predicted labels
    prediction_p: float = math.nan  # chi-square test of the window's label counts
    predicted: dict[str, float] = field(default_factory=dict)  # the window's label shares
    accuracy: float = math.nan  # rows with feedback: share predicted right
    feedback_rows: int = 0
    judged: bool = False  # enough rows to judge (monitor.min_rows)
    reasons: list[str] = field(default_factory=list)  # why it alarms; empty: no alarm

    @property
    def drifted_features(self) -> list[str]:
        """Names of the drifting features, the largest statistic first."""
        found = [(f.statistic, n) for n, f in self.features.items() if f.drifted]
        return [n for _, n in sorted(found, reverse=True)]

    @property
    def alarm(self) -> bool:
        return bool(self.reasons)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as None), with the drifted features and the alarm."""
        raw = asdict(self)
        raw.update(drifted_features=self.drifted_features, alarm=self.alarm)
        return _no_nan(raw)


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def read_window(
    directory: Path, features: list[str], rows: int, model_version: str | None = None
) -> pd.DataFrame:
    """The newest `rows` logged rows (of `model_version` when given) as a frame: request_id,
    row, timestamp, prediction (str), confidence and one float column per feature. Raises
    LogError naming the features the log lacks."""
    import pandas as pd

    records = read_predictions(directory, features)
    if model_version is not None:
        records = [r for r in records if str(r.get("model_version")) == model_version]
    records.sort(key=lambda r: str(r.get("timestamp", "")))
    records = records[-rows:] if rows else []
    if not records:
        return pd.DataFrame(columns=["request_id", "row", "timestamp", "prediction", *features])
    logged = [r.get("features") or {} for r in records]
    missing = sorted({f for f in features if any(f not in x for x in logged)})
    if missing:
        raise LogError(
            f"{directory}: logged rows lack feature(s) {missing[:5]} of the reference profile"
            " (a log of another model?)"
        )
    frame = pd.DataFrame([[x[f] for f in features] for x in logged], columns=features)
    meta = pd.DataFrame(
        {
            "request_id": [str(r.get("request_id")) for r in records],
            "row": [int(r.get("row", 0)) for r in records],
            "timestamp": [str(r.get("timestamp", "")) for r in records],
            "prediction": [str(r.get("prediction")) for r in records],
            "confidence": [float(r.get("confidence", math.nan)) for r in records],
        }
    )
    return pd.concat([meta, frame.astype("float64")], axis=1)


def production_accuracy(
    window: pd.DataFrame, feedback: Iterable[Mapping[str, Any]]
) -> tuple[float, int]:
    """(share of the window's rows whose feedback label equals the prediction, rows with
    feedback); (NaN, 0) without any. The last label given for a (request id, row) counts."""
    labels = {
        (str(f.get("request_id")), int(f.get("row", 0))): str(f.get("label")) for f in feedback
    }
    pairs = [
        (labels[key], pred)
        for key, pred in zip(
            zip(window["request_id"], window["row"], strict=True), window["prediction"], strict=True
        )
        if key in labels
    ]
    if not pairs:
        return math.nan, 0
    return sum(t == p for t, p in pairs) / len(pairs), len(pairs)


def prediction_drift(
    expected: Mapping[str, float], predicted: Iterable[str]
) -> tuple[float, float, dict[str, float]]:
    """(Jensen-Shannon distance base 2 in [0, 1], chi-square p-value, the window's label shares)
    of the window's predicted labels against `expected` (label -> share on the test split).
    A label the reference never predicted counts with a tiny expected share."""
    import numpy as np
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import chisquare

    counts: dict[str, int] = {}
    for label in predicted:
        counts[label] = counts.get(label, 0) + 1
    total = sum(counts.values())
    if not total:
        return math.nan, math.nan, {}
    labels = sorted(set(expected) | set(counts))
    seen = np.array([counts.get(k, 0) for k in labels], dtype=float)
    floor = 0.5 / max(total, 1)  # an unseen label's expected share: half a row
    share = np.array([max(float(expected.get(k, 0.0)), floor) for k in labels])
    share /= share.sum()
    distance = float(jensenshannon(seen / total, share, base=2))
    p_value = float(chisquare(seen, share * total).pvalue)
    return distance, p_value, {k: counts.get(k, 0) / total for k in labels}


def ks_critical(reference_rows: int, window_rows: int, alpha: float) -> float:
    """The two-sample Kolmogorov-Smirnov statistic D above which two samples of these sizes
    from one distribution differ with probability < `alpha` (the asymptotic Kolmogorov
    distribution, scipy's `kolmogi`): D_crit = K^-1(alpha) sqrt((n + m) / (n m))."""
    from scipy.special import kolmogi

    n, m = reference_rows, window_rows
    return float(kolmogi(alpha) * math.sqrt((n + m) / (n * m)))


def feature_drift(
    reference: pd.DataFrame, window: pd.DataFrame, features: list[str], alpha: float
) -> tuple[dict[str, FeatureDrift], Any]:
    """NannyML's univariate K-S drift of each feature, the alert above the test's critical
    value at `alpha` (ks_critical); returns ({feature: FeatureDrift}, NannyML's result, for
    plots). The reference is cut into chunks of the window's size for the plots' context."""
    import nannyml as nml
    from nannyml.thresholds import ConstantThreshold

    size = min(len(window), len(reference))
    upper = ks_critical(len(reference), len(window), alpha)
    calculator = nml.UnivariateDriftCalculator(
        column_names=features,
        continuous_methods=[METHOD],
        chunk_size=size,
        thresholds={METHOD: ConstantThreshold(upper=upper)},
    )
    with warnings.catch_warnings():  # few reference chunks: they only draw the plots' context
        warnings.filterwarnings("ignore", "The resulting number of chunks is too low")
        calculator.fit(reference[features].reset_index(drop=True))
        result = calculator.calculate(window[features].reset_index(drop=True))
    table = result.filter(period="analysis").to_df().iloc[-1]
    found = {
        name: FeatureDrift(
            float(table[(name, METHOD, "value")]), upper, bool(table[(name, METHOD, "alert")])
        )
        for name in features
    }
    return found, result


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def check(
    reference: Reference, log_dir: Path, cfg: MonitorConfig, model_version: str | None = None
) -> tuple[DriftResult, Any]:
    """The newest window of `log_dir` (read_window: rows of `model_version`, else of the
    reference's own version when it names one, else all) judged against `reference` (judge).
    Raises LogError for an unusable log directory."""
    version = model_version or reference.model_version
    window = read_window(log_dir, reference.features, cfg.window_rows, version)
    result, nannyml_result = judge(
        reference, window, cfg, lambda: read_lines(log_dir, FEEDBACK_GLOB)
    )
    result.model_version = version
    return result, nannyml_result


def judge(
    reference: Reference,
    window: pd.DataFrame,
    cfg: MonitorConfig,
    feedback: Callable[[], Iterable[Mapping[str, Any]]] = list,
) -> tuple[DriftResult, Any]:
    """`window` (read_window's frame) against `reference` (see the module doc), `feedback` read
    only when the window is judged; returns the result and NannyML's result (None when the
    window has fewer than `monitor.min_rows` rows: not judged, no alarm)."""
    result = DriftResult(len(window), int(window["request_id"].nunique()), reference.model_version)
    if len(window) < cfg.min_rows:
        return result, None
    if reference.rows < cfg.min_rows:
        raise LogError(
            f"the reference profile has {reference.rows} rows, fewer than monitor.min_rows"
            f" ({cfg.min_rows}): too few to judge a window against"
        )
    window = window.iloc[-reference.rows :]  # NannyML's chunks: no larger than the reference
    result.rows, result.judged = len(window), True
    result.features, nannyml_result = feature_drift(
        reference.frame, window, reference.features, cfg.drift_alpha
    )
    result.drift_share = sum(f.drifted for f in result.features.values()) / len(result.features)
    result.prediction_js, result.prediction_p, result.predicted = prediction_drift(
        reference.predicted_label_distribution, window["prediction"]
    )
    result.accuracy, result.feedback_rows = production_accuracy(window, feedback())
    result.reasons = reasons(result, cfg)
    return result, nannyml_result


def reasons(result: DriftResult, cfg: MonitorConfig) -> list[str]:
    """Why `result` alarms (one sentence each, naming the figures and the setting); [] if not."""
    found = []
    if result.drift_share > cfg.drift_threshold:
        names = result.drifted_features
        shown = ", ".join(names[:10]) + (f" (+{len(names) - 10} more)" if len(names) > 10 else "")
        found.append(
            f"drift: {len(names)} of {len(result.features)} features drifted"
            f" (share {result.drift_share:.2f} > monitor.drift_threshold {cfg.drift_threshold})"
            f" over {result.rows} logged rows: {shown}"
        )
    judged = result.feedback_rows >= cfg.min_feedback_rows
    if judged and result.accuracy < cfg.min_accuracy:
        found.append(
            f"accuracy: {result.accuracy:.3f} on {result.feedback_rows} rows with feedback"
            f" < monitor.min_accuracy {cfg.min_accuracy}"
        )
    return found


def write_report(result: DriftResult, nannyml_result: Any, path: Path, top: int = 12) -> Path:
    """An HTML report at `path`: the verdict, the per-feature table and NannyML's drift plots
    (the `top` features by statistic, drifted ones first). Returns `path`."""
    import pandas as pd

    from pipelines.artifacts import atomic_path

    verdict = "; ".join(result.reasons) or "no alarm"
    table = pd.DataFrame(
        [
            {"feature": n, "K-S D": f.statistic, "critical D": f.threshold, "drifted": f.drifted}
            for n, f in result.features.items()
        ]
    )
    if len(table):
        table = table.sort_values(["drifted", "K-S D"], ascending=False)
    summary = {k: v for k, v in result.as_dict().items() if k not in ("features",)}
    parts = [
        "<html><head><meta charset='utf-8'><title>Drift report</title></head><body>",
        f"<h1>Drift report: {'ALARM' if result.alarm else 'no alarm'}</h1>",
        f"<p>{_escape(verdict)}</p>",
        f"<pre>{_escape(json.dumps(summary, indent=2))}</pre>",
        table.to_html(index=False, float_format=lambda v: f"{v:.4f}"),
    ]
    if nannyml_result is not None and len(table):
        shown = list(table["feature"][:top])
        figure = nannyml_result.filter(column_names=shown, methods=[METHOD]).plot(kind="drift")
        parts.append(figure.to_html(full_html=False, include_plotlyjs=True))
    parts.append("</body></html>")
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(parts))
    return path


def _escape(text: str) -> str:
    import html

    return html.escape(text)
