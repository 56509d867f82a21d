"""The benchmarks' command lines: a bad argument is one error line and exit 2, before any setup
(argparse's usage above it), never a silent exit 0 or a traceback after a long start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.deploy_rollout import model_rates
from benchmarks.serve_load import KNOWN_SERVERS, connection_counts, server_names
from benchmarks.shared_host import scenario_letters
from tests.helpers import REPO

BAD = [
    ("cascade.py", ["--cases", "foo"], "argument --cases: invalid choice: 'foo'"),
    ("prune_speed.py", ["--cases", "digits", "bar"], "argument --cases: invalid choice: 'bar'"),
    ("shared_host.py", ["--scenarios", "z"], "argument --scenarios: unknown 'z'; give letters"),
    ("shared_host.py", ["--scenarios", ""], "argument --scenarios: none given"),
    ("serve_load.py", ["--servers", "service,nginx"], "argument --servers: unknown 'nginx'"),
    ("serve_load.py", ["--connections", "1,x"], "argument --connections: '1,x': not comma"),
    ("serve_load.py", ["--connections", "0,4"], "argument --connections: '0,4': every count"),
    ("deploy_rollout.py", ["--rates", "100"], "argument --rates: '100': give 2 positive"),
    ("deploy_rollout.py", ["--rates", "100,-1"], "argument --rates: '100,-1': give 2 positive"),
    # numbers out of range (benchmarks/bench_args.py), never a silent substitute or a late failure
    ("shared_host.py", ["--resume-below", "1.5"], "argument --resume-below: '1.5': give a number"),
    ("shared_host.py", ["--resume-below", "0"], "argument --resume-below: '0': give a number"),
    ("shared_host.py", ["--slo-ms", "0"], "argument --slo-ms: '0': give a number above 0"),
    ("shared_host.py", ["--rounds", "0"], "argument --rounds: '0': give a whole number"),
    ("shared_host.py", ["--seconds", "nan"], "argument --seconds: 'nan': not a finite number"),
    ("shared_host.py", ["--rate", "-10"], "argument --rate: '-10': give a number above 0"),
    ("shared_host.py", ["--scenarios", "d"], "scenarios d take their SLO from (a)"),
    ("serve_openloop.py", ["--url", "http://x", "--rate", "0"], "argument --rate: '0': give"),
    ("serve_load.py", ["--seconds", "-1"], "argument --seconds: '-1': give a number above 0"),
    ("train_throughput.py", ["--repeats", "0"], "argument --repeats: '0': give a whole number"),
    ("prune_speed.py", ["--ratios", "0.3", "1"], "argument --ratios: '1': give a number between"),
    ("tune_compute.py", ["--target", "1.5"], "argument --target: '1.5': give a number above 0"),
    ("image_train_throughput.py", ["--workers", "-1"], "argument --workers: '-1': give a whole"),
]


# The peers' own servers: they need the `bench` extra (ray, litserve), never in the base install.
NEEDS_BENCH_EXTRA = {"litserve_server.py", "ray_server.py"}
SCRIPTS = sorted(
    path.name
    for path in (REPO / "benchmarks").glob("*.py")
    if path.name not in NEEDS_BENCH_EXTRA and "__main__" in path.read_text()
)


def run_as_a_user(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python benchmarks/<script> ...` from the checkout, as the README gives it: no PYTHONPATH
    (pytest's own pythonpath setting would otherwise hide a script that cannot find its
    imports)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_starts_as_the_readme_runs_it(script: str) -> None:
    """prune_speed.py once failed at `python benchmarks/prune_speed.py --help` with
    `No module named 'benchmarks'`, while the tests (run with the repository on the path) passed."""
    done = run_as_a_user(script, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: "), done.stdout


@pytest.mark.parametrize(("script", "args", "shown"), BAD, ids=[f"{b[0]} {b[1]}" for b in BAD])
def test_a_bad_argument_is_one_line_and_exit_2(script: str, args: list[str], shown: str) -> None:
    done = run_as_a_user(script, *args)
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and shown in errors[0], done.stderr


def test_good_arguments_are_read() -> None:
    assert scenario_letters("abdi") == "abdi"
    assert server_names(" service, ray,") == ("service", "ray")
    assert {"service_batched", "service_unbatched", "litserve"} <= set(KNOWN_SERVERS)
    assert connection_counts("1,8,64") == (1, 8, 64)
    assert model_rates("100,40.5") == {"digits": 100.0, "large": 40.5}
