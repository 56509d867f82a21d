"""Where the stages write, as `dvc.yaml` declares it: the flows take paths from here, never from a
copy in code or from a stage's command string. Read with DVC's own parser (so `foreach` stages
such as `export@teacher` and `${...}` values resolve as `dvc repro` sees them)."""

from __future__ import annotations

from pathlib import Path

PREPARE_STAGE = "prepare"  # its output: the prepared data every later stage reads
VALIDATE_STAGE = "validate"  # its output: the Great Expectations Data Docs site


def stage_output(root: Path, stage: str) -> Path:
    """The first output (not a metrics or plots file) that `root`/dvc.yaml declares for `stage`
    (such as `export@teacher`), as an absolute path. Raises `dvc.stage.exceptions.StageNotFound`
    when dvc.yaml has no such stage, `LookupError` when the stage declares no such output. `root`
    need not be a DVC repository yet (a checkout's copy of dvc.yaml is enough)."""
    from dvc.dvcfile import PROJECT_FILE
    from dvc.repo import Repo

    dvcfile = root / PROJECT_FILE  # named in full: a bare stage name is looked up in the cwd
    with Repo(str(root), uninitialized=True) as repo:
        found = repo.stage.collect(f"{dvcfile}:{stage}")[0]
        outs = [Path(out.fs_path) for out in found.outs if not (out.metric or out.plot)]
    if not outs:
        raise LookupError(f"{dvcfile}: stage {stage!r} declares no outs")
    return outs[0]


def prepared_dir(root: Path) -> Path:
    """The prepared data folder: the `prepare` stage's output."""
    return stage_output(root, PREPARE_STAGE)


def data_docs_dir(root: Path) -> Path | None:
    """The Data Docs folder (its front page `pipelines.validate.DOCS_INDEX` inside): the
    `validate` stage's output; None when dvc.yaml has no `validate` stage."""
    from dvc.stage.exceptions import StageNotFound

    try:
        return stage_output(root, VALIDATE_STAGE)
    except StageNotFound:
        return None
