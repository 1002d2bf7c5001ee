"""The UI's way of starting and continuing a run, on the real stack: the Custom-run form filled with every
schema default and preset `tiny` chosen runs exactly the tiny preset in the stack's store (SPARK_STORE =
s3://BUCKET, runs under s3://BUCKET/runs/ with no doubled runs/), and the README's request
`{"parameters": {"run_id": ...}}` alone continues it. Also the README's offline DuckDB recipe for s3://."""

from __future__ import annotations

import contextlib
import io
import json
import os
from unittest import mock

import duckdb
import fsspec
import pyarrow as pa
import pytest

from deployments.deploy import Deployed, form_defaults
from infra.local import Stack
from spark_core.config import load_config
from spark_core.layout import TRAIN_POLICY, TRAIN_REWARD, duckdb_recipe
from spark_core.store import Store

from it_helpers import create_flow_run, run_root, wait_flow_run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_form_defaults_run_the_tiny_preset_and_run_id_alone_continues(
    stack: Stack, prefect_api: str, deployed: dict[str, Deployed], worker: Stack, s3
) -> None:
    dep = deployed["spark-iteration"]
    params = form_defaults(dep.parameter_schema)
    assert params["overrides"]["sampling"]["n"] is None and params["store"] is None
    run_id = "ui-form"
    cache = str(stack.state_dir / "cache" / "models")  # the only value typed: reuse the built tiny model
    params.update(run_id=run_id, preset="tiny")
    params["overrides"]["model"]["cache_dir"] = cache
    _, first = create_flow_run(prefect_api, dep.id, params, f"{run_id}-1")
    wait_flow_run(prefect_api, first["id"], stack, timeout_s=600)

    store = stack.env()["SPARK_STORE"]
    assert store == stack.store_uri() == f"s3://{stack.settings.bucket}"
    root = run_root(store, run_id)
    assert root == f"{stack.settings.bucket}/runs/{run_id}" and not s3.exists(f"{stack.settings.bucket}/runs/runs")
    assert int(s3.cat_file(f"{root}/LATEST")) == 1
    record = json.loads(s3.cat_file(f"{root}/run.json"))
    tiny = load_config(preset="tiny", overrides={"model": {"cache_dir": cache}})
    assert record["config_hash"] == tiny.config_hash()
    assert record["config"]["sampling"] == tiny.sampling.model_dump(mode="json")

    # The README's continue request, exactly: only the run id; store and config come from the stack and run.json.
    _, second = create_flow_run(prefect_api, dep.id, {"run_id": run_id}, f"{run_id}-2")
    done = wait_flow_run(prefect_api, second["id"], stack, timeout_s=600)
    assert done["parameters"] == {"run_id": run_id}
    assert int(s3.cat_file(f"{root}/LATEST")) == 2


def test_duckdb_reads_s3_offline_through_fsspec(stack: Stack, s3) -> None:
    """README recipe: DuckDB's httpfs cannot be downloaded here; registering an fsspec S3 filesystem works."""
    env = stack.env()
    with mock.patch.dict(os.environ, env):
        st = Store(env["SPARK_STORE"] + "/duckdb")
        for it in (1, 2):
            for phase, stage in (("policy", TRAIN_POLICY), ("reward", TRAIN_REWARD)):
                steps = [10 * it + (phase == "reward")]
                st.write_table(st.stage_uri("d", it, stage), pa.table({"step": steps, "phase": [phase], "loss": [0.5]}))
        run = st.run_uri("d")

        con = duckdb.connect()
        con.register_filesystem(fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]))
        rows = con.sql(
            f"select iter, phase, step from read_parquet('{run}/*/train/*/*.parquet', hive_partitioning=true, "
            "hive_types={'iter': 'INTEGER'}) order by step"
        ).fetchall()
        # The recipe the layout prints for artifacts and docs runs as printed.
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(duckdb_recipe(run, TRAIN_POLICY), "<recipe>", "exec"), {})
    assert rows == [(1, "policy", 10), (1, "reward", 11), (2, "policy", 20), (2, "reward", 21)]
    header, *lines = printed.getvalue().strip().splitlines()
    assert {"step", "iter", "phase"} <= set(header.split()) and len(lines) == 2 and all("policy" in ln for ln in lines)
