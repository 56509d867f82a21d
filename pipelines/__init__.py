"""The pipeline's stages (one module each) and what they share.

Importing the package turns the telemetry of the stack's libraries off, as environment defaults
set before any of them is imported: every entry point of the project imports this package first
(the stage CLIs `python -m pipelines.<stage>`, the flows through `flows/__init__.py`, the service
through its own imports), whoever starts it. A value the user set explicitly is kept.
"""

import os
from collections.abc import MutableMapping

TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # a Prefect server's usage events
    "DO_NOT_TRACK": "true",  # Prefect's client (and other tools that honour the convention)
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "BENTOML_DO_NOT_TRACK": "true",
    "NML_DISABLE_USAGE_LOGGING": "1",  # NannyML (the monitor flow's drift tests)
}


def telemetry_off(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set each switch of TELEMETRY_OFF in `environ` unless it is set; return the values now
    in effect (what child processes, such as a deployment's flow runs, should get)."""
    for key, value in TELEMETRY_OFF.items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in TELEMETRY_OFF}


telemetry_off()
