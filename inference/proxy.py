"""nginx in front of the versions: one stable address, weights in an upstream file.

nginx.conf is written once per host start (listen address, body limit, request ids, access
log); upstream.conf holds the `server 127.0.0.1:P weight=W;` lines and is rewritten atomically
(a temp file + os.replace), checked with `nginx -t`, then nginx reloads (SIGHUP through
supervisord, the same as `nginx -s reload`): new workers take the new weights while the old ones
finish the requests they hold, so a switch drops nothing.
"""

from __future__ import annotations

import math
import secrets
import subprocess
import time
from pathlib import Path

import httpx

from inference.errors import HostError
from inference.settings import HostSettings
from inference.supervisor import PROXY_PROGRAM, ctl

# Each version: (its replicas' loopback ports, its share of requests in percent).
Backends = list[tuple[list[int], int]]


def nginx_dir(settings: HostSettings) -> Path:
    return settings.home / "nginx"


def conf_path(settings: HostSettings) -> Path:
    return nginx_dir(settings) / "nginx.conf"


def upstream_path(settings: HostSettings) -> Path:
    return nginx_dir(settings) / "upstream.conf"


IDENTITY_PATH = "/.mlops-serving-host"  # answers this host's id: the proxy is ours, not another
PROXY_VERIFY_S = 15.0  # how long a (re)started nginx gets to answer on the serving address
# nginx's own errors (a path outside ROUTES, a body over the limit, no version answering) in the
# service's error shape
NGINX_ERRORS = {
    404: "no such endpoint; GET /docs.json lists the endpoints",
    413: "request body larger than serve.max_body_bytes",
    502: "no serving version answered (bad gateway); retry",
    503: "no serving version available; retry",
    504: "the serving version did not answer in time",
}

# The paths the service answers, and the only ones nginx forwards: its APIs and routes
# (service.py), BentoML's task routes for score_file, probes and /metrics, /schema.json (what
# BentoML's own clients read), and the docs page (/) with its document and assets. Every other
# path is nginx's JSON 404: BentoML labels its request metrics by the raw path, 404s included,
# before the service's middleware runs, so each unknown path would add series to /metrics for good
# (500 of them made it 5.1 MB and a read 1.5 s). tests/test_inference.py checks this list against
# the routes of the app service.py builds.
DOCS_ASSETS = (
    "favicon-dark-32x32.png",
    "favicon-light-32x32.png",
    "index.css",
    "marked.min.js",
    "swagger-initializer.js",
    "swagger-ui-bundle.js",
    "swagger-ui-standalone-preset.js",
    "swagger-ui.css",
)
TASK_ROUTES = ("", "/submit", "/status", "/get", "/retry", "/cancel")  # BentoML 1.4's, per task
ROUTES = (
    "/predict",
    "/predict_image",
    "/metadata",
    "/feedback",
    *(f"/score_file{route}" for route in TASK_ROUTES),
    "/livez",
    "/healthz",
    "/readyz",
    "/metrics",
    "/schema.json",
    "/",
    "/docs.json",
    *(f"/static_content/{name}" for name in DOCS_ASSETS),
)


def host_id(settings: HostSettings) -> str:
    """A random id for this host's home (made once, kept in nginx/host-id)."""
    path = nginx_dir(settings) / "host-id"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, secrets.token_hex(8))
    return path.read_text().strip()


def render_nginx(settings: HostSettings, max_body_bytes: int) -> str:
    """nginx.conf: `daemon off` (supervisord runs it), the host's listen address, the body limit
    (serve.max_body_bytes, so nginx refuses what the service would refuse, before the upstream
    is touched), `X-Request-ID` from $request_id (kept if the client sent one) passed upstream
    and returned, an access log with the request id, the upstream that answered and status, JSON
    bodies (`{"error": ...}`, as the service's) for nginx's own 404/413/502/503/504, and
    IDENTITY_PATH answering this host's id (see `verify`).

    Only ROUTES reach the versions, one exact-match location each, and each sends its own path
    upstream, not the client's: `/x/../predict` or `//predict` (nginx's normalized `/predict`)
    reach the service as `/predict`, so the service never sees a path outside ROUTES. Any other
    path is a 404 from nginx."""
    d = nginx_dir(settings)
    errors = "\n".join(
        f"        error_page {code} @e{code};\n"
        f"        location @e{code} {{ default_type application/json; "
        f'add_header X-Request-ID $rid always; return {code} \'{{"error": "{text}"}}\'; }}'
        for code, text in NGINX_ERRORS.items()
    )
    routes = "\n".join(
        f"        location = {path} {{ proxy_pass http://versions{path}; }}" for path in ROUTES
    )
    logs = settings.home / "logs"
    temps = "\n".join(
        f"    {kind}_temp_path {d / 'tmp' / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""# written by inference/proxy.py
daemon off;
worker_processes 2;
pid {d / "nginx.pid"};
error_log {logs / "nginx-error.log"} warn;
events {{ worker_connections 1024; }}
http {{
{temps}
    map $http_x_request_id $rid {{ default $http_x_request_id; "" $request_id; }}
    log_format mlops '$remote_addr [$time_iso8601] "$request" $status $body_bytes_sent '
                     'rid=$rid upstream=$upstream_addr upstream_status=$upstream_status '
                     'rt=$request_time urt=$upstream_response_time';
    access_log {logs / "access.log"} mlops;
    client_max_body_size {max_body_bytes};
    # Bodies and answers stay in memory: nginx's workers (user nobody when started as root) may
    # not write the temp directories under the host's home.
    client_body_buffer_size {max_body_bytes};
    proxy_max_temp_file_size 0;
    include {upstream_path(settings)};
    server {{
        listen {settings.address};
        # For every route's location below (each holds only its proxy_pass).
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Request-ID $rid;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        # The service echoes the id it was sent ($rid): nginx's own header is the one answer.
        proxy_hide_header X-Request-ID;
        add_header X-Request-ID $rid always;
        proxy_read_timeout 120s;
        proxy_intercept_errors off;  # the versions' own 4xx/5xx bodies pass through
        # A replica that is stopped or killed refuses connections: try the next one instead
        # of failing the client. non_idempotent lets a POST be retried too, which is safe
        # here because /predict is a pure function of its body (no state changes), and only
        # errors before a response (error, timeout) are retried, never a 5xx answer: a 5xx
        # must reach the client and the canary's figures.
        proxy_next_upstream error timeout non_idempotent;
        proxy_next_upstream_tries 3;
{errors}
        location = {IDENTITY_PATH} {{ default_type text/plain; return 200 "{host_id(settings)}"; }}
{routes}
        location / {{ return 404; }}
    }}
}}
"""


def server_weights(backends: Backends) -> list[tuple[int, int]]:
    """(port, nginx weight) per replica so that each version gets its share of requests whatever
    its replica count: weight = share x (product of the other versions' replica counts), divided
    by the common factor. Versions with share 0 are left out."""
    live = [(ports, share) for ports, share in backends if share > 0 and ports]
    if not live:
        raise ValueError("no version with a share > 0")
    total = math.prod(len(ports) for ports, _ in live)
    weights = [(port, share * total // len(ports)) for ports, share in live for port in ports]
    common = math.gcd(*(w for _, w in weights))
    return [(port, w // common) for port, w in weights]


def render_upstream(backends: Backends) -> str:
    """upstream.conf: the `versions` upstream with each replica's weight, keepalive on."""
    lines = [f"    server 127.0.0.1:{p} weight={w};" for p, w in server_weights(backends)]
    return "upstream versions {\n" + "\n".join(lines) + "\n    keepalive 32;\n}\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def prepare(settings: HostSettings, max_body_bytes: int, backends: Backends | None) -> Path:
    """Write nginx.conf and (if none yet) an upstream; the conf's path. An empty host gets an
    upstream pointing at a closed port (nginx needs one server): requests get 502 until the
    first version is promoted."""
    d = nginx_dir(settings)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    (settings.home / "logs").mkdir(parents=True, exist_ok=True)
    write_atomic(conf_path(settings), render_nginx(settings, max_body_bytes))
    if backends:
        write_atomic(upstream_path(settings), render_upstream(backends))
    elif not upstream_path(settings).exists():
        write_atomic(upstream_path(settings), render_upstream([([settings.ports[0]], 100)]))
    return conf_path(settings)


def switch(settings: HostSettings, backends: Backends) -> None:
    """Point the proxy at `backends`: upstream.conf rewritten atomically, the whole config checked
    (`nginx -t`; the old upstream is put back if it fails) and nginx reloaded gracefully."""
    path = upstream_path(settings)
    old = path.read_text() if path.exists() else None
    write_atomic(path, render_upstream(backends))
    test = [str(settings.nginx), "-t", "-q", "-c", str(conf_path(settings))]
    test += ["-e", str(settings.home / "logs" / "nginx-error.log")]
    done = subprocess.run(test, check=False, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        if old is not None:
            write_atomic(path, old)
        raise HostError(f"nginx -t refused the new upstream: {done.stderr.strip()[-300:]}")
    ctl(settings, "signal", "HUP", PROXY_PROGRAM)


def verify(settings: HostSettings) -> None:
    """The serving address is answered by this host's nginx (IDENTITY_PATH gives this home's id),
    within PROXY_VERIFY_S. HostError otherwise: another process holds the address (another host
    home, a proxy orphaned by a killed supervisord), or nginx cannot start (see its error log)."""
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(settings.host)
    url = f"http://{host or settings.host}:{settings.port}{IDENTITY_PATH}"
    expected, seen = host_id(settings), "no answer"
    deadline = time.monotonic() + PROXY_VERIFY_S
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(url, timeout=2.0)
            if answer.status_code == 200 and answer.text.strip() == expected:
                return
            seen = f"HTTP {answer.status_code} from another server"
        except httpx.HTTPError as exc:
            seen = type(exc).__name__
        time.sleep(0.3)
    raise HostError(
        f"proxy: MLOPS_SERVING_ADDRESS {settings.address} is not answered by this host's nginx "
        f"({seen}): is another process listening there? see "
        f"{settings.home / 'logs' / 'nginx-error.log'}"
    )
