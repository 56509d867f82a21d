"""The flows take paths from dvc.yaml's outputs (flows/dvc_outputs.py), never a copy in code."""

import textwrap
from pathlib import Path

import pytest
from dvc.stage.exceptions import StageNotFound

from flows.dvc_outputs import data_docs_dir, prepared_dir, stage_output
from flows.reporting import data_docs_index
from tests.helpers import REPO


def test_the_project_outputs_come_from_its_dvc_yaml() -> None:
    assert prepared_dir(REPO) == REPO / "data/prepared"
    assert stage_output(REPO, "select") == REPO / "models/select"  # not metrics/select.json
    assert stage_output(REPO, "export@teacher") == REPO / "models/export/teacher.onnx"
    assert data_docs_dir(REPO) == REPO / "reports/validate"
    assert data_docs_index(REPO) == REPO / "reports/validate/index.html"


def write_dvc_yaml(root: Path, text: str) -> Path:
    root.mkdir(exist_ok=True)
    (root / "dvc.yaml").write_text(textwrap.dedent(text))
    return root


def test_another_validate_output_is_followed(tmp_path: Path) -> None:
    """A checkout whose dvc.yaml puts the Data Docs (and the prepared data) elsewhere: the flows
    follow it (no DVC repository needed, a copy of dvc.yaml is enough)."""
    root = write_dvc_yaml(
        tmp_path / "checkout",
        """
        stages:
          prepare:
            cmd: python -m pipelines.prepare --out work/data --metrics m/prepare.json
            outs: [work/data]
            metrics: [{m/prepare.json: {cache: false}}]
          validate:
            cmd: python -m pipelines.validate --prepared work/data --docs site/quality
            deps: [work/data]
            metrics: [{m/validate.json: {cache: false}}]
            outs: [{site/quality: {cache: false}}]
        """,
    )
    assert prepared_dir(root) == root / "work/data"
    assert data_docs_dir(root) == root / "site/quality"
    assert data_docs_index(root) == root / "site/quality/index.html"


def test_no_validate_stage_means_no_data_docs_and_a_missing_stage_is_named(
    tmp_path: Path,
) -> None:
    root = write_dvc_yaml(
        tmp_path,
        """
        stages:
          score:
            cmd: python score.py
            metrics: [{metrics/score.json: {cache: false}}]
        """,
    )
    assert data_docs_dir(root) is None and data_docs_index(root) is None
    with pytest.raises(StageNotFound, match="prepare"):
        prepared_dir(root)
    with pytest.raises(LookupError, match="stage 'score' declares no outs"):
        stage_output(root, "score")
