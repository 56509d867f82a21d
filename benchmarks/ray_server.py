"""A Ray Serve peer for benchmarks/serve_load.py: the same ONNX file, the same /predict JSON.

    python benchmarks/ray_server.py --model-dir DIR --port P [--threads 1]
        [--max-batch-size 64] [--batch-wait-ms 5] [--stats-file F]

One replica with Ray Serve's own batching (`@serve.batch(max_batch_size, batch_wait_timeout_s)`),
behind Ray Serve's HTTP proxy on P; a local Ray instance with one CPU and no dashboard, access
logs off (as BentoML's). GET
/readyz answers 200 once the replica is up. Runs until SIGTERM. Needs the `bench` extra.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any


def main() -> None:
    import numpy as np
    import ray
    from peer_model import PeerModel, server_arguments
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    args = server_arguments(__doc__, "--batch-wait-ms")

    quiet = {"enable_access_log": False, "log_level": "WARNING"}  # as BentoML's access log off

    @serve.deployment(max_ongoing_requests=max(256, args.max_batch_size), logging_config=quiet)
    class Classifier:
        def __init__(self) -> None:
            self.model = PeerModel(args.model_dir, args.threads, args.stats_file)

        @serve.batch(
            max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000
        )
        async def predict(self, requests: list[np.ndarray]) -> list[Any]:
            return self.model.predict(requests)

        async def __call__(self, request: Request) -> Any:
            if request.method == "GET":
                return JSONResponse({"status": "ok"})
            try:
                x = self.model.parse(await request.body())
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            return JSONResponse(await self.predict(x))

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config=quiet)
    serve.run(Classifier.bind(), route_prefix="/", blocking=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    # SIGTERM reaches the whole process group (benchmarks' stop_group): Ray's GCS and raylet are
    # stopping too, so a graceful serve.shutdown() would wait ~60 s for them; the replica, proxy
    # and controller processes exit by themselves once their raylet is gone.
    os._exit(0)


if __name__ == "__main__":
    main()
