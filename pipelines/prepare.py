"""`prepare`: read the configured source, split it train/val/test by seed, write Parquet + manifest.

Checks here are only what splitting needs (a readable table with the label column); the
`validate` stage is the data gate, so odd values pass through to be reported there. A CSV is read
with only empty cells as nulls: a text such as `n/a`, `NA` or `NaN` in a numeric column stays
text, so `validate` reports it as non-numeric (the manifest names its source rows), not as null.
An infinite number (`inf`, `Infinity`, `1e999`, a Parquet float's inf) is the one value rejected
here, before anything is written: no range holds it, and value_range `learn` would learn from it.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.artifacts import atomic_path, file_sha256, read_json, write_json
from pipelines.cli import run_cli
from pipelines.config import (
    LEARN,
    DataConfig,
    Params,
    PrepareConfig,
    is_image_folder,
    section_dict,
)
from pipelines.errors import DataSourceError
from pipelines.preprocessing import make_spec

SPLITS = ("train", "val", "test")
SAMPLE = 5  # example values and source rows kept per column
# data.value_range `learn`: each column's training-split [min, max], widened on both sides by this
# share of its span (of max(|value|, 1) for a constant column). A guard against wrong data (a
# column in other units, a shifted column), not an outlier test: the val/test values of
# heavy-tailed columns (scikit-learn's breast_cancer: area_error, concavity_error) lie up to 1.6
# spans beyond the training split's range (10 split seeds; wine: 0.4); half a span failed 2 of
# those 10 splits at `validate`.
LEARN_MARGIN = 2.0
log = logging.getLogger(__name__)


def load_source(data: DataConfig, root: Path) -> tuple[pd.DataFrame, str | None]:
    """The source as a frame of feature columns + label, and the source file's sha256."""
    if data.source == "digits":
        return _digits(data), None
    path = root / data.source
    frame = _read_table(path)
    if data.label_column not in frame.columns:
        raise DataSourceError(
            f"{data.source}: label column {data.label_column!r} not found; "
            f"columns are: {', '.join(map(str, frame.columns)) or '(none)'}"
        )
    keep = [c for c in data.feature_columns if c in frame.columns] + [data.label_column]
    dropped = sorted(set(map(str, frame.columns)) - set(keep))
    if dropped:
        log.info("prepare: ignoring columns not in data.features: %s", ", ".join(dropped))
    return frame[keep].reset_index(drop=True), file_sha256(path)


def _digits(data: DataConfig) -> pd.DataFrame:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    if len(data.feature_columns) != bunch.data.shape[1]:
        raise DataSourceError(
            f"digits has {bunch.data.shape[1]} features but data.features names "
            f"{len(data.feature_columns)}"
        )
    frame = pd.DataFrame(bunch.data, columns=data.feature_columns)
    frame[data.label_column] = bunch.target.astype(np.int64)
    return frame


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataSourceError(f"{path}: no such file (data.source in params.yaml)")
    if path.stat().st_size == 0:
        raise DataSourceError(f"{path}: the file is empty (no header, no rows)")
    try:
        if path.suffix.lower() == ".csv":  # only an empty cell is a null, not "NA", "n/a" ...
            return pd.read_csv(path, keep_default_na=False, na_values=[""])
        return pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataSourceError(f"{path}: cannot be read as a table: {exc}") from exc


def numeric_columns(data: DataConfig) -> list[str]:
    """The columns that must hold numbers: the features, and the label when labels are ints."""
    numeric_label = all(isinstance(label, int) for label in data.labels)
    return [*data.feature_columns, *([data.label_column] if numeric_label else [])]


def as_numbers(column: pd.Series) -> pd.Series:
    """A text column with its numbers parsed ('2.5' -> 2.5, whole numbers as int); text that is
    no number ('n/a', 'NaN', 'x') stays text, nulls stay null. Numeric columns come back as is."""
    if pd.api.types.is_numeric_dtype(column):
        return column
    numbers = pd.to_numeric(column, errors="coerce")
    values = [
        (int(n) if float(n).is_integer() else float(n)) if pd.notna(n) else v
        for v, n in zip(column.astype(object), numbers, strict=True)
    ]
    return pd.Series(values, index=column.index, name=column.name, dtype=object)


def non_numeric_cells(frame: pd.DataFrame, columns: list[str]) -> dict[str, dict[str, Any]]:
    """Per column that must be numeric: how many cells hold text that is no number, a few
    distinct examples, and their source rows (1 = the first row after a CSV's header)."""
    found = {}
    for column in (c for c in columns if c in frame.columns):
        values = as_numbers(frame[column])
        bad = values.map(lambda v: isinstance(v, str))
        if bad.any():
            texts = values[bad]
            found[str(column)] = {
                "count": int(bad.sum()),
                "examples": list(dict.fromkeys(texts))[:SAMPLE],
                "rows": [int(i) + 1 for i in texts.index[:SAMPLE]],
            }
    return found


def non_finite_cells(frame: pd.DataFrame, columns: list[str]) -> dict[str, dict[str, Any]]:
    """Per column that must be numeric: how many cells hold an infinite number (a CSV's `inf`,
    `-inf`, `Infinity`, `1e999`; a Parquet float's inf), a few distinct examples, and their
    source rows (1 = the first row after a CSV's header). A NaN is a null, not listed here."""
    found = {}
    for column in (c for c in columns if c in frame.columns):
        values = as_numbers(frame[column])
        bad = values.map(lambda v: isinstance(v, (int, float)) and bool(np.isinf(v)))
        if bad.any():
            cells = values[bad]
            found[str(column)] = {
                "count": int(bad.sum()),
                "examples": list(dict.fromkeys(map(float, cells)))[:SAMPLE],
                "rows": [int(i) + 1 for i in cells.index[:SAMPLE]],
            }
    return found


def reject_non_finite(source: str, frame: pd.DataFrame, columns: list[str]) -> None:
    """Raise DataSourceError naming each column with infinite numbers, their count and source
    rows: an infinite feature has no place in any range (value_range `learn` would learn
    [-inf, inf] from it, and training fails on it), so nothing is written."""
    found = non_finite_cells(frame, columns)
    if found:
        parts = []
        for column, cells in found.items():
            more = ", ..." if cells["count"] > len(cells["rows"]) else ""
            parts.append(
                f"column {column!r} has {cells['count']} infinite value(s) "
                f"({', '.join(map(str, cells['examples']))}) at source row(s) "
                f"{', '.join(map(str, cells['rows']))}{more}"
            )
        raise DataSourceError(f"{source}: {'; '.join(parts)}; numbers must be finite")


def split(frame: pd.DataFrame, label: str, cfg: PrepareConfig) -> dict[str, pd.DataFrame]:
    """Stratified train/val/test split by seed; plain random where stratifying is impossible
    (nulls in the label, a class with too few rows); all rows in train where even that is (a
    handful of rows): `validate` then reports why."""
    unsplit = {"train": frame, "val": frame.iloc[:0], "test": frame.iloc[:0]}
    if len(frame) < 3:
        return unsplit
    holdout = cfg.val_fraction + cfg.test_fraction
    try:
        rest, held = _split(frame, holdout, label, cfg.seed, stratify=True)
        val, test = _split(held, cfg.test_fraction / holdout, label, cfg.seed, stratify=True)
    except ValueError as exc:
        log.warning("prepare: cannot stratify (%s); splitting at random", exc)
        try:
            rest, held = _split(frame, holdout, label, cfg.seed, stratify=False)
            val, test = _split(held, cfg.test_fraction / holdout, label, cfg.seed, stratify=False)
        except ValueError as again:
            log.warning("prepare: cannot split %d rows (%s); all go to train", len(frame), again)
            return unsplit
    return {"train": rest, "val": val, "test": test}


def _split(
    frame: pd.DataFrame, fraction: float, label: str, seed: int, *, stratify: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    from sklearn.model_selection import train_test_split

    strata = frame[label] if stratify else None
    if stratify and frame[label].isna().any():
        raise ValueError("the label column has nulls")
    first, second = train_test_split(frame, test_size=fraction, random_state=seed, stratify=strata)
    return first.sort_index(), second.sort_index()


def learn_ranges(train: pd.DataFrame, columns: list[str]) -> dict[str, list[float]]:
    """data.value_range `learn`: per feature column, [min - m, max + m] over the training split's
    finite numbers (text, nulls and infinities ignored: `validate` reports them), m =
    LEARN_MARGIN x the span: never an infinite bound. A column without a single finite number
    gets [0, 0] (validate then fails it, naming the column).
    Raises DataSourceError naming the feature columns the data does not have (nothing to learn
    from: `validate` would name them too, but prepare cannot write its manifest without them)."""
    missing = [c for c in columns if c not in train.columns]
    if missing:
        have = ", ".join(map(str, list(train.columns)[:12]))
        raise DataSourceError(
            f"data.features: {', '.join(missing)}: not a column of the data (value_range "
            f"`learn` needs every feature; columns: {have})"
        )
    ranges = {}
    for column in columns:
        values = pd.to_numeric(train[column], errors="coerce")
        values = values[np.isfinite(values.astype("float64"))]  # never an infinite bound
        if values.empty:
            ranges[column] = [0.0, 0.0]
            continue
        low, high = float(values.min()), float(values.max())
        margin = LEARN_MARGIN * ((high - low) or max(abs(low), 1.0))
        ranges[column] = [low - margin, high + margin]
    return ranges


def content_hash(splits: dict[str, pd.DataFrame]) -> str:
    """A hash of the split contents (values, columns and split membership), not of file bytes."""
    digest = hashlib.sha256()
    for name in SPLITS:
        frame = splits[name]
        digest.update(f"{name}:{list(frame.columns)}:{len(frame)}".encode())
        digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def manifest(
    data: DataConfig,
    splits: dict[str, pd.DataFrame],
    source_sha256: str | None,
    non_numeric: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    frame = splits["train"]
    learned = learn_ranges(frame, data.feature_columns) if data.value_range == LEARN else None
    ranges = data.ranges(learned)
    return {
        "source": data.source,
        "source_sha256": source_sha256,
        "label_column": data.label_column,
        "labels": list(data.labels),
        "feature_columns": data.feature_columns,
        "schema": {str(c): str(t) for c, t in frame.dtypes.items()},
        "image_shape": list(data.image_shape) if data.image_shape else None,
        "learned_ranges": learned,  # data.value_range `learn`: per column, from the train split
        "preprocessing": make_spec(
            data.feature_columns, ranges, data.image_shape, data.model_scaling, data.channels
        ),
        "splits": {
            name: {
                "rows": len(part),
                "class_counts": {
                    str(k): int(v) for k, v in part[data.label_column].value_counts().items()
                },
            }
            for name, part in splits.items()
        },
        "content_hash": content_hash(splits),
        "non_numeric": non_numeric or {},  # text in numeric columns, by source row
    }


def prepare(data: DataConfig, cfg: PrepareConfig, root: Path, out_dir: Path) -> dict[str, Any]:
    """Write `out_dir`/{train,val,test}.parquet and manifest.json; return the manifest. A folder
    of images (`prepare_images`) also writes `out_dir`/files.csv."""
    if is_image_folder(data.source):
        return prepare_images(data, cfg, root, out_dir)
    frame, source_sha = load_source(data, root)
    reject_non_finite(data.source, frame, numeric_columns(data))
    cells = non_numeric_cells(frame, numeric_columns(data))
    for column in (c for c in numeric_columns(data) if c in frame.columns and c not in cells):
        frame[column] = pd.to_numeric(frame[column])  # numbers stored as text: numbers
    for column, found in cells.items():
        log.warning(
            "prepare: %s: column %r has %d non-numeric value(s), e.g. %s at source row(s) %s; "
            "validate will reject them",
            data.source,
            column,
            found["count"],
            ", ".join(map(repr, found["examples"])),
            ", ".join(map(str, found["rows"])),
        )
    splits = split(frame, data.label_column, cfg)
    if data.value_range == LEARN:  # a feature it cannot learn is named before anything is written
        learn_ranges(splits["train"], data.feature_columns)
    for name, part in splits.items():
        with atomic_path(out_dir / f"{name}.parquet") as tmp:
            part.reset_index(drop=True).to_parquet(tmp, index=False)
    result = manifest(data, splits, source_sha, cells)
    write_json(out_dir / "manifest.json", result)  # last: its presence means a complete output
    return result


def prepare_images(
    data: DataConfig, cfg: PrepareConfig, root: Path, out_dir: Path
) -> dict[str, Any]:
    """A folder of images: `files.csv` lists every file (`pipelines.image_folder.FILE_COLUMNS`
    + its split), the splits hold the decoded pixel rows of the files that decode (+ path,
    sha256), split by content (`assign_splits`). Files that do not decode are listed, in no
    split: `validate` names them."""
    from pipelines.image_folder import assign_splits, pixel_rows, scan
    from pipelines.preprocessing import IMAGE_MODES

    folder = root / data.source
    files = scan(folder, data.labels)
    files["split"] = assign_splits(files, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    spec = make_spec(
        data.feature_columns,
        data.ranges(),
        data.image_shape,
        data.model_scaling,
        channels=data.channels,
        image_folder=True,
    )
    splits = {}
    for name in SPLITS:
        chosen = files[files["split"] == name].reset_index(drop=True)
        frame = pixel_rows(folder, chosen, spec, data.feature_columns)
        frame.insert(len(data.feature_columns), data.label_column, chosen["label"].to_numpy())
        splits[name] = frame
    broken = files[files["error"].notna()]
    for path, error in zip(broken["path"][:SAMPLE], broken["error"][:SAMPLE], strict=False):
        log.warning(
            "prepare: %s/%s does not decode (%s); validate will reject it", folder, path, error
        )
    odd = files[files["error"].isna() & ~files["mode"].isin(IMAGE_MODES)]
    for path, mode in zip(odd["path"][:SAMPLE], odd["mode"][:SAMPLE], strict=False):
        log.warning(
            "prepare: %s/%s: image mode %s is not supported; validate will reject it",
            folder,
            path,
            mode,
        )
    with atomic_path(out_dir / "files.csv") as tmp:
        files.to_csv(tmp, index=False)
    for name, part in splits.items():
        with atomic_path(out_dir / f"{name}.parquet") as tmp:
            part.to_parquet(tmp, index=False)
    files_sha = hashlib.sha256(files.to_csv(index=False).encode()).hexdigest()
    result = manifest(data, splits, files_sha)
    result["preprocessing"] = spec
    result["image_folder"] = {"root": data.source, "files": len(files), "broken": len(broken)}
    write_json(out_dir / "manifest.json", result)  # last: its presence means a complete output
    return result


def read_files(prepared_dir: Path) -> pd.DataFrame:
    """The file list `prepare` wrote for a folder of images (path, label, sha256, ..., split)."""
    path = Path(prepared_dir) / "files.csv"
    if not path.is_file():
        raise DataSourceError(f"{path}: no such file; run the prepare stage first")
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def read_manifest(prepared_dir: Path) -> dict[str, Any]:
    """The manifest of a prepared folder; a clear error when `prepare` has not run."""
    path = Path(prepared_dir) / "manifest.json"
    if not path.is_file():
        raise DataSourceError(f"{path}: no such file; run the prepare stage first")
    manifest: dict[str, Any] = read_json(path)
    return manifest


def read_split(out_dir: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(Path(out_dir) / f"{name}.parquet")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True, help="output folder of the splits")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    args = parser.parse_args(argv)
    run_cli(lambda params: _run(params, args.out, args.metrics), args.params)


def _run(params: Params, out_dir: Path, metrics_path: Path) -> None:
    from pipelines.tracking import stage_run

    root = Path.cwd()
    section = {"data": section_dict(params.data), "prepare": section_dict(params.prepare)}
    with stage_run("prepare", params, section, root) as run:
        result = prepare(params.data, params.prepare, root, out_dir)
        metrics = {f"rows_{name}": split_["rows"] for name, split_ in result["splits"].items()}
        write_json(metrics_path, metrics)
        run.set_tags({"data.content_hash": result["content_hash"]})
        run.log_dataset(params, result["content_hash"], "prepare")
        run.log_metrics(metrics)
        run.log_artifact(out_dir / "manifest.json")
        log.info("prepare: %s -> %s (%s)", params.data.source, out_dir, metrics)


if __name__ == "__main__":
    main()
