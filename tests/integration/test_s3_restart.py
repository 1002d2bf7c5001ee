"""(c) The S3 server is killed in the middle of a checkpoint upload and restarted: storage I/O retries
with backoff and the iteration still completes, with every stage in place, the checkpoint whole (every
file its manifest lists, sizes and checksums verified on download) and nothing temporary left.

Deterministic: the iteration's checkpoint write is held (spark_core.faults) at `mid_write` - one file
uploaded under the temporary key, the rest not - while S3 is killed, then released into the outage, so
its very next upload meets a dead server whatever the speed of the machine. (S3 down when a run starts
is tests/unit/test_s3_down_at_start.py.)"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from unittest import mock

import pytest

from it_helpers import (
    TIMINGS,
    create_flow_run,
    fault_dir,
    hold,
    manifests,
    run_root,
    stray_tmp_keys,
    settled_task_runs,
    tiny_config,
    wait_flow_run,
    wait_held,
)
from spark_core import faults
from spark_core.store import Store

# A hung server or flow run fails the test instead of stalling CI (setup of the session stack included).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# Long enough to exercise several retries, short enough for the store's retry budget (backoff 0.5 s
# doubling to 15 s over 6 retries: about 30 s).
OUTAGE_S = 12.0


def test_iteration_survives_s3_restart_mid_checkpoint_upload(worker, prefect_api, deployed, s3, tmp_path):
    stack = worker
    store_uri = stack.store_uri("s3-restart")
    # No evaluation: this test is about storage, and it keeps the iteration short.
    config = tiny_config(store_uri, stack.state_dir / "cache" / "models", eval={"every": 0})
    run_id = "tiny-s3-restart"
    start = time.monotonic()
    key = hold(stack, run_id, 1, "checkpoint", "mid_write")
    _, run = create_flow_run(prefect_api, deployed["spark-iteration"].id, {"run_id": run_id, "config": config})
    wait_held(prefect_api, run["id"], stack, key, "mid_write")

    stack.kill_s3()
    assert not stack.s3_healthy()
    faults.release(fault_dir(stack), key, "mid_write")  # its next upload meets the dead server
    time.sleep(OUTAGE_S)  # the flow run's reads, writes and lease renewals now fail and back off
    # Taken before the restart: the task's retry may succeed as soon as the S3 port answers, before
    # start_s3's own health check returns.
    restart_at = datetime.now(timezone.utc)
    TIMINGS["S3 restart: weed back up after"] = stack.start_s3()

    wait_flow_run(prefect_api, run["id"], stack, timeout_s=420)
    TIMINGS["S3 restart test: trigger -> Completed"] = time.monotonic() - start
    # The task that was uploading when S3 died finished only after the restart began: it rode out the
    # outage (and its Prefect task retry, if any, found its own checkpoint committed or redid it whole).
    settled = settled_task_runs(prefect_api, run["id"], names=("train-policy-it1",))
    writers = [t for t in settled if t["name"] in ("train-policy-it1", "train-reward-it1")]
    last = max(writers, key=lambda t: t["end_time"] or "")
    assert all(t["state_type"] == "COMPLETED" for t in writers), [(t["name"], t["state_type"]) for t in writers]
    assert datetime.fromisoformat(last["end_time"].replace("Z", "+00:00")) > restart_at
    root = run_root(store_uri, run_id)
    done = manifests(s3, root)
    for stage in ("samples", "verified", "train/phase=policy", "checkpoint"):
        assert f"iter=0001/{stage}" in done, sorted(done)
    # The checkpoint reads back whole: every listed file there, sizes and sha256 as the manifest says.
    with mock.patch.dict(os.environ, stack.env()):  # the AWS_* variables a flow run gets
        store = Store(store_uri)
        folder = store.download_checkpoint(f"{store_uri}/runs/{run_id}/iter=0001/checkpoint", tmp_path / "ckpt")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert [f for f in files if f != ".complete"] == sorted(json.loads(done["iter=0001/checkpoint"])["files"])
    assert s3.cat_file(f"{root}/LATEST").strip() == b"1"
    assert stray_tmp_keys(s3, root) == []
