"""The environment variables the project reads: one typed home (pipelines.config.Environment),
read through `environment()`; a bad value is one line naming the variable."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from pipelines.cli import EXIT_REJECTED, run_cli
from pipelines.config import Environment, Params, environment
from pipelines.errors import EnvironmentVariableError, ParamsError
from pipelines.tracking import tracking_uri
from tests.helpers import REPO

# Reads of os.environ left outside the home, each with its reason: (file, key as written).
LIBRARY_READS = {
    # torchrun's own variables, read where the process group is set up
    ("pipelines/training/distributed.py", "LOCAL_RANK"),
    ("pipelines/training/distributed.py", "WORLD_SIZE"),
    # the libraries' telemetry switches (pipelines.TELEMETRY_OFF), read back after setting them
    ("pipelines/__init__.py", "key"),
    # saves the value it sets around `bentoml build` (MLOPS_MODEL_TAG), to restore it after
    ("flows/package.py", "key"),
}


def environ_reads(source: str) -> list[str]:
    """The keys of `os.environ.get(k)`, `os.getenv(k)`, `os.environ[k]` reads and
    `k in os.environ` tests in `source`: a literal's value, else the expression as written."""
    environs = ("os.environ", "environ")
    found: list[ast.expr] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and node.args:
            if ast.unparse(node.func) in ("os.environ.get", "os.getenv", "environ.get", "getenv"):
                found.append(node.args[0])
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            if ast.unparse(node.value) in environs:
                found.append(node.slice)
        elif isinstance(node, ast.Compare) and any(
            ast.unparse(c) in environs for c in node.comparators
        ):
            found.append(node.left)
    return [k.value if isinstance(k, ast.Constant) else ast.unparse(k) for k in found]


def project_sources() -> list[Path]:
    return [
        *sorted((REPO / "pipelines").rglob("*.py")),
        *sorted((REPO / "flows").rglob("*.py")),
        REPO / "service.py",
    ]


def test_every_environment_read_goes_through_the_home() -> None:
    home = REPO / "pipelines" / "config.py"
    reads = {
        (str(path.relative_to(REPO)), key)
        for path in project_sources()
        if path != home
        for key in environ_reads(path.read_text())
    }
    assert reads - LIBRARY_READS == set()


def test_the_scan_sees_each_way_of_reading() -> None:
    source = 'os.environ.get("A")\nos.getenv("B", "")\nos.environ["C"]\nif D in os.environ: pass'
    assert sorted(environ_reads(source)) == ["A", "B", "C", "D"]


def test_no_variable_name_is_spelled_outside_the_home() -> None:
    """Our variables' names appear as string values only in the home (docstrings aside): the
    places that set one for a child process take it from `Environment`."""
    ours = re.compile(r"^(MLOPS|DVC_EXP)_[A-Z_]+$")
    spelled = {}
    for path in project_sources():
        if path.name == "config.py" and path.parent.name == "pipelines":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        names = [
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and ours.match(node.value)
        ]
        if names:
            spelled[str(path.relative_to(REPO))] = names
    assert spelled == {}


def test_each_variable_is_read_typed() -> None:
    env = environment(
        {
            "MLOPS_PARENT_RUN_ID": "0123abcd",
            "MLOPS_PROJECT_DIR": "/srv/checkout",
            "MLOPS_SERVE_OVERRIDES": '{"max_batch_size": 64}',
            "MLOPS_API_KEY": "k3y",
            "MLOPS_TRT_CACHE": "/var/cache/trt",
            "MLOPS_TUNE_STORAGE": "postgresql://optuna:pw@db/optuna",
            "DVC_EXP_NAME": "exp-a",
            "MLOPS_PUSHGATEWAY_URL": "127.0.0.1:9091",  # push_to_gateway assumes http://
            "UNRELATED": "ignored",
        }
    )
    assert env.parent_run_id == "0123abcd" and env.dvc_experiment == "exp-a"
    assert env.project_dir == Path("/srv/checkout") and env.trt_cache == Path("/var/cache/trt")
    assert env.serve_overrides == {"max_batch_size": 64}
    assert env.api_key is not None and env.api_key.get_secret_value() == "k3y"
    assert "k3y" not in repr(env)  # a key never shows in a log line
    assert env.tune_storage == "postgresql://optuna:pw@db/optuna"
    assert env.pushgateway_url == "127.0.0.1:9091"


def test_unset_and_empty_take_the_defaults() -> None:
    for env in (environment({}), environment({"MLOPS_API_KEY": "", "MLOPS_TRT_CACHE": ""})):
        assert (env.parent_run_id, env.api_key, env.model_tag, env.project_dir) == (None,) * 4
        assert env.serve_overrides == {} and env.dvc_baseline == ""
        assert env.trt_cache == Path.home() / ".cache" / "mlops-trt"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("MLOPS_SERVE_OVERRIDES", "{max_batch_size: 64}", "Invalid JSON"),
        ("MLOPS_SERVE_OVERRIDES", "[64]", "valid dictionary"),
        ("MLOPS_PARENT_RUN_ID", "not a run id", "should match pattern"),
        ("MLOPS_TUNE_RUN_ID", "../x", "should match pattern"),
        ("MLOPS_TUNE_STORAGE", "mysql://u:secret@db/optuna", "unsupported scheme 'mysql'"),
        ("MLFLOW_TRACKING_URI", "ftp://u:secret@host/x", "unsupported scheme 'ftp'"),
        ("MLFLOW_TRACKING_URI", "not a uri", "a file store (MLflow 3 refuses it)"),
        ("MLFLOW_TRACKING_URI", "http://u:secret@:5000/", "no host"),
        ("MLOPS_PUSHGATEWAY_URL", "gateway:90x1", "not a URL"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(EnvironmentVariableError) as info:
        environment({name: value})
    message = str(info.value)
    assert message.startswith(f"{name}: ") and says in message and "\n" not in message
    assert value not in message and "secret" not in message
    assert isinstance(info.value, ParamsError)  # the CLIs' and the flow's rejection path


def test_a_serving_process_without_sqlalchemy_starts_with_a_tune_storage_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lean bento has no SQLAlchemy; a training-host variable must not stop the service."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name)
    )
    url = "mysql://u:secret@db/optuna"
    assert environment({"MLOPS_TUNE_STORAGE": url}).tune_storage == url


def test_a_stage_cli_rejects_a_bad_variable_with_exit_2(
    params: Params,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MLOPS_SERVE_OVERRIDES", "{oops")
    with pytest.raises(SystemExit) as info:
        run_cli(lambda p: tracking_uri(p.tracking, tmp_path), REPO / "params.yaml")
    assert info.value.code == EXIT_REJECTED
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("error: MLOPS_SERVE_OVERRIDES: Invalid JSON")


def test_values_handed_to_a_child_process_read_back_the_same() -> None:
    given = Environment(
        parent_run_id="0123abcd", tune_run_id=None, api_key="k3y", serve_overrides='{"a": 1}'
    )
    exported = given.exported()
    assert exported == {
        "MLOPS_PARENT_RUN_ID": "0123abcd",
        "MLOPS_TUNE_RUN_ID": "",  # clears an inherited value
        "MLOPS_SERVE_OVERRIDES": json.dumps({"a": 1}),
        "MLOPS_API_KEY": "k3y",
    }
    back = environment(exported)
    assert (back.parent_run_id, back.tune_run_id, back.serve_overrides) == (
        "0123abcd",
        None,
        {"a": 1},
    )
    assert Environment.name("project_dir") == "MLOPS_PROJECT_DIR"


def test_each_variable_says_who_sets_it() -> None:
    for name, field in Environment.model_fields.items():
        assert (field.description or "").startswith("Set "), name
        assert Environment.name(name) == field.validation_alias
