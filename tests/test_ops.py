"""ops/: the start script refuses to start a server or worker without its credentials (one line,
exit 2), and the example configs are valid for the tools that read them (systemd unit syntax,
nginx's own `nginx -t`). The servers themselves start, with auth on, in tests/test_two_hosts.py."""

from __future__ import annotations

import configparser
import datetime
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

START = REPO / "ops" / "start"
UNITS = sorted((REPO / "ops" / "systemd").glob("*.service"))


def start(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLOPS_", "MLFLOW_"))
    }
    return subprocess.run(
        [str(START), *args],
        check=False,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (("prefect-server",), {}, "PREFECT_SERVER_API_AUTH_STRING is not set"),
        (("prefect-server",), {"PREFECT_SERVER_API_AUTH_STRING": "nocolon"}, "user:password"),
        (
            ("mlflow-server",),
            {"MLOPS_MLFLOW_HOME": "/nonexistent"},
            "MLFLOW_FLASK_SERVER_SECRET_KEY",
        ),
        (
            ("worker", "training"),
            {"PREFECT_API_URL": "http://x:4200/api"},
            "PREFECT_API_AUTH_STRING",
        ),
        (("worker", "gpu"), {}, "PREFECT_API_URL"),
        (("nonsense",), {}, "usage: ops/start"),
    ],
)
def test_start_refuses_without_credentials(
    args: tuple[str, ...], env: dict[str, str], named: str
) -> None:
    done = start(*args, **env)
    assert done.returncode == 2
    assert named in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_mlflow_server_needs_the_admin_password_on_its_first_start(tmp_path: Path) -> None:
    done = start(
        "mlflow-server", MLOPS_MLFLOW_HOME=str(tmp_path), MLFLOW_FLASK_SERVER_SECRET_KEY="k"
    )
    assert done.returncode == 2 and "MLFLOW_AUTH_ADMIN_PASSWORD is not set" in done.stderr


def test_an_inference_worker_needs_the_serving_variables() -> None:
    env = {
        "PREFECT_API_URL": "http://train:4200/api",
        "PREFECT_API_AUTH_STRING": "u:p",
        "MLFLOW_TRACKING_URI": "http://train:5000",
        "MLFLOW_TRACKING_USERNAME": "inference",
        "MLFLOW_TRACKING_PASSWORD": "p",
        "MLOPS_PROJECT_DIR": "/srv/mlops",
    }
    done = start("worker", "inference", **env)
    assert done.returncode == 2 and "MLOPS_SERVING_HOME is not set" in done.stderr


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_units_run_ops_start_with_an_environment_file(unit: Path) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(unit)
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    command = parser["Service"]["ExecStart"].split()
    if unit.name == "mlops-serving.service":
        assert command[:2] == ["/usr/bin/supervisord", "-n"]
        return
    assert parser["Service"]["EnvironmentFile"].startswith("/etc/mlops/")
    assert command[0] == "/srv/mlops/ops/start"
    assert command[1:] in (["prefect-server"], ["mlflow-server"], ["worker", "%i"])


@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx (.ci/run installs it)")
def test_the_tls_site_example_passes_nginx_t(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "infer.example.lan")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    site = (REPO / "ops" / "nginx" / "mlops-inference-tls.conf").read_text()
    site = site.replace("/etc/ssl/certs/infer.example.lan.pem", str(tmp_path / "c.pem"))
    site = site.replace("/etc/ssl/private/infer.example.lan.key", str(tmp_path / "k.key"))
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'};\n"
        f"events {{}}\nhttp {{ access_log off; include {tmp_path / 'site.conf'}; }}\n"
    )
    done = subprocess.run(
        ["nginx", "-t", "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
