"""`spark stack up|status|down` on the S3 server alone: it starts, reports health without the secret,
writes the client environment to a private env.sh, and stops."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from infra.local import free_port

# A hung server or flow run fails the test instead of stalling CI (setup of the session stack included).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _spark(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spark_cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=180)


def test_stack_cli_s3_only(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    state = tmp_path / "state"
    port = free_port()
    up = _spark("stack", "up", "--only", "s3", "--state-dir", str(state), "--s3-port", str(port), cwd=repo)
    try:
        assert up.returncode == 0, up.stderr
        secret = json.loads((state / "credentials.json").read_text())["secret_access_key"]
        assert "s3      ready in" in up.stdout
        assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{port}" in up.stdout
        # One store convention: the URI above runs/, the same in the message and in env.sh.
        assert "export SPARK_STORE=s3://spark" in up.stdout and "spark ls s3://spark" in up.stdout
        assert "runs/runs" not in up.stdout and "s3://spark/runs " not in up.stdout
        assert secret not in up.stdout + up.stderr

        env_file = state / "env.sh"
        assert f"export AWS_SECRET_ACCESS_KEY={secret}" in env_file.read_text()
        assert "export SPARK_STORE=s3://spark\n" in env_file.read_text()
        for private in (env_file, state / "credentials.json", state / "s3.json"):
            assert stat.S_IMODE(private.stat().st_mode) == 0o600, private

        status = _spark("stack", "status", "--state-dir", str(state), cwd=repo)
        assert status.returncode == 0, status.stderr
        lines = {line.split()[0]: line for line in status.stdout.splitlines() if line}
        assert "healthy" in lines["s3"] and "stopped" in lines["server"] and "stopped" in lines["worker"]
        assert secret not in status.stdout
    finally:
        down = _spark("stack", "down", "--state-dir", str(state), cwd=repo)
    assert down.returncode == 0, down.stderr
    after = _spark("stack", "status", "--state-dir", str(state), cwd=repo)
    assert "stopped" in {line.split()[0]: line for line in after.stdout.splitlines() if line}["s3"]
