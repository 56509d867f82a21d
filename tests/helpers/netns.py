"""Hosts on one machine for the slow tests: Linux network namespaces joined by a bridge, each with
its own address, as separate machines on one LAN would be. Needs root and iproute2 (`ip`).

    with lan("tw", {"train": 1, "infer": 2}, "10.231.11") as hosts:
        hosts["train"].address        # "10.231.11.1"
        hosts["train"].run(["python", "-c", "..."])   # inside that namespace

The test's own process stays in the root namespace with the bridge's address (`.254`), so it can
reach every host; traffic goes only to these addresses and to each namespace's loopback.
Everything is removed afterwards, and a killed earlier run's leftovers before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One `ip` (or other) command, its output captured; an error if it fails and `check`."""
    return subprocess.run(command, check=check, capture_output=True, text=True, timeout=60)


def skip_reason() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root: network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (.ci/run installs it)"
    return None


@dataclass(frozen=True)
class Host:
    """A namespace with one address on the bridge."""

    name: str  # the namespace
    address: str

    def command(self, command: Sequence[str]) -> list[str]:
        """`command` as run inside this host's namespace."""
        return ["ip", "netns", "exec", self.name, *command]

    def popen(
        self, command: Sequence[str], log: Path, env: Mapping[str, str], cwd: Path, **kw: Any
    ) -> subprocess.Popen[bytes]:
        """A long-lived process in this host (its own session: stop it with stop_group); its
        output to `log`."""
        with log.open("ab") as out:
            return subprocess.Popen(
                self.command(command),
                cwd=cwd,
                env=dict(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kw,
            )

    def run(
        self, command: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """A short command in this host; its output captured (not checked)."""
        return subprocess.run(
            self.command(command),
            env=dict(env) if env is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def kill_all(namespace: str) -> None:
    """SIGKILL every process still in `namespace` (daemons a test started there: a supervisord
    that detached itself, its children); nothing outside it."""
    found = sh("ip", "netns", "pids", namespace, check=False).stdout.split()
    for pid in found:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _remove(prefix: str, names: Sequence[str]) -> None:
    for name in names:
        kill_all(f"{prefix}-{name}")
        sh("ip", "netns", "del", f"{prefix}-{name}", check=False)  # takes its veth end with it
        sh("ip", "link", "del", f"{prefix}{name}0", check=False)
    sh("ip", "link", "del", f"{prefix}br", check=False)


@contextlib.contextmanager
def lan(prefix: str, hosts: Mapping[str, int], subnet: str) -> Iterator[dict[str, Host]]:
    """Namespaces `<prefix>-<name>` with addresses `<subnet>.<n>/24` on bridge `<prefix>br`
    (the root namespace gets `<subnet>.254`); all removed afterwards, whatever happens.

    Link names are `<prefix><name>0` (root side) and `<prefix><name>1`: keep prefix + name within
    13 characters (Linux allows 15 per interface name)."""
    bridge = f"{prefix}br"
    _remove(prefix, list(hosts))
    try:
        sh("ip", "link", "add", bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{subnet}.254/24", "dev", bridge)
        sh("ip", "link", "set", bridge, "up")
        made = {}
        for name, number in hosts.items():
            ns, outer, inner = f"{prefix}-{name}", f"{prefix}{name}0", f"{prefix}{name}1"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
            sh("ip", "link", "set", outer, "master", bridge)
            sh("ip", "link", "set", outer, "up")
            sh("ip", "-n", ns, "addr", "add", f"{subnet}.{number}/24", "dev", inner)
            sh("ip", "-n", ns, "link", "set", inner, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            made[name] = Host(ns, f"{subnet}.{number}")
        yield made
    finally:
        _remove(prefix, list(hosts))
