"""dvc.lock matches the committed code and params (fast: `dvc status` in a clone of HEAD).

Outputs are not in git, so in a fresh clone every output (and every dependency that is another
stage's output) is missing: that is fine. A changed code file, param or command is not: it means
dvc.lock was not regenerated (`dvc repro`) after the change, and a fresh clone would rerun stages
that claim to be up to date.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import REPO


def stale_entries(status: dict[str, Any]) -> list[str]:
    """What `dvc status --json` reports beyond missing files, one line per stage and entry."""
    found = []
    for stage, entries in status.items():
        for entry in entries:
            if isinstance(entry, str):  # "changed command", "always changed"
                found.append(f"{stage}: {entry}")
                continue
            for path, change in entry.get("changed deps", {}).items():
                if isinstance(change, dict):  # a params file: {key: "modified" | "new" | ...}
                    found += [f"{stage}: param {key} {what}" for key, what in change.items()]
                elif change != "deleted":
                    found.append(f"{stage}: {path} {change}")
    return found


def test_dvc_lock_matches_the_committed_code_and_params(tmp_path: Path) -> None:
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", head], cwd=clone, check=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    stale = stale_entries(json.loads(done.stdout or "{}"))
    assert not stale, "dvc.lock is stale (run `dvc repro` and commit dvc.lock):\n" + "\n".join(
        stale
    )
