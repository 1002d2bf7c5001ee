"""The S3 secret key never leaves the environment: after the reference iteration ran on S3 through the
deployed flow, search everything a person (or a leaked screenshot) could see for it — every log line of
the flow run and its tasks, every artifact, the flow run and task runs as the API returns them (their
parameters included), the deployments, the events about the run, the worker's log, and every object in
the run's store (run.json, manifests, checkpoints, and the decoded rows of every Parquet table).

The secret is the stack's own random 48-hex-digit key, so a hit cannot be a coincidence."""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow.parquet as pq
import pytest

from deployments.deploy import Deployed
from infra.local.processes import http_json

from it_helpers import API_RETRIES, ReferenceRun, task_runs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

PAGE = 200  # the API's largest page of logs


def _post(api: str, path: str, body: dict[str, Any]) -> Any:
    status, answer = http_json("POST", f"{api}{path}", body, timeout=30, retries=API_RETRIES)
    assert status == 200, f"{path}: {status} {answer}"
    return answer


def flow_run_logs(api: str, flow_run_id: str) -> list[dict[str, Any]]:
    logs: list[dict[str, Any]] = []
    while True:
        page = _post(api, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                           "sort": "TIMESTAMP_ASC", "limit": PAGE, "offset": len(logs)})
        logs += page
        if len(page) < PAGE:
            return logs


def flow_run_events(api: str, flow_run_id: str) -> list[dict[str, Any]]:
    page = _post(api, "/events/filter", {"filter": {"any_resource": {"id": [f"prefect.flow-run.{flow_run_id}"]}},
                                         "limit": 50})
    found = list(page["events"])
    while page.get("next_page"):
        status, page = http_json("GET", page["next_page"], timeout=30, retries=API_RETRIES)
        assert status == 200, f"events next page: {status} {page}"
        found += page["events"]
    return found


def test_the_secret_key_appears_nowhere(reference_run: ReferenceRun, prefect_api: str, s3, stack,
                                        deployed: dict[str, Deployed]) -> None:
    secret = stack.env()["AWS_SECRET_ACCESS_KEY"]
    assert len(secret) >= 32  # a real key, not an empty string every text "contains"
    run_id = reference_run.flow_run["id"]
    searched: dict[str, int] = {}
    hits: list[str] = []

    def search(kind: str, where: str, text: str) -> None:
        searched[kind] = searched.get(kind, 0) + 1
        if secret in text:
            hits.append(f"{kind}: {where}")

    logs = flow_run_logs(prefect_api, run_id)
    assert logs, "the flow run has no logs to search"
    for log in logs:
        search("log line", f"{log.get('name')} {log.get('timestamp')}", json.dumps(log))

    artifacts = _post(prefect_api, "/artifacts/filter", {"flow_runs": {"id": {"any_": [run_id]}}, "limit": 200})
    assert artifacts, "the flow run has no artifacts to search"
    for artifact in artifacts:
        search("artifact", artifact.get("key") or artifact["id"], json.dumps(artifact))

    search("flow run (parameters, state, job variables)", run_id, json.dumps(reference_run.flow_run))
    for task in task_runs(prefect_api, run_id):
        search("task run", task["name"], json.dumps(task))
    for dep in deployed.values():
        status, body = http_json("GET", f"{prefect_api}/deployments/{dep.id}", timeout=30, retries=API_RETRIES)
        assert status == 200
        search("deployment", dep.name, json.dumps(body))
    for event in flow_run_events(prefect_api, run_id):
        search("event", event["event"], json.dumps(event))
    worker_log = stack.state_dir / "worker.log"
    if worker_log.exists():
        search("worker log", str(worker_log), worker_log.read_text(errors="replace"))

    for key in s3.find(reference_run.root):
        data = s3.cat_file(key)
        search("store object", key, data.decode("latin-1"))  # raw bytes, whatever the format
        if key.endswith(".parquet"):  # compressed pages could hide a string from the raw search
            rows = pq.read_table(io.BytesIO(data)).to_pylist()
            search("table rows", key, json.dumps(rows, default=str))

    assert not hits, f"the S3 secret key was found in: {hits}"
    # Every kind of place was really searched (a filter that matched nothing would pass vacuously).
    for kind in ("log line", "artifact", "task run", "deployment", "store object", "table rows"):
        assert searched.get(kind, 0) > 0, f"nothing searched of kind {kind!r}: {searched}"
    print(f"secret scan: {sum(searched.values())} places searched, 0 hits: {searched}")
