"""deployments/prefect.yaml and the checks of `spark deploy`, without a server."""

from __future__ import annotations

import pytest
from prefect.utilities.callables import parameter_schema

from deployments.deploy import (
    PREFECT_FILE,
    REPO_DIR,
    DeployError,
    check_parameter_schema,
    deploy,
    deployment_specs,
    flow_name,
)
from flows.iteration import spark_iteration
from flows.run import spark_run
from infra.local import free_port


def test_yaml_declares_both_deployments_on_the_process_pool() -> None:
    specs = {s["name"]: s for s in deployment_specs()}
    assert set(specs) == {"spark-run", "spark-iteration"}
    for spec in specs.values():
        assert spec["work_pool"]["name"] == "spark-process"
        path, func = spec["entrypoint"].split(":")
        assert (REPO_DIR / path).is_file()
        # Runs from this checkout: the pull step changes into it (path filled in at deploy time).
        assert spec["pull"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $SPARK_REPO_DIR }}"}}
        ]
    [schedule] = specs["spark-iteration"]["schedules"]
    assert schedule["active"] is False and schedule["cron"]
    # The store comes from the worker's $SPARK_STORE: a schedule names only its run.
    assert schedule["parameters"] == {"run_id": "nightly"}


def test_flow_names_are_read_from_the_entrypoints() -> None:
    assert flow_name("flows/iteration.py:spark_iteration") == spark_iteration.name == "spark-iteration"
    assert flow_name("flows/run.py:spark_run") == spark_run.name == "spark-run"
    with pytest.raises(DeployError, match="no function"):
        flow_name("flows/run.py:missing")


@pytest.mark.parametrize("flow", [spark_iteration, spark_run])
def test_flow_parameter_schema_makes_a_form(flow) -> None:
    schema = parameter_schema(flow.fn).model_dump_for_openapi()
    check_parameter_schema(schema, flow.name)


def test_forms_that_would_override_the_preset_are_rejected() -> None:
    described = {"description": "d"}
    with pytest.raises(DeployError, match=r"without a description: \['store'\]"):
        check_parameter_schema({"properties": {"store": {"type": "string"}}}, "x/y")
    with pytest.raises(DeployError, match="not typed by SparkConfigOverrides"):
        check_parameter_schema({"properties": {"overrides": {"type": "object", **described}}}, "x/y")
    with pytest.raises(DeployError, match="`preset` offers"):
        check_parameter_schema({"properties": {"preset": {"type": "string", **described}}}, "x/y")
    sections = {k: {"default": None} for k in ("model", "sampling", "train", "store")}
    schema = {"properties": {"overrides": {"$ref": "#/definitions/SparkConfigOverrides", **described}},
              "definitions": {"SparkConfigOverrides": {"properties": {**sections, "seed": {"default": 0}}}}}
    with pytest.raises(DeployError, match=r"non-null default .*\['seed'\]"):
        check_parameter_schema(schema, "x/y")


def test_deploy_needs_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(DeployError, match="PREFECT_API_URL is not set"):
        deploy()
    with pytest.raises(DeployError, match="no Prefect server answers"):
        deploy(api_url=f"http://127.0.0.1:{free_port()}/api")
    assert PREFECT_FILE.name == "prefect.yaml"
