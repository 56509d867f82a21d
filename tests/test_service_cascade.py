"""service.py serving a cascade (pipelines/cascade.py), over HTTP: a real `bentoml serve` in a
subprocess (the in-process app is the session's shared one, serving a single model)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from flows.package import save_bento_model
from pipelines.cascade import CASCADE, STUDENT, route
from pipelines.prepare import read_split
from pipelines.preprocessing import to_model_input
from pipelines.runtime import logits, read_metadata, session, softmax
from tests.helpers.cascade import cascade_folder
from tests.helpers.serving import MODEL_NAME, live_service

pytestmark = pytest.mark.slow


def cascade_rows(url: str) -> dict[str, float]:
    """mlops_cascade_rows_total per model, from the service's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "mlops_cascade_rows_total":
                found[sample.labels["model"]] = sample.value
    return found


@pytest.fixture(scope="module")
def cascade(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return cascade_folder(tmp_path_factory.mktemp("cascade"))


@pytest.mark.parametrize("batching", [False, True], ids=["unbatched", "batched"])
def test_the_service_answers_from_both_models_and_counts_them(
    tmp_path: Path, cascade: tuple[Path, Path], batching: bool
) -> None:
    """/metadata names the cascade and its threshold; each row's answer is the student's when
    it is sure (>= the threshold), else the teacher's; the counter per model adds up."""
    folder, prepared = cascade
    tag = save_bento_model(MODEL_NAME, folder, "7")
    spec = read_metadata(folder / "model.onnx")["preprocessing"]
    rows = read_split(prepared, "test")[spec["feature_columns"]].to_numpy(np.float64)[:200]
    threshold = json.loads((folder / CASCADE).read_text())["threshold"]
    teacher, student = session(folder / "model.onnx"), session(folder / STUDENT)
    x = to_model_input(rows.astype(np.float32), spec)
    expected, sure = route(x, lambda r: logits(student, r), lambda r: logits(teacher, r), threshold)
    assert 0 < sure.sum() < len(sure)  # both models answer some rows

    overrides = json.dumps({"max_batch_size": 64 if batching else 1})
    env = {"MLOPS_MODEL_TAG": tag, "MLOPS_API_KEY": "", "MLOPS_SERVE_OVERRIDES": overrides}
    with live_service(env=env, log=tmp_path / "serve.log") as url:
        described = httpx.get(f"{url}/metadata", timeout=10).json()
        assert described["engine"] == "cascade"
        assert described["cascade"]["threshold"] == threshold
        answers = []
        for chunk in np.array_split(rows, 4):  # 4 requests of 50 rows
            response = httpx.post(f"{url}/predict", json={"rows": chunk.tolist()}, timeout=30)
            assert response.status_code == 200, response.text
            answers += response.json()
        counted = cascade_rows(url)
    probabilities = np.array([a["probabilities"] for a in answers])
    np.testing.assert_allclose(probabilities, softmax(expected), atol=1e-5)
    assert [a["label"] for a in answers] == expected.argmax(axis=1).tolist()
    assert counted == {"student": float(sure.sum()), "teacher": float((~sure).sum())}
