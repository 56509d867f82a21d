"""The reference for benchmarks/serve_load.py: a minimal hand-written FastAPI + uvicorn + ONNX
Runtime server for the same model, with the same /predict contract as service.py.

    python benchmarks/reference_server.py --model-dir DIR --port 8001 [--threads 1]

DIR holds model.onnx and metadata.json (as in a BentoML model). POST /predict takes
{"rows": [[64 finite numbers], ...]} and answers a list of {label, probabilities, model_version};
the same checks as the service (strict finite numbers, row length, the trained value range, the
row limit) answer 400. One process, the access log off, uvicorn's default loop and HTTP parser
(the ones BentoML's worker gets), no batching: each request is one ONNX Runtime call on the loop.
"""

import argparse
import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field

from pipelines.config import load_params
from pipelines.preprocessing import to_model_input
from pipelines.runtime import session, softmax

REPO = Path(__file__).resolve().parents[1]
MAX_ROWS = load_params(REPO / "params.yaml").serve.max_rows


def make_app(model_dir: Path, threads: int, version: str = "1") -> FastAPI:
    """The app: one ONNX Runtime session, the model's preprocessing spec and labels."""
    metadata = json.loads((model_dir / "metadata.json").read_text())
    spec, labels = metadata["preprocessing"], list(metadata["labels"])
    features, (low, high) = len(spec["feature_columns"]), spec["value_range"]
    sess = session(model_dir / "model.onnx", threads=threads)
    input_name = sess.get_inputs()[0].name

    def check(rows: list[list[float]]) -> list[list[float]]:
        if not rows or len(rows) > MAX_ROWS:
            raise ValueError(f"{len(rows)} rows: send 1 to {MAX_ROWS}")
        if any(len(row) != features for row in rows):
            raise ValueError(f"every row needs {features} values")
        x = np.asarray(rows, dtype=np.float64)
        if ((x < low) | (x > high)).any():
            raise ValueError(f"values outside the trained range [{low:g}, {high:g}]")
        return rows

    finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]

    class Body(BaseModel):
        rows: Annotated[list[list[finite]], AfterValidator(check)]

    app = FastAPI()

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": str(exc.errors())}, status_code=400)

    @app.post("/predict")
    async def predict(body: Body) -> Any:
        x = to_model_input(np.asarray(body.rows, dtype=np.float32), spec)
        probs = softmax(np.asarray(sess.run(None, {input_name: x})[0], dtype=np.float32))
        return [
            {"label": labels[k], "probabilities": p.tolist(), "model_version": version}
            for k, p in zip(probs.argmax(axis=1).tolist(), probs, strict=True)
        ]

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()
    app = make_app(args.model_dir, args.threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
