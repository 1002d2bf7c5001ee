"""Process and network plumbing for the local stack: pid files, process trees, ports, JSON over HTTP.

Standard library only. Process trees are read from /proc (Linux); elsewhere liveness falls back to a
signal-0 probe and descendants are not tracked.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

_GRPC_OFFSET = 10000


class StackError(RuntimeError):
    """A component could not be started, reached or stopped (the message says which and why)."""


def proc_stat(pid: int) -> tuple[int, int, str, int] | None:
    """(ppid, pgid, state, start_time) of a live process from /proc, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    return int(rest[1]), int(rest[2]), rest[0], int(rest[19])


def alive(pid: int, start_time: int | None) -> bool:
    """True if `pid` runs and is the same process that was recorded (pids get reused)."""
    if not Path("/proc").is_dir():  # not Linux: the best we can do is a signal-0 probe
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    stat = proc_stat(pid)
    if stat is None or stat[2] in ("Z", "X"):
        return False
    return start_time is None or stat[3] == start_time


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (children first found, depth-first order)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[0], []).append(int(entry.name))
    out: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        out.append(child)
        stack.extend(children.get(child, []))
    return out


def send_signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_tree(pids: Iterable[int], own_pgid: int, wait_s: float = 10.0) -> list[int]:
    """SIGKILL these processes and their process groups (flow runs start their own sessions), then
    wait until they are gone; returns the pids still alive after `wait_s` (normally none)."""
    pids = list(pids)
    groups = set()
    for pid in pids:
        stat = proc_stat(pid)
        if stat is not None and stat[1] != own_pgid:
            groups.add(stat[1])
        send_signal(pid, signal.SIGKILL)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    # SIGKILL is delivered asynchronously; orphans linger as zombies until init reaps them (not alive).
    deadline = time.monotonic() + wait_s
    while True:
        survivors = [pid for pid in pids if alive(pid, None)]
        if not survivors or time.monotonic() > deadline:
            return survivors
        time.sleep(0.05)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """Nobody listens on host:port (connections of a stopped server in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port_pair(host: str, taken: set[int]) -> int:
    """A port p such that p and p + 10000 are both free (SeaweedFS derives gRPC ports that way)."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        pair = {port, port + _GRPC_OFFSET}
        if not pair & taken and all(port_free(host, p) for p in pair):
            taken |= pair
            return port
    raise StackError("no free port pair found in 20000-39999 for SeaweedFS")


# The stack talks to its own loopback servers: never through an HTTP proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# Answers that mean "busy, ask again" (Prefect answers 503 when its database is momentarily locked).
RETRY_STATUSES = (429, 502, 503)


def http_json(
    method: str, url: str, body: Any = None, timeout: float = 5.0, retries: int = 0, backoff_s: float = 0.5
) -> tuple[int, Any]:
    """A JSON request; returns (status, decoded body or None).

    With `retries`, busy answers (429/502/503) and connection errors are retried with exponential
    backoff; only use it for idempotent requests. Connection errors left after that raise OSError.
    """
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(retries + 1):
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with _HTTP.open(request, timeout=timeout) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, payload = err.code, err.read()
        except OSError:
            if attempt == retries:
                raise
            time.sleep(backoff_s * 2**attempt)
            continue
        if status in RETRY_STATUSES and attempt < retries:
            time.sleep(backoff_s * 2**attempt)
            continue
        try:
            return status, json.loads(payload) if payload else None
        except json.JSONDecodeError:
            return status, None
    raise AssertionError("unreachable")


def answers(url: str, timeout: float = 2.0) -> int | None:
    """HTTP status of a GET (any status means the server is up), or None if nothing answers."""
    try:
        return http_json("GET", url, timeout=timeout)[0]
    except (OSError, urllib.error.URLError):
        return None


def write_private(path: Path, text: str) -> None:
    """Write a file only the owner can read (credentials)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class ManagedProcess:
    """One detached process of the stack: pid file, log file, start, stop, kill."""

    def __init__(self, name: str, state_dir: Path) -> None:
        self.name = name
        self.pid_file = state_dir / f"{name}.pid"
        self.log = state_dir / f"{name}.log"
        self._popen: subprocess.Popen[bytes] | None = None

    def record(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.pid_file.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def pid(self) -> int | None:
        """The pid if the recorded process is alive (a stale pid file is removed)."""
        self._reap()
        rec = self.record()
        if rec is None:
            return None
        if alive(int(rec["pid"]), rec.get("start_time")):
            return int(rec["pid"])
        self.pid_file.unlink(missing_ok=True)
        return None

    def spawn(self, argv: list[str], env: Mapping[str, str], cwd: Path) -> int:
        # Owner-only: a worker's log carries its flow runs' output.
        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as log:
            log.write(f"\n--- {datetime.now(timezone.utc).isoformat()} start: {shlex.join(argv)}\n".encode())
            log.flush()
            # start_new_session: the process outlives `spark stack up` and a Ctrl-C in its terminal.
            self._popen = subprocess.Popen(
                argv, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        stat = proc_stat(self._popen.pid)
        rec = {"pid": self._popen.pid, "start_time": stat[3] if stat else None, "argv": argv}
        self.pid_file.write_text(json.dumps(rec))
        return self._popen.pid

    def exited(self) -> int | None:
        """Exit code if the process this object spawned has exited."""
        return None if self._popen is None else self._popen.poll()

    def _reap(self) -> None:
        # Collect our own exited child so it does not linger as a zombie in a long-lived caller.
        if self._popen is not None:
            self._popen.poll()

    def stop(self, sig: int, grace_s: float) -> bool:
        """Send `sig`, wait up to `grace_s`, then SIGKILL the process and its descendants.

        Returns True if it exited within the grace period.
        """
        pid = self.pid()
        if pid is None:
            return True
        # Snapshot now (with start times, against pid reuse): once the parent is gone they are orphans.
        tree = {child: (proc_stat(child) or (0, 0, "", None))[3] for child in descendants(pid)}
        send_signal(pid, sig)
        deadline = time.monotonic() + grace_s
        graceful = False
        while time.monotonic() < deadline:
            if self.pid() is None:
                graceful = True
                break
            time.sleep(0.1)
        if not graceful:
            self.kill()
        leftovers = [child for child, started in tree.items() if alive(child, started)]
        if leftovers:
            kill_tree(leftovers, os.getpgid(0))
        self.pid_file.unlink(missing_ok=True)
        self._wait()
        return graceful

    def kill(self) -> None:
        """SIGKILL the process and every descendant (a crash, as far as anyone else can tell)."""
        pid = self.pid()
        if pid is None:
            return
        survivors = kill_tree([pid, *descendants(pid)], os.getpgid(0))
        if survivors:
            raise StackError(f"{self.name}: processes {survivors} survived SIGKILL")
        self.pid_file.unlink(missing_ok=True)
        self._wait()

    def _wait(self) -> None:
        if self._popen is not None:
            try:
                self._popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._popen = None


def wait_until(check: Callable[[], bool], proc: ManagedProcess, timeout_s: float, what: str) -> float:
    """Poll `check` until it is true; fail early (with the log tail) if the process exits."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        code = proc.exited()
        if code is not None:
            raise StackError(
                f"{what} exited with code {code} before it was ready; log {proc.log}:\n{tail(proc.log)}"
            )
        if time.monotonic() - start > timeout_s:
            raise StackError(f"{what} not ready after {timeout_s:.0f} s; log {proc.log}:\n{tail(proc.log)}")
        time.sleep(0.2)
