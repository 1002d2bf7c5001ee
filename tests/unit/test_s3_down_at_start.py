"""S3 down when a run starts: `spark run` stops before any Prefect server or model starts, with one line
naming the object it could not reach, exit code 2, and no credential in anything it printed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECRET = "rel12-secret-key-never-printed"


def _closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_spark_run_with_s3_down_fails_fast_and_clearly(tmp_path: Path) -> None:
    env = {
        **os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(tmp_path / "ph"),
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}", "AWS_ACCESS_KEY_ID": "rel12-key-id",
        "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
        "SPARK_STORE_RETRIES": "1",  # the retry budget is the store's business; one retry proves the path
    }
    proc = subprocess.run(
        [sys.executable, "-m", "spark_cli", "run", "--preset", "tiny", "--store", "s3://spark/down", "--run-id", "r"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: read s3://spark/down/runs/r/run.json failed after 2 attempts:"), line
    assert "Could not connect to the endpoint URL" in line
    assert SECRET not in proc.stdout + proc.stderr
    assert "ephemeral" not in (proc.stdout + proc.stderr).lower()
