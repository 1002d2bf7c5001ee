"""(a) `spark deploy` registers typed deployments; a `tiny` iteration triggered over the REST API runs on
the process worker against the S3 server, and every stage it wrote reads back with the right columns."""

from __future__ import annotations

import json

import pytest

from deployments.deploy import REPO_DIR, Deployed, read_deployment
from spark_core.layout import TABLES

from it_helpers import ReferenceRun, read_stage, stray_tmp_keys

# A hung server or flow run fails the test instead of stalling CI (setup of the session stack included).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_deployments_are_typed_by_spark_config(prefect_api: str, deployed: dict[str, Deployed]) -> None:
    assert set(deployed) == {"spark-run", "spark-iteration"}
    for name, dep in deployed.items():
        body = read_deployment(prefect_api, dep.name)
        assert body["work_pool_name"] == "spark-process"
        assert body["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_DIR)}}
        ]
        schema = body["parameter_openapi_schema"]
        # The UI builds its form from this: `preset` a choice, `overrides` every section with null
        # defaults (a filled-in form keeps the preset's values), `config` a plain JSON mapping.
        assert {"$ref": "#/definitions/SparkConfigOverrides"} in schema["properties"]["overrides"]["anyOf"]
        spark = schema["definitions"]["SparkConfigOverrides"]
        assert {"$ref": "#/definitions/SamplingConfigOverrides"} in spark["properties"]["sampling"]["anyOf"]
        assert schema["definitions"]["SamplingConfigOverrides"]["properties"]["n"]["default"] is None
        assert "SparkConfig" not in schema["definitions"]
        assert all(prop.get("description") for prop in schema["properties"].values())
        assert body["enforce_parameter_schema"] is True
    iteration = read_deployment(prefect_api, deployed["spark-iteration"].name)
    assert iteration["parameter_openapi_schema"]["required"] == ["run_id"]
    [schedule] = iteration["schedules"]
    assert schedule["active"] is False and schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["parameters"] == {"run_id": "nightly"}  # the store is the worker's SPARK_STORE


def test_tiny_iteration_writes_every_stage_to_s3(reference_run: ReferenceRun, s3, stack) -> None:
    ref = reference_run
    assert ref.flow_run["name"] == f"spark-{ref.run_id}"
    assert int(s3.cat_file(f"{ref.root}/LATEST")) >= 1

    cfg = ref.config
    stages = {
        key[len(ref.root) + 1 : -len("/_SUCCESS.json")]
        for key in s3.find(ref.root) if key.endswith("/_SUCCESS.json")
    }
    expected = {
        "iter=0000/checkpoint", "iter=0000/eval/benchmark=arithmetic",
        "iter=0001/samples", "iter=0001/verified", "iter=0001/reward_items", "iter=0001/reward_pool",
        "iter=0001/train/phase=policy", "iter=0001/checkpoint", "iter=0001/eval/benchmark=arithmetic",
    }
    assert expected <= stages, f"missing stages: {sorted(expected - stages)}"

    rows = {}
    for stage in sorted(s for s in stages if s.startswith(("iter=0000/", "iter=0001/"))):
        manifest = json.loads(s3.cat_file(f"{ref.root}/{stage}/_SUCCESS.json"))
        if manifest["kind"] != "table":
            continue
        _, table = read_stage(s3, ref.root, stage)
        schema = TABLES[stage.split("/")[1]]
        assert table.num_rows == manifest["rows"], stage
        assert table.column_names[: len(schema)] == schema.names, stage
        for field in schema:
            assert table.schema.field(field.name).type == field.type, f"{stage}.{field.name}"
        rows[stage] = table.num_rows

    per_iteration = cfg["sampling"]["questions_per_iteration"] * cfg["sampling"]["n"]
    assert rows["iter=0001/samples"] == per_iteration
    assert rows["iter=0001/verified"] == per_iteration
    assert rows["iter=0001/train/phase=policy"] >= 1
    assert rows["iter=0001/eval/benchmark=arithmetic"] == cfg["eval"]["benchmarks"][0]["limit"]

    checkpoint = json.loads(s3.cat_file(f"{ref.root}/iter=0001/checkpoint/_SUCCESS.json"))
    for name in checkpoint["files"]:
        assert s3.exists(f"{ref.root}/iter=0001/checkpoint/{name}"), name
    assert stray_tmp_keys(s3, ref.root) == []

    # The S3 secret never lands in the store (run.json, manifests).
    secret = stack.env()["AWS_SECRET_ACCESS_KEY"]
    for key in s3.find(ref.root):
        if key.endswith(".json"):
            assert secret not in s3.cat_file(key).decode(), key
