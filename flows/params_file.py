"""UI overrides of params.yaml: validated by the same models, written into a copy's params.yaml
(flows/experiment.py: the checkout's own file is never rewritten)."""

from __future__ import annotations

from io import StringIO
from pathlib import Path
from typing import Any

from pipelines.config import Params, RunOverrides, load_params
from pipelines.errors import ParamsError

PARAMS_FILE = "params.yaml"


def run_overrides(**values: Any) -> RunOverrides:
    """The UI's values as overrides; a bad one raises ParamsError naming its params.yaml key."""
    from pydantic import ValidationError

    try:
        return RunOverrides(**values)
    except ValidationError as exc:
        lines = [_describe_override(error) for error in exc.errors()]
        raise ParamsError("invalid override:\n  " + "\n  ".join(lines)) from None


def _describe_override(error: Any) -> str:
    name = str(error["loc"][0]) if error["loc"] else "?"
    key = RunOverrides.KEYS.get(name, name)
    return f"{key} ({name}): {error['msg']} (got {error.get('input')!r})"


def effective_params(root: Path, overrides: RunOverrides) -> Params:
    """params.yaml with the overrides applied, validated (raises ParamsError)."""
    return load_params(root / PARAMS_FILE, overrides.as_dotted())


def render_overridden(text: str, overrides: RunOverrides) -> str:
    """params.yaml's text with the overridden values replaced, comments kept."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    doc = yaml.load(text)
    for key, value in overrides.as_dotted().items():
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            node = node[part]
        node[leaf] = value
    out = StringIO()
    yaml.dump(doc, out)
    return out.getvalue()
