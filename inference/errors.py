"""The inference host's typed errors: each message is one line naming what was wrong."""

from __future__ import annotations

from pipelines.errors import PipelineError


class HostSettingsError(PipelineError, ValueError):
    """An MLOPS_SERVING_* / MLOPS_API_KEY environment variable has a bad value."""


class FetchError(PipelineError):
    """The version or archive to deploy cannot be found, read or trusted; nothing was changed."""


class CheckError(PipelineError):
    """A rollout check failed (which check, the value, the limit); the running version serves."""


class HostError(PipelineError):
    """The supervisor or the proxy refused a command (its output is in the message)."""
