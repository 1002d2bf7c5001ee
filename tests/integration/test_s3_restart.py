"""(c) The S3 server is killed and restarted while an iteration runs: storage I/O retries with backoff
and the iteration still completes, with every stage in place and nothing temporary left."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from it_helpers import (
    TIMINGS,
    create_flow_run,
    manifests,
    run_root,
    stray_tmp_keys,
    task_runs,
    tiny_config,
    wait_flow_run,
    wait_task_state,
)

# A hung server or flow run fails the test instead of stalling CI (setup of the session stack included).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# Long enough that the sampling task's I/O lands in the outage, short enough for the store's retry
# budget (backoff 0.5 s doubling to 15 s over 6 retries: about 30 s).
OUTAGE_S = 12.0


def test_iteration_survives_s3_restart(worker, prefect_api, deployed, s3):
    stack = worker
    store_uri = stack.store_uri("s3-restart")
    # No evaluation: this test is about storage, and it keeps the iteration short.
    config = tiny_config(store_uri, stack.state_dir / "cache" / "models", eval={"every": 0})
    run_id = "tiny-s3-restart"
    start = time.monotonic()
    _, run = create_flow_run(prefect_api, deployed["spark-iteration"].id, {"run_id": run_id, "config": config})
    wait_task_state(prefect_api, run["id"], "sample-policy-it1", "RUNNING", stack)

    stack.kill_s3()
    assert not stack.s3_healthy()
    time.sleep(OUTAGE_S)  # the flow run's reads, writes and lease renewals now fail and back off
    # Taken before the restart: the task's retry may succeed as soon as the S3 port answers, before
    # start_s3's own health check returns.
    restart_at = datetime.now(timezone.utc)
    TIMINGS["S3 restart: weed back up after"] = stack.start_s3()

    wait_flow_run(prefect_api, run["id"], stack, timeout_s=420)
    TIMINGS["S3 restart test: trigger -> Completed"] = time.monotonic() - start
    # The task that was running when S3 died finished only after the restart began: it rode out the outage.
    [sampling] = [t for t in task_runs(prefect_api, run["id"]) if t["name"] == "sample-policy-it1"]
    assert sampling["state_type"] == "COMPLETED"
    assert datetime.fromisoformat(sampling["end_time"].replace("Z", "+00:00")) > restart_at
    root = run_root(store_uri, run_id)
    done = manifests(s3, root)
    for stage in ("samples", "verified", "train/phase=policy", "checkpoint"):
        assert f"iter=0001/{stage}" in done, sorted(done)
    assert s3.cat_file(f"{root}/LATEST").strip() == b"1"
    assert stray_tmp_keys(s3, root) == []
