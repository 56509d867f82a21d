"""`validate`: the Great Expectations gate over the prepared splits.

The suite is derived from `params.data` (the schema) and `params.validate` (the thresholds), never
from the data. Checks GX has no expectation for (rows per class, class imbalance, duplicate rows,
train/test leakage) are real GX expectations over frames derived here with pandas, so every check
shows in Data Docs. Three suites, one checkpoint each:

- `rows`: every row of every split, plus a `_row_hash` column over the feature columns;
- `classes`: one row per configured label with its row count over all splits;
- `leakage`: the test split's `_row_hash`, which must not occur in the train split.

A failed gate still writes Data Docs (`docs_dir/index.html`) and `docs_dir/summary.json`, then
raises `DataValidationError` with one line per failed check.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd

from pipelines.artifacts import write_json
from pipelines.cli import run_cli
from pipelines.config import DataConfig, Params, ValidateConfig, is_image_folder, section_dict
from pipelines.errors import DataSourceError, DataValidationError
from pipelines.prepare import SPLITS, as_numbers, numeric_columns, read_files, read_manifest
from pipelines.preprocessing import IMAGE_MODES as PIXEL_MODES
from pipelines.tracking import RUN_FILE

HASH_COLUMN = "_row_hash"
DOCS_SITE = "validate"
DOCS_INDEX = "index.html"  # the Data Docs' front page, in the docs folder
NUMERIC_TYPES = [
    *(f"{kind}{bits}" for kind in ("int", "uint", "Int", "UInt") for bits in (8, 16, 32, 64)),
    *(f"{kind}{bits}" for kind in ("float", "Float") for bits in (32, 64)),
    "float16",
    "int",
    "float",
]
SAMPLE = 5  # unexpected values quoted per failure
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    """One suite and the frame it validates."""

    name: str
    frame: pd.DataFrame
    expectations: list[Any]
    result_format: dict[str, Any]


# --- derived frames -------------------------------------------------------------------------


def load_splits(prepared_dir: Path) -> dict[str, pd.DataFrame]:
    """The three prepared splits; a missing file is a `DataSourceError` (run `prepare` first)."""
    splits = {}
    for name in SPLITS:
        path = Path(prepared_dir) / f"{name}.parquet"
        if not path.is_file():
            raise DataSourceError(f"{path}: no such file; run the prepare stage first")
        splits[name] = pd.read_parquet(path)
    return splits


def content_hashes(frame: pd.DataFrame, data: DataConfig) -> pd.Series:
    """What identifies a row's content: the image file's sha256 for a folder of images (as
    prepare recorded it), else the digest of the feature values (`row_hashes`)."""
    if is_image_folder(data.source) and "sha256" in frame.columns:
        return frame["sha256"].astype(object)
    return row_hashes(frame, data.feature_columns)


def row_hashes(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """One hex digest per row over `columns` (those present): identical rows, identical digest."""
    present = [c for c in columns if c in frame.columns]
    digests = pd.util.hash_pandas_object(frame[present], index=False)
    return digests.map(lambda value: f"{value:016x}").astype(object)


def rows_frame(splits: dict[str, pd.DataFrame], data: DataConfig) -> pd.DataFrame:
    """All splits stacked, with the feature-row digest the duplicate check runs on. A numeric
    column that came as text (a CSV cell such as `n/a`) has its numbers parsed, so the type check
    counts only the values that are no number."""
    frame = pd.concat([splits[name] for name in SPLITS], ignore_index=True)
    frame[HASH_COLUMN] = content_hashes(frame, data)
    for column in (c for c in numeric_columns(data) if c in frame.columns):
        frame[column] = as_numbers(frame[column])
    return frame


def class_frame(rows: pd.DataFrame, data: DataConfig) -> pd.DataFrame:
    """One row per configured label: its row count, and that count over the smallest non-zero."""
    labels = list(data.labels)
    if data.label_column in rows.columns:
        counts = rows[data.label_column].value_counts().reindex(labels, fill_value=0)
    else:
        counts = pd.Series(0, index=labels)
    smallest = int(counts[counts > 0].min()) if (counts > 0).any() else 1
    rows_per_label = counts.to_numpy()
    return pd.DataFrame(
        {"label": labels, "rows": rows_per_label, "ratio_to_smallest": rows_per_label / smallest}
    )


def leakage_frame(splits: dict[str, pd.DataFrame], data: DataConfig) -> pd.DataFrame:
    return pd.DataFrame({HASH_COLUMN: content_hashes(splits["test"], data)})


# --- the suite, derived from the config -----------------------------------------------------


def _meta(columns: list[str], **extra: Any) -> dict[str, Any]:
    """What the summary needs: the columns a result depends on, a check name, a reason, a limit."""
    return {"depends_on": columns, **extra}


def schema_expectations(data: DataConfig, ranges: list[tuple[float, float]]) -> list[Any]:
    """Required columns, at least one row, numeric non-null features within their [low, high]
    of `ranges` (one per feature column: `DataConfig.ranges`), known labels. A folder of images:
    its pixel columns are written by `prepare`'s decoder (in range by construction), so the
    files are checked instead (`file_expectations`)."""
    ex = _gx().expectations
    pixels = is_image_folder(data.source)
    required = [*([] if pixels else data.feature_columns), data.label_column]
    found = [ex.ExpectColumnToExist(column=c, meta=_meta([c])) for c in required]
    found.append(ex.ExpectTableRowCountToBeBetween(min_value=1, meta=_meta([])))
    for column, value_range in [] if pixels else zip(data.feature_columns, ranges, strict=True):
        found.extend(feature_expectations(column, value_range))
    label = data.label_column
    found.append(ex.ExpectColumnValuesToNotBeNull(column=label, meta=_meta([label], reason="null")))
    found.append(
        ex.ExpectColumnValuesToBeInSet(
            column=label,
            value_set=list(data.labels),
            meta=_meta([label], reason="not in data.labels"),
        )
    )
    return found


def feature_expectations(column: str, value_range: tuple[float, float]) -> list[Any]:
    ex = _gx().expectations
    low, high = value_range
    return [
        ex.ExpectColumnValuesToBeInTypeList(
            column=column, type_list=NUMERIC_TYPES, meta=_meta([column], reason="not numeric")
        ),
        ex.ExpectColumnValuesToNotBeNull(column=column, meta=_meta([column], reason="null")),
        ex.ExpectColumnValuesToBeBetween(
            column=column,
            min_value=low,
            max_value=high,
            meta=_meta([column], reason=f"outside [{low}, {high}]"),
        ),
    ]


def duplicate_expectation(data: DataConfig, cfg: ValidateConfig) -> Any:
    limit = cfg.max_duplicate_fraction
    return _gx().expectations.ExpectColumnValuesToBeUnique(
        column=HASH_COLUMN,
        mostly=round(1.0 - limit, 12),
        description=f"At most {limit:.2%} of all rows share their feature values with another row",
        meta=_meta(data.feature_columns, check="duplicate rows", limit=limit),
    )


def class_expectations(data: DataConfig, cfg: ValidateConfig) -> list[Any]:
    ex = _gx().expectations
    depends = [data.label_column]
    return [
        ex.ExpectColumnValuesToBeBetween(
            column="rows",
            min_value=cfg.min_rows_per_class,
            description=f"Every label has at least {cfg.min_rows_per_class} rows (all splits)",
            meta=_meta(depends, check="min rows per class", limit=cfg.min_rows_per_class),
        ),
        ex.ExpectColumnMaxToBeBetween(
            column="ratio_to_smallest",
            max_value=cfg.max_class_imbalance,
            description=(
                f"The largest class has at most {cfg.max_class_imbalance}x the rows of the smallest"
            ),
            meta=_meta(depends, check="class imbalance", limit=cfg.max_class_imbalance),
        ),
    ]


def leakage_expectation(data: DataConfig, train_hashes: list[str]) -> Any:
    return _gx().expectations.ExpectColumnValuesToNotBeInSet(
        column=HASH_COLUMN,
        value_set=train_hashes,
        description="No test row has the same feature values as a train row (leakage)",
        meta=_meta(data.feature_columns, check="train/test leakage"),
    )


# Pillow modes `decode_image` reads faithfully: the service's set too (preprocessing.IMAGE_MODES).
IMAGE_MODES = list(PIXEL_MODES)
MAX_IMAGE_PIXELS = 4096 * 4096  # open_image's limit: larger files do not decode


def files_frame(files: pd.DataFrame, folder: str) -> pd.DataFrame:
    """The file list of a folder of images, paths under `folder` (data.source), with each
    file's pixel count."""
    frame = files.copy()
    frame["path"] = folder.rstrip("/") + "/" + frame["path"]
    frame["pixels"] = (frame["width"] * frame["height"]).astype("float64")
    return frame


def file_expectations() -> list[Any]:
    """Every file decodes; its mode is one the decoder reads; its size within the limit."""
    ex = _gx().expectations
    return [
        ex.ExpectColumnValuesToBeNull(
            column="error",
            description="Every image file decodes (Pillow reads it whole)",
            meta=_meta(["path"], check="image decodes"),
        ),
        ex.ExpectColumnValuesToBeInSet(
            column="mode",
            value_set=IMAGE_MODES,
            meta=_meta(["path"], check="image mode", reason=f"not one of {IMAGE_MODES}"),
        ),
        ex.ExpectColumnValuesToBeBetween(
            column="pixels",
            min_value=1,
            max_value=MAX_IMAGE_PIXELS,
            meta=_meta(["path"], check="image size", limit=MAX_IMAGE_PIXELS),
        ),
    ]


def build_checks(
    data: DataConfig,
    cfg: ValidateConfig,
    splits: dict[str, pd.DataFrame],
    learned: dict[str, list[float]] | None = None,
    files: pd.DataFrame | None = None,
) -> list[Check]:
    """The three suites with their frames: `rows`, `classes`, `leakage`. `learned`: the
    manifest's ranges when data.value_range is `learn`. A folder of images (`files`: prepare's
    file list) adds `files`, and its duplicates and leakage are judged by the files' content
    hashes."""
    rows = rows_frame(splits, data)
    try:
        ranges = data.ranges(learned)
    except ValueError as exc:  # `learn` without prepare's manifest
        raise DataSourceError(f"data.{exc}; run the prepare stage first") from None
    train_hashes = sorted(set(content_hashes(splits["train"], data)))
    by_label = {"result_format": "COMPLETE", "unexpected_index_column_names": ["label"]}
    by_path = {"result_format": "COMPLETE", "unexpected_index_column_names": ["path"]}
    summary = {"result_format": "SUMMARY"}
    return [
        Check(
            "rows",
            rows,
            [*schema_expectations(data, ranges), duplicate_expectation(data, cfg)],
            summary,
        ),
        Check("classes", class_frame(rows, data), class_expectations(data, cfg), by_label),
        Check(
            "leakage",
            leakage_frame(splits, data),
            [leakage_expectation(data, train_hashes)],
            summary,
        ),
        *(
            [Check("files", files_frame(files, data.source), file_expectations(), by_path)]
            if files is not None
            else []
        ),
    ]


# --- running GX -----------------------------------------------------------------------------


def _gx() -> ModuleType:
    """Great Expectations, imported on first use (~4 s), quiet (offline: see pipelines/__init__)."""
    import great_expectations

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    return great_expectations


def gx_context(docs_dir: Path) -> Any:
    """An in-memory context whose one Data Docs site is `docs_dir`: no progress bars, no network."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    site = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": str(Path(docs_dir).resolve()),
        },
    }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites={DOCS_SITE: site},
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return _gx().get_context(project_config=config, mode="ephemeral")


def run_check(context: Any, source: Any, check: Check) -> list[dict[str, Any]]:
    """Validate `check.frame` against its suite; results in the suite's order."""
    checkpoint, suite = add_checkpoint(context, source, check)
    result = checkpoint.run(batch_parameters={"dataframe": check.frame})
    order = {expectation.id: i for i, expectation in enumerate(suite.expectations)}
    items = [item for validation in result.run_results.values() for item in validation.results]
    items.sort(key=lambda item: order.get(item.expectation_config.id, len(order)))
    return [record(check.name, item) for item in items]


def add_checkpoint(context: Any, source: Any, check: Check) -> tuple[Any, Any]:
    """The suite, its validation definition and a checkpoint that updates Data Docs."""
    gx = _gx()
    batch = source.add_dataframe_asset(check.name).add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(
        gx.ExpectationSuite(name=check.name, expectations=check.expectations)
    )
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=check.name, data=batch, suite=suite)
    )
    checkpoint = gx.Checkpoint(
        name=check.name,
        validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])],
        result_format=check.result_format,
    )
    return context.checkpoints.add(checkpoint), suite


def record(suite: str, item: Any) -> dict[str, Any]:
    """One expectation's result as plain JSON-able data."""
    config = item.expectation_config
    result = item.to_json_dict()["result"] or {}
    meta = config.meta or {}
    index = result.get("unexpected_index_list") or result.get("partial_unexpected_index_list")
    return {
        "suite": suite,
        "check": meta.get("check", config.type),
        "type": config.type,
        "column": config.kwargs.get("column"),
        "success": bool(item.success),
        "element_count": result.get("element_count"),
        "unexpected_count": result.get("unexpected_count"),
        "unexpected_percent": result.get("unexpected_percent"),
        "observed_value": result.get("observed_value"),
        "sample": distinct(result.get("partial_unexpected_list") or [])[:SAMPLE],
        "unexpected_rows": index if index and isinstance(index[0], dict) else None,
        "reason": meta.get("reason"),
        "limit": meta.get("limit"),
        "depends_on": meta.get("depends_on", []),
        "exception": exception_message(item.exception_info or {}),
    }


def distinct(values: list[Any]) -> list[Any]:
    """`values` without repeats, in first-seen order (by repr: 1 and '1' stay apart)."""
    seen: dict[str, Any] = {}
    for value in values:
        seen.setdefault(repr(value), value)
    return list(seen.values())


def exception_message(info: dict[str, Any]) -> str | None:
    """The first line of the first exception GX caught, whichever of its two shapes `info` has."""
    entries = [info] if "raised_exception" in info else list(info.values())
    for entry in entries:
        if isinstance(entry, dict) and entry.get("raised_exception"):
            message = str(entry.get("exception_message") or "exception").strip()
            return message.splitlines()[0] if message else "exception"
    return None


def add_source_rows(records: list[dict[str, Any]], prepared_dir: Path) -> None:
    """The source rows `prepare` found non-numeric text in, on each failed type check."""
    path = Path(prepared_dir) / "manifest.json"
    cells = read_manifest(prepared_dir).get("non_numeric", {}) if path.is_file() else {}
    for r in records:
        found = cells.get(r["column"])
        if found and not r["success"] and r["type"] == "expect_column_values_to_be_in_type_list":
            more = ["..."] if found["count"] > len(found["rows"]) else []
            r["source_rows"] = [*found["rows"], *more]


# --- the summary and the message ------------------------------------------------------------


def summarize(records: list[dict[str, Any]], docs_index: Path) -> dict[str, Any]:
    """The JSON-able summary: counts, one line per problem, and every expectation's result."""
    failed = sum(not r["success"] for r in records)
    return {
        "success": failed == 0,
        "evaluated": len(records),
        "successful": len(records) - failed,
        "failed": failed,
        "docs_index": str(docs_index),
        "failures": failure_lines(records),
        "results": [{k: v for k, v in r.items() if k != "depends_on"} for r in records],
    }


def failure_lines(records: list[dict[str, Any]]) -> list[str]:
    """One line per real problem; failures that only follow from one are folded into one line."""
    failed = [r for r in records if not r["success"]]
    missing = {r["column"] for r in failed if r["type"] == "expect_column_to_exist"}
    broken = missing | {r["column"] for r in failed if not r["exception"]}
    primary, folded = [], []
    for r in failed:
        consequence = r["type"] != "expect_column_to_exist" and bool(missing & {*r["depends_on"]})
        if consequence or (r["exception"] and r["column"] in broken):
            folded.append(r)
        else:
            primary.append(r)
    lines = [line for r in primary for line in describe(r)]
    if folded:
        lines.append(folded_line(folded, missing))
    return lines


def folded_line(folded: list[dict[str, Any]], missing: set[str]) -> str:
    """One line for the failures that follow from missing columns or from the problems above."""
    columns = sorted({c for r in folded for c in (missing & {*r["depends_on"]} or {r["column"]})})
    names = ", ".join(map(repr, columns[:SAMPLE])) + (", ..." if len(columns) > SAMPLE else "")
    why = "missing column(s)" if missing else "the problem(s) above on"
    raised = next((r for r in folded if r["exception"] and r["column"] not in missing), None)
    detail = (
        f"; e.g. {raised['type']} on {raised['column']!r}: {raised['exception']}" if raised else ""
    )
    return (
        f"{len(folded)} more expectation(s) could not run or only repeat the problem, "
        f"because of {why} {names}{detail}"
    )


def describe(r: dict[str, Any]) -> list[str]:
    """The user-facing line(s) for one failed expectation."""
    if r["exception"]:
        return [f"{r['type']} on {r['column']!r} could not run: {r['exception']}"]
    special = DESCRIBE.get(r["check"])
    return special(r) if special else [column_line(r)]


def _missing(r: dict[str, Any]) -> list[str]:
    return [f"expect_column_to_exist on {r['column']!r}: the column is missing from the data"]


def _no_rows(r: dict[str, Any]) -> list[str]:
    return [f"expect_table_row_count_to_be_between: {r['observed_value']} rows, need >= 1"]


def _min_rows(r: dict[str, Any]) -> list[str]:
    need = r["limit"]
    return [
        f"min rows per class: label {row['label']} has {row['rows']} rows, need >= {need}"
        for row in r["unexpected_rows"] or []
    ]


def _imbalance(r: dict[str, Any]) -> list[str]:
    return [
        f"class imbalance: the largest class has {r['observed_value']:.2f}x the rows of the "
        f"smallest, max {r['limit']}"
    ]


def _duplicates(r: dict[str, Any]) -> list[str]:
    return [
        f"duplicate rows: {r['unexpected_count']} of {r['element_count']} rows share their "
        f"feature values with another row ({r['unexpected_percent']:.2f}%), max {r['limit']:.2%}"
    ]


def _type(r: dict[str, Any]) -> list[str]:
    if r["unexpected_count"] is not None:  # an object column: GX checked each value's type
        return [column_line(r)]
    return [
        f"{r['type']} on {r['column']!r}: the column's type is {r['observed_value']} (not numeric)"
    ]


def _leakage(r: dict[str, Any]) -> list[str]:
    return [f"train/test leakage: {r['unexpected_count']} test rows identical to train rows"]


def _file_lines(r: dict[str, Any], why: Callable[[dict[str, Any]], str]) -> list[str]:
    """One line per bad file (its path first), at most SAMPLE, then how many more."""
    found = r["unexpected_rows"] or []
    lines = [f"{row['path']}: {why(row)}" for row in found[:SAMPLE]]
    if len(found) > SAMPLE:
        lines.append(f"... and {len(found) - SAMPLE} more file(s) ({r['check']})")
    return lines


def _undecodable(r: dict[str, Any]) -> list[str]:
    return _file_lines(r, lambda row: f"does not decode: {row['error']}")


def _mode(r: dict[str, Any]) -> list[str]:
    return _file_lines(r, lambda row: f"image mode {row['mode']} is not supported ({r['reason']})")


def _size(r: dict[str, Any]) -> list[str]:
    return _file_lines(
        r, lambda row: f"{row['pixels']:.0f} pixels, outside 1 .. {r['limit']} (image size)"
    )


DESCRIBE: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "expect_column_to_exist": _missing,
    "expect_table_row_count_to_be_between": _no_rows,
    "expect_column_values_to_be_in_type_list": _type,
    "min rows per class": _min_rows,
    "class imbalance": _imbalance,
    "duplicate rows": _duplicates,
    "train/test leakage": _leakage,
    "image decodes": _undecodable,
    "image mode": _mode,
    "image size": _size,
}


def column_line(r: dict[str, Any]) -> str:
    head = f"{r['type']} on {r['column']!r}"
    if r["unexpected_count"] is None:
        return f"{head}: observed {r['observed_value']} ({r['reason']})"
    values = [v for v in r["sample"] if v is not None]
    sample = f"; e.g. {', '.join(map(repr, values))}" if values else ""
    rows = r.get("source_rows")
    where = f"; source rows {', '.join(map(str, rows))}" if rows else ""
    count = f"{r['unexpected_count']} of {r['element_count']} rows unexpected"
    return f"{head}: {count} ({r['reason']}{sample}{where})"


def failure_message(summary: dict[str, Any]) -> str:
    head = (
        f"data validation failed: {summary['failed']} of {summary['evaluated']} expectations "
        f"failed (Data Docs: {summary['docs_index']})"
    )
    return "\n  ".join([head, *summary["failures"]])


# --- the stage --------------------------------------------------------------------------------


def run_gate(
    data: DataConfig, cfg: ValidateConfig, prepared_dir: Path, docs_dir: Path
) -> dict[str, Any]:
    """Run the gate; write Data Docs and `docs_dir/summary.json`; return the summary (no raise)."""
    splits = load_splits(prepared_dir)
    files = read_files(prepared_dir) if is_image_folder(data.source) else None
    clear_docs(docs_dir)
    context = gx_context(docs_dir)
    source = context.data_sources.add_pandas("prepared")
    manifest = Path(prepared_dir) / "manifest.json"
    learned = read_manifest(prepared_dir).get("learned_ranges") if manifest.is_file() else None
    checks = build_checks(data, cfg, splits, learned, files)
    records = [r for c in checks for r in run_check(context, source, c)]
    add_source_rows(records, prepared_dir)
    summary = summarize(records, Path(docs_dir) / DOCS_INDEX)
    write_json(Path(docs_dir) / "summary.json", summary)
    log.info("validate: %d of %d expectations passed", summary["successful"], summary["evaluated"])
    return summary


def validate(
    data: DataConfig, cfg: ValidateConfig, prepared_dir: Path, docs_dir: Path
) -> dict[str, Any]:
    """Run the gate; raise `DataValidationError` (after Data Docs and the summary) on failure."""
    summary = run_gate(data, cfg, prepared_dir, docs_dir)
    raise_for_failures(summary)
    return summary


def raise_for_failures(summary: dict[str, Any]) -> None:
    if not summary["success"]:
        raise DataValidationError(failure_message(summary))


def clear_docs(docs_dir: Path) -> None:
    """Drop the pages of an earlier run (only what GX writes), so the site shows this run only."""
    for name in ("expectations", "validations"):
        shutil.rmtree(Path(docs_dir) / name, ignore_errors=True)
    for name in (DOCS_INDEX, "summary.json", RUN_FILE):
        (Path(docs_dir) / name).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--prepared", type=Path, required=True, help="folder written by prepare")
    parser.add_argument("--docs", type=Path, required=True, help="Data Docs folder to write")
    parser.add_argument("--metrics", type=Path, required=True, help="summary JSON to write")
    args = parser.parse_args(argv)
    run_cli(lambda params: _run(params, args.prepared, args.docs, args.metrics), args.params)


def _run(params: Params, prepared_dir: Path, docs_dir: Path, metrics_path: Path) -> None:
    from pipelines.tracking import stage_run

    root = Path.cwd()
    content_hash = read_manifest(prepared_dir)["content_hash"]
    section = {"data": section_dict(params.data), "validate": section_dict(params.validate_)}
    with stage_run("validate", params, section, root, data_hash=content_hash) as run:
        summary = run_gate(params.data, params.validate_, prepared_dir, docs_dir)
        write_json(metrics_path, summary)
        run.log_metrics(
            {
                "expectations_evaluated": summary["evaluated"],
                "expectations_successful": summary["successful"],
                "expectations_failed": summary["failed"],
                "success": int(summary["success"]),
            }
        )
        run.record_in(docs_dir)  # for links to the logged copy (the Prefect UI's Data Docs link)
        run.log_artifacts(docs_dir, "data_docs")
        run.log_artifact(metrics_path)
        raise_for_failures(summary)  # after the artifacts: the run ends FAILED with its evidence


if __name__ == "__main__":
    main()
