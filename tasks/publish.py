"""Prefect artifacts for humans: a metrics table, the stage outputs, and a summary with a plot.

Artifact keys are ``spark-{run}-metrics``, ``spark-{run}-stages`` and ``spark-{run}-summary`` (the run id
slugified: Prefect keys allow only lowercase letters, digits and dashes). Each publish adds a new
version under the same key, so the Artifacts page shows the latest and keeps the history.

The metrics plot is written to the store as ``runs/{id}/iter=NNNN/report/metrics.png`` and embedded in
the summary as a ``data:`` URI: a browser showing the Prefect UI cannot load ``file://`` or private
``s3://`` objects, and a presigned URL would put an access key id into the artifact.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from spark_core import stages
from spark_core.config import SparkConfig
from spark_core.plots import metrics_plot
from spark_core.store import Store, iter_name

from .common import PUBLISH_TIMEOUT_S, prefect_slug, task_options


def artifact_slug(run_id: str) -> str:
    """A run id as Prefect artifact keys accept it: lowercase letters, digits and single dashes."""
    return prefect_slug(run_id)


def artifact_keys(run_id: str) -> dict[str, str]:
    slug = artifact_slug(run_id)
    return {name: f"spark-{slug}-{name}" for name in ("metrics", "stages", "summary")}


def _clean(value: Any) -> Any:
    """JSON-safe cell: NaN/inf become None, floats are rounded for reading."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 4)
    return value


def metrics_rows(cfg: SparkConfig, store: Store, run_id: str, up_to: int) -> list[dict[str, Any]]:
    """One row per iteration 0..up_to, all rows with the same columns."""
    rows = [stages.iteration_summary(cfg, store, run_id, it)
            for it in store.list_iterations(run_id) if it <= up_to]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return [{c: _clean(row.get(c)) for c in columns} for row in rows]


def stages_markdown(store: Store, run_id: str, iteration: int) -> str:
    lines = [
        f"### Run `{run_id}`, iteration {iteration}: stage outputs",
        "",
        "| stage | rows | location |",
        "|---|---:|---|",
    ]
    for stage, rows in store.list_stages(run_id, iteration).items():
        uri = store.stage_uri(run_id, iteration, stage)
        files = store.manifest(uri).get("files", [])
        if rows is None:
            where = f"`{uri}/` ({len(files)} files)"
        else:
            where = "<br>".join(f"`{uri}/{f}`" for f in files)
        lines.append(f"| {stage} | {'' if rows is None else rows} | {where} |")
    lines += [
        "",
        "Read one stage across all iterations (the `iter` column comes from the folder names), e.g. with DuckDB:",
        "",
        f"`SELECT * FROM read_parquet('{store.run_uri(run_id)}/iter=*/verified/*.parquet', hive_partitioning=true)`",
    ]
    return "\n".join(lines)


def summary_markdown(row: dict[str, Any], plot_uri: str, png: bytes) -> str:
    metrics = "\n".join(f"| {k} | {'' if v is None else v} |" for k, v in row.items())
    data = base64.b64encode(png).decode()
    return (
        f"### SPARK iteration {row['iteration']}\n\n| metric | value |\n|---|---|\n{metrics}\n\n"
        f"![metrics over iterations](data:image/png;base64,{data})\n\nPlot stored at `{plot_uri}`.\n"
    )


def publish(cfg: SparkConfig, store: Store, run_id: str, iteration: int) -> dict[str, Any]:
    """Write the plot to the store and create the three artifacts; return their keys and the plot URI."""
    keys = artifact_keys(run_id)
    rows = metrics_rows(cfg, store, run_id, iteration)
    buf = io.BytesIO()
    metrics_plot(stages.metrics_frame(cfg, store, run_id), buf)
    png = buf.getvalue()
    plot_uri = store.join(store.iter_uri(run_id, iteration), "report", "metrics.png")
    store.write_bytes(plot_uri, png)
    create_table_artifact(rows, key=keys["metrics"], description=f"SPARK run {run_id}: metrics per iteration")
    create_markdown_artifact(stages_markdown(store, run_id, iteration), key=keys["stages"],
                             description=f"SPARK run {run_id}: Parquet outputs of {iter_name(iteration)}")
    current = next((r for r in rows if r["iteration"] == iteration), {"iteration": iteration})
    create_markdown_artifact(summary_markdown(current, plot_uri, png), key=keys["summary"],
                             description=f"SPARK run {run_id}: iteration {iteration}")
    return {"artifacts": list(keys.values()), "plot": plot_uri}


@task(name="publish", task_run_name="publish-it{iteration}",
      **task_options(gpu=False, timeout_s=PUBLISH_TIMEOUT_S))
def publish_task(cfg: SparkConfig, store: str, run_id: str, iteration: int) -> dict[str, Any]:
    """Artifacts (metrics table, stage URIs, summary with plot) for the iteration just finished."""
    return publish(cfg, Store(store), run_id, iteration)
