"""`PrometheusSource` when the service is too busy to answer its own /metrics in time: that is a
breach (p99 at least the timeout), not a lost source; a refused connection still is one."""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator

import pytest

from pipelines.host import PrometheusSource, SourceError


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/metrics"


def test_a_read_that_times_out_is_a_reading_over_any_smaller_slo(silent_server: str) -> None:
    reading = PrometheusSource(silent_server, timeout_s=0.2).read()
    assert reading.p99_ms == pytest.approx(200.0)
    assert math.isnan(reading.in_flight)
    assert reading.timed_out  # the decision's line says so, not "p99 200.0 ms"


def test_a_refused_connection_is_a_lost_source() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/metrics"  # bound, not listening
        with pytest.raises(SourceError, match="/metrics"):
            PrometheusSource(url, timeout_s=0.2).read()
