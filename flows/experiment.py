"""A run with values from the UI as a DVC experiment, run where it cannot touch the checkout.

The checkout's params.yaml and dvc.lock stay as they are (the nightly run's); the run happens in
a git worktree of the checkout's commit under `.dvc/tmp/flow-runs/` that holds the checkout's
uncommitted changes too (tracked files' diff, untracked files, the run's data file), shares the
checkout's DVC cache (outputs come from it: up-to-date stages are skipped), and gets the
overrides in its params.yaml (comments kept). Once the stages have run, `dvc exp save` records
the worktree as an experiment named after the flow run: `dvc exp show` in the checkout lists it,
`dvc exp apply <name>` brings its params, dvc.lock and outputs into the checkout. The worktree
is removed afterwards whatever happens; one a killed run left behind goes at the next run.
Everything goes through the `git` and `dvc` command lines.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from flows.dvc_runner import dvc_output
from flows.params_file import PARAMS_FILE, render_overridden
from pipelines.config import RunOverrides
from pipelines.errors import ParamsError

RUNS_DIR = Path(".dvc") / "tmp" / "flow-runs"  # under the checkout; git and DVC ignore .dvc/tmp
GIT_TIMEOUT_S = 300.0


def git(root: Path, *args: str, stdin: str | None = None) -> str:
    """`git <args>` in `root`, its standard output; RuntimeError with git's message."""
    done = subprocess.run(
        ["git", *args],
        cwd=root,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {root}: {done.stderr.strip()}")
    return done.stdout


@contextlib.contextmanager
def experiment_workspace(root: Path, overrides: RunOverrides, name: str) -> Iterator[Path]:
    """A worktree of the checkout at `root` with `overrides` in its params.yaml (see the module
    docstring), removed on exit. `name` (the flow run's) names its folder.

    Raises ParamsError when `root` has no git commit to base an experiment on."""
    try:
        git(root, "rev-parse", "--verify", "--quiet", "HEAD")
    except RuntimeError:
        raise ParamsError(
            f"{root}: a run with overrides is saved as a DVC experiment, which needs a git"
            " commit: commit the project first (git add -A && git commit)"
        ) from None
    remove_leftovers(root)
    work = root / RUNS_DIR / f"{os.getpid()}-{name}"
    git(root, "worktree", "add", "--detach", "--force", str(work), "HEAD")
    try:
        _copy_uncommitted(root, work)
        cache = dvc_output(root, "cache", "dir").strip()
        dvc_output(work, "cache", "dir", "--local", cache)
        with contextlib.suppress(RuntimeError):  # outputs missing from the cache: stages rerun
            dvc_output(work, "checkout")
        source = overrides.data_source
        if source and (root / source).is_file() and not (work / source).exists():
            (work / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / source, work / source)  # the run's data file, if git lacks it
        params = work / PARAMS_FILE
        params.write_text(render_overridden(params.read_text(), overrides))
        yield work
    finally:
        _remove(root, work)


def _copy_uncommitted(root: Path, work: Path) -> None:
    """The checkout's changes to tracked files (dvc.lock after a nightly run, say) and its
    untracked, not ignored files, into the worktree."""
    diff = git(root, "diff", "--binary", "HEAD")
    if diff:
        git(work, "apply", "--binary", "--whitespace=nowarn", stdin=diff)
    for name in git(root, "ls-files", "-z", "--others", "--exclude-standard").split("\0"):
        if name and (root / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, work / name)


def save_experiment(work: Path, name: str) -> None:
    """`dvc exp save --name <name> --force` in the worktree: its params, dvc.lock and outputs
    become experiment `name` of the checkout's commit (an older one of that name is replaced).
    Without a git identity on this host, the commit is signed as the train flow."""
    env: dict[str, str] = {}
    try:
        git(work, "var", "GIT_COMMITTER_IDENT")
    except RuntimeError:
        who, email = "mlops train flow", f"train-flow@{socket.gethostname()}"
        for role in ("AUTHOR", "COMMITTER"):
            env.update({f"GIT_{role}_NAME": who, f"GIT_{role}_EMAIL": email})
    dvc_output(work, "exp", "save", "--name", name, "--force", env=env)


def remove_leftovers(root: Path) -> None:
    """Remove the worktrees of runs that are gone (killed): their folder names their PID."""
    runs = root / RUNS_DIR
    for folder in sorted(runs.iterdir()) if runs.is_dir() else []:
        pid = folder.name.split("-", 1)[0]
        if not (pid.isdigit() and _alive(int(pid))):
            _remove(root, folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(root: Path, work: Path) -> None:
    """`git worktree remove --force`, then whatever is left of the folder, and the record."""
    with contextlib.suppress(RuntimeError):
        git(root, "worktree", "remove", "--force", "--force", str(work))
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(RuntimeError):
        git(root, "worktree", "prune")
