"""What the host serves (state.json) and what happened (history.jsonl), under MLOPS_SERVING_HOME.

state.json: {"current": Slot | null, "previous": Slot | null}, a Slot being
{"version": registry version, "bento": bento tag, "ports": [loopback ports]}; written atomically
after each switch. history.jsonl: one JSON object per deploy or rollback:
{"version", "bento", "time" (ISO UTC), "outcome" (deployed | rejected | rolled back), "reason"}.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Slot:
    version: str
    bento: str
    ports: list[int]


@dataclass(frozen=True)
class State:
    current: Slot | None = None
    previous: Slot | None = None

    def versions(self) -> set[str]:
        return {s.version for s in (self.current, self.previous) if s}


def state_path(home: Path) -> Path:
    return home / "state.json"


def history_path(home: Path) -> Path:
    return home / "history.jsonl"


def _slot(raw: Any) -> Slot | None:
    if not raw:
        return None
    return Slot(str(raw["version"]), str(raw["bento"]), [int(p) for p in raw["ports"]])


def read_state(home: Path) -> State:
    """The host's state; an empty State on a host that never deployed."""
    path = state_path(home)
    if not path.exists():
        return State()
    raw = json.loads(path.read_text())
    return State(_slot(raw.get("current")), _slot(raw.get("previous")))


def write_state(home: Path, state: State) -> None:
    """state.json, atomically (temp + os.replace)."""
    tmp = state_path(home).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(state_path(home))


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def record(home: Path, version: str, bento: str, outcome: str, reason: str = "") -> dict[str, str]:
    """Append one event to history.jsonl; the event."""
    event = {"version": version, "bento": bento, "time": now(), "outcome": outcome}
    event["reason"] = reason
    with history_path(home).open("a") as f:
        f.write(json.dumps(event) + "\n")
    return event


def history(home: Path, last: int = 50) -> list[dict[str, str]]:
    """The last `last` events, oldest first."""
    path = history_path(home)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()[-last:]
    return [json.loads(line) for line in lines if line.strip()]
