"""The inference host's facts, read once from its environment (README: Two machines).

- MLOPS_SERVING_HOME: the host's state directory (required): supervisord's config and socket,
  nginx's config, state.json, history.jsonl, logs/ and its own BENTOML_HOME (bentoml/).
- MLOPS_SERVING_ADDRESS: host:port nginx listens on (default 127.0.0.1:3000). The versions
  listen on 127.0.0.1 only.
- MLOPS_SERVING_PORTS: the loopback port range the versions' replicas take ports from
  (default 20000-20999), "LOW-HIGH".
- MLOPS_API_KEY: passed to every `bentoml serve` (the service enforces it through the proxy);
  empty or unset = no key (only for a host nobody else reaches).
- MLOPS_SUPERVISORD / MLOPS_NGINX: the executables (default /usr/bin/supervisord,
  /usr/sbin/nginx; supervisorctl is found beside supervisord).
Plus the MLflow client's own variables (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME/PASSWORD).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from inference.errors import HostSettingsError
from pipelines.config import Environment

HOME_ENV = "MLOPS_SERVING_HOME"
ADDRESS_ENV = "MLOPS_SERVING_ADDRESS"
PORTS_ENV = "MLOPS_SERVING_PORTS"
API_KEY_ENV = Environment.name("api_key")  # the service's own variable, passed on to replicas
SUPERVISORD_ENV = "MLOPS_SUPERVISORD"
NGINX_ENV = "MLOPS_NGINX"


@dataclass(frozen=True)
class HostSettings:
    home: Path
    host: str  # nginx's listen address
    port: int
    ports: tuple[int, int]  # inclusive loopback range for the replicas
    api_key: str
    supervisord: Path
    nginx: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def bentoml_home(self) -> Path:
        return self.home / "bentoml"

    @property
    def supervisorctl(self) -> Path:
        return self.supervisord.with_name("supervisorctl")


def _port(text: str, name: str, value: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise HostSettingsError(f"{name}={value!r}: {text!r} is no port (1-65535)")
    return int(text)


def parse_address(value: str, name: str = ADDRESS_ENV) -> tuple[str, int]:
    """ "host:port" -> (host, port); HostSettingsError naming the variable otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise HostSettingsError(f"{name}={value!r}: expected host:port, e.g. 0.0.0.0:3000")
    return host.strip("[]"), _port(port, name, value)


def parse_ports(value: str, name: str = PORTS_ENV) -> tuple[int, int]:
    """ "LOW-HIGH" -> (low, high) with low <= high; HostSettingsError otherwise."""
    low, sep, high = value.partition("-")
    if not sep:
        raise HostSettingsError(f"{name}={value!r}: expected a range LOW-HIGH, e.g. 20000-20999")
    pair = (_port(low.strip(), name, value), _port(high.strip(), name, value))
    if pair[0] > pair[1]:
        raise HostSettingsError(f"{name}={value!r}: the range is empty")
    return pair


def _executable(env: Mapping[str, str], name: str, default: str) -> Path:
    path = Path(env.get(name) or default)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise HostSettingsError(f"{name}: {path} is not an executable (install it or set {name})")
    return path


def host_settings(env: Mapping[str, str] | None = None) -> HostSettings:
    """The host's settings from `env` (default os.environ). Raises HostSettingsError (one line
    naming the variable) on a missing home, a bad address or range, or a missing executable."""
    env = os.environ if env is None else env
    home = env.get(HOME_ENV, "").strip()
    if not home:
        raise HostSettingsError(f"{HOME_ENV} is not set: the inference host's state directory")
    if not Path(home).is_absolute():
        raise HostSettingsError(f"{HOME_ENV}={home!r}: must be an absolute path")
    host, port = parse_address(env.get(ADDRESS_ENV) or "127.0.0.1:3000")
    return HostSettings(
        home=Path(home),
        host=host,
        port=port,
        ports=parse_ports(env.get(PORTS_ENV) or "20000-20999"),
        api_key=env.get(API_KEY_ENV, ""),
        supervisord=_executable(env, SUPERVISORD_ENV, "/usr/bin/supervisord"),
        nginx=_executable(env, NGINX_ENV, "/usr/sbin/nginx"),
    )
