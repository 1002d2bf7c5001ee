"""(d) Triggering twice with one idempotency key creates one flow run; two concurrent triggers of the
same run never run the same iteration (one runs it, the other finds it done and writes nothing)."""

from __future__ import annotations

import time
import uuid

import pytest

from infra.local.processes import http_json

from it_helpers import (
    API_RETRIES,
    TIMINGS,
    ReferenceRun,
    create_flow_run,
    manifests,
    settled_task_runs,
    wait_flow_run,
)

# A hung server or flow run fails the test instead of stalling CI (setup of the session stack included).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_idempotency_key_and_concurrent_triggers(worker, prefect_api, deployed, s3, reference_run: ReferenceRun):
    stack = worker
    dep = deployed["spark-iteration"].id
    latest = int(s3.cat_file(f"{reference_run.root}/LATEST"))
    assert latest == 1, "the reference run should stand after its first iteration"
    target = latest + 1
    params = {"run_id": reference_run.run_id, "config": reference_run.config, "lock_wait_s": 300}
    tag = f"idem-{uuid.uuid4().hex[:8]}"

    start = time.monotonic()
    _, run_a = create_flow_run(prefect_api, dep, params, f"{tag}-a", tags=[tag])
    status_again, run_again = create_flow_run(prefect_api, dep, params, f"{tag}-a", tags=[tag])
    _, run_b = create_flow_run(prefect_api, dep, params, f"{tag}-b", tags=[tag])
    # The repeat answers 200 with the run the first call created (201), not a new one.
    assert run_again["id"] == run_a["id"] and status_again == 200
    assert run_b["id"] != run_a["id"]
    status, tagged = http_json(
        "POST", f"{prefect_api}/flow_runs/filter", {"flow_runs": {"tags": {"all_": [tag]}}}, retries=API_RETRIES
    )
    assert status == 200 and sorted(r["id"] for r in tagged) == sorted([run_a["id"], run_b["id"]])

    for run in (run_a, run_b):
        wait_flow_run(prefect_api, run["id"], stack, timeout_s=480)
    TIMINGS["concurrent triggers: both Completed"] = time.monotonic() - start

    suffix = f"-it{target}"
    ran = [[t["name"] for t in settled_task_runs(prefect_api, r["id"])] for r in (run_a, run_b)]
    runners = [names for names in ran if any(n.endswith(suffix) for n in names)]
    assert len(runners) == 1, f"iteration {target} ran in {len(runners)} flow runs: {ran}"
    idle = ran[1] if runners[0] is ran[0] else ran[0]
    assert idle == [], f"the second trigger should find iteration {target} done and run no task: {idle}"
    assert int(s3.cat_file(f"{reference_run.root}/LATEST")) == target
    assert any(k.startswith(f"iter={target:04d}/") for k in manifests(s3, reference_run.root))
