"""A fixed-rate (open-loop) HTTP load generator for benchmarks/serve_load.py.

    python benchmarks/serve_openloop.py --url http://127.0.0.1:3000/predict --body-file B \
        --rate 500 --duration 10

Request i is due at start + i/rate, whether or not earlier ones have answered (`wrk` keeps a
fixed number of requests in flight instead, and `wrk2` is not packaged in Debian). Latency counts
from the due time, so a stalled server is charged for the requests queued behind the stall (no
coordinated omission). Keep-alive connections come from a pool; a new one opens when all are
busy, up to --max-connections. Prints one JSON object: achieved rate, latency percentiles (ms),
status counts, connection errors, the wall-clock time (Unix s) the fixed-rate run started,
connections opened and how late sends were (generator lag, to show the generator was not the
bottleneck). asyncio Protocols, no HTTP library: about 20 us of
CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from bench_args import positive_float, positive_int


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request at a time, answers by Content-Length."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        self.buffer = self.buffer[end + 4 + length :]
        self.waiter.set_result(int(head[0].split()[1]))
        self.waiter = None

    def request(self, payload: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self.waiter


class Load:
    """Sends `payload` at `rate` per second for `duration` seconds; collects the outcomes."""

    def __init__(
        self, url: str, body: bytes, max_connections: int, headers: dict[str, str] | None = None
    ) -> None:
        parts = urlsplit(url)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.payload = (
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
        ).encode() + body
        self.max_connections = max_connections
        self.idle: collections.deque[Connection] = collections.deque()
        self.opened = 0
        self.slots = asyncio.Semaphore(max_connections)
        self.latencies: list[float] = []
        self.statuses: collections.Counter[str] = collections.Counter()
        self.lags: list[float] = []
        self.started_at = 0.0

    async def connection(self) -> Connection:
        while self.idle:
            conn = self.idle.popleft()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(Connection, self.host, self.port)
        self.opened += 1
        return conn

    async def one(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        self.lags.append(loop.time() - due)  # the generator's own lateness
        async with self.slots:
            try:
                conn = await self.connection()
                status = await conn.request(self.payload)
            except (OSError, ConnectionError) as exc:
                self.statuses[type(exc).__name__] += 1
                return
            self.idle.append(conn)
        self.latencies.append(loop.time() - due)
        self.statuses[str(status)] += 1

    async def run(self, rate: float, duration: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        total = int(rate * duration)
        tasks: list[asyncio.Task[None]] = []
        start = loop.time() + 0.05
        self.started_at = time.time() + 0.05  # wall clock of the first due time
        i = 0
        while i < total:
            now = loop.time()
            while i < total and start + i / rate <= now:
                tasks.append(asyncio.create_task(self.one(start + i / rate)))
                i += 1
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        await asyncio.gather(*tasks)
        return self.summary(rate, loop.time() - start, total)

    def summary(self, rate: float, elapsed: float, total: int) -> dict[str, Any]:
        ms = np.asarray(self.latencies) * 1000 if self.latencies else np.zeros(1)
        ok = self.statuses.get("200", 0)
        return {
            "target_rate": rate,
            "started_at": self.started_at,
            "sent": total,
            "achieved_rate": ok / elapsed,
            "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()),
            "statuses": dict(self.statuses),
            "errors": total - ok,
            "connections_opened": self.opened,
            "send_lag_p99_ms": float(np.percentile(self.lags, 99) * 1000) if self.lags else 0.0,
        }


async def warm(load: Load, seconds: float) -> None:
    """A short unrecorded run at a low rate: connections open, server paths warm."""
    await load.run(50, seconds)
    load.latencies.clear()
    load.statuses.clear()
    load.lags.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--body-file", type=Path, required=True)
    parser.add_argument("--rate", type=positive_float, required=True, help="requests per second")
    parser.add_argument("--duration", type=positive_float, default=10.0, help="seconds")
    parser.add_argument("--max-connections", type=positive_int, default=256)
    args = parser.parse_args()
    load = Load(args.url, args.body_file.read_bytes(), args.max_connections)
    started = time.perf_counter()

    async def go() -> dict[str, Any]:
        await warm(load, 1.0)
        return await load.run(args.rate, args.duration)

    result = asyncio.run(go())
    result["cpu_s"] = time.process_time()
    result["wall_s"] = time.perf_counter() - started
    print(json.dumps(result))


if __name__ == "__main__":
    main()
