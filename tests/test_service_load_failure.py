"""A model folder that fails to load (a corrupt model.onnx, a cascade.json that is not JSON):
`bentoml serve` keeps one worker up that answers /readyz 503 at once, names the file on GET
/metadata and in one log line, and refuses predictions with 503; no restart loop, no traceback.
A real `bentoml serve` in a subprocess (the in-process app is the session's shared one)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from flows.package import save_bento_model
from pipelines.cascade import CASCADE, STUDENT
from tests.helpers import graphs
from tests.helpers.serving import MODEL_NAME, REPO, live_service, tiny_bento_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model's folder (model.onnx, metadata.json, golden.json)."""
    root = tmp_path_factory.mktemp("good")
    tiny_bento_model(root)
    return root / "model"


def corrupt_graph(folder: Path) -> str:
    (folder / "model.onnx").write_bytes(b"not a protobuf at all")
    return "model.onnx"


def cascade_not_json(folder: Path) -> str:
    shutil.copy(folder / "model.onnx", folder / STUDENT)
    (folder / CASCADE).write_text("{not json")
    return CASCADE


BREAKAGES = [corrupt_graph, cascade_not_json, graphs.labels_cut, graphs.student_of_three_classes]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__)
def test_a_model_that_fails_to_load_is_reported_not_restarted(
    tmp_path: Path, good_folder: Path, breakage: object
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(good_folder, folder)
    named = breakage(folder)  # type: ignore[operator]
    if breakage in (corrupt_graph, cascade_not_json):
        tag = save_bento_model(MODEL_NAME, folder, "9")
    else:  # the graph unchanged: `package` would reuse the good model (its digests match)
        tag = graphs.save_folder("mismatched", folder)
    env = {"MLOPS_MODEL_TAG": tag, "MLOPS_API_KEY": ""}
    log = tmp_path / "serve.log"
    with live_service(env=env, log=log, ready_status=503, timeout_s=120) as url:
        start = time.monotonic()
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 503
        assert time.monotonic() - start < 5  # answered, not hung
        assert httpx.get(f"{url}/livez", timeout=5).status_code == 200
        described = httpx.get(f"{url}/metadata", timeout=5)
        assert described.status_code == 503
        assert described.json()["error"].startswith("model failed to load: ")
        assert named in described.json()["error"]
        predicted = httpx.post(f"{url}/predict", json={"rows": [[0.0] * 64]}, timeout=5)
        assert predicted.status_code == 503 and "failed to load" in predicted.json()["error"]
    text = log.read_text(errors="replace")
    failures = [line for line in text.splitlines() if "model failed to load" in line]
    assert len(failures) == 1 and named in failures[0], text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def test_a_bad_serve_override_stops_bentoml_serve_with_one_line(tmp_path: Path) -> None:
    """MLOPS_SERVE_OVERRIDES is read when service.py is imported, in `bentoml serve`'s own
    process: one `error:` line naming the variable and the key, exit 2, no traceback."""
    env = {**os.environ, "MLOPS_SERVE_OVERRIDES": '{"max_rows": "256"}'}
    command = [sys.executable, "-m", "bentoml", "serve", "service:Classifier", "--port", "1"]
    done = subprocess.run(
        command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2, lines
    assert lines == [
        "error: MLOPS_SERVE_OVERRIDES: invalid parameters: serve.max_rows: a number is required, "
        "not text (quoted in YAML?) (got '256')"
    ]
