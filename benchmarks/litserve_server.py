"""A LitServe peer for benchmarks/serve_load.py: the same ONNX file, the same /predict JSON.

    python benchmarks/litserve_server.py --model-dir DIR --port P [--threads 1]
        [--max-batch-size 64] [--batch-timeout-ms 5] [--stats-file F]

LitServe's own batching (`LitAPI(max_batch_size=..., batch_timeout=...)`): one inference worker
process (`workers_per_device=1` on the CPU), one API server process, uvicorn's access log off.
/readyz is LitServe's health check. Needs the `bench` extra (`pip install -e ".[bench]"`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from fastapi import HTTPException
from peer_model import PeerModel, server_arguments


class Api(ls.LitAPI):  # type: ignore[misc]
    """PeerModel behind LitServe; its batches are lists of requests' rows."""

    def __init__(self, model_dir: Path, threads: int, stats: Path | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_dir, self.threads, self.stats_file = model_dir, threads, stats

    def setup(self, device: str) -> None:
        self.model = PeerModel(self.model_dir, self.threads, self.stats_file)

    def decode_request(self, request):  # type: ignore[no-untyped-def]
        """`request`: the parsed JSON body (LitServe parses it when the parameter is not
        annotated)."""
        try:
            return self.model.parse(request)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None

    def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return inputs  # predict concatenates them and splits the answers back

    def predict(self, x: np.ndarray | list[np.ndarray]) -> Any:
        return self.model.predict(x) if isinstance(x, list) else self.model.predict([x])[0]

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: Any) -> Any:
        return output


def main() -> None:
    args = server_arguments(__doc__, "--batch-timeout-ms")
    api = Api(
        args.model_dir,
        args.threads,
        args.stats_file,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout_ms / 1000,
    )
    server = ls.LitServer(
        api, accelerator="cpu", workers_per_device=1, timeout=10, healthcheck_path="/readyz"
    )
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
        access_log=False,
    )


if __name__ == "__main__":
    main()
