"""Prefect artifacts for humans, per iteration: a metrics table, the stage outputs, a summary with a plot,
a preview table per stage, the iteration's lineage and the run index; and the stages as Prefect assets.

Their rows, markdown and plot are built by ``spark_core.stages.report`` and ``spark_core.lineage``; this
module only hands them to Prefect (assets: tasks/assets.py).

Artifact keys (the run id slugified: Prefect keys allow only lowercase letters, digits and dashes):

- ``spark-{run}-metrics`` (table), ``spark-{run}-summary`` (metrics + plot), ``spark-{run}-stages``
  (row counts and Parquet parts), ``spark-{run}-lineage`` (which stage read what: Mermaid + table),
  ``spark-{run}-index`` (every iteration with its folder, stages and key metrics);
- ``spark-{run}-{stage}`` per table stage (``spark-demo-samples``, ``spark-demo-train-phase-policy``):
  its columns and first rows, long text cut at 80 characters.

Each publish adds a new version under the same key, so the Artifacts page shows the latest and keeps
one version per iteration, each linked to the flow run that made it.

The metrics plot is written to the store as ``runs/{id}/iter=NNNN/report/metrics.png`` and embedded in
the summary as a ``data:`` URI: a browser showing the Prefect UI cannot load ``file://`` or private
``s3://`` objects, and a presigned URL would put an access key id into the artifact.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.settings import get_current_settings

from spark_core import faults, lineage
from spark_core.config import SparkConfig
from spark_core.layout import iter_name
from spark_core.stages import report
from spark_core.store import Store

from .assets import record_assets
from .common import PUBLISH_TIMEOUT_S, prefect_slug, task_options

RUN_ARTIFACTS = ("metrics", "stages", "summary", "lineage", "index")


def artifact_slug(run_id: str) -> str:
    """A run id as Prefect artifact keys accept it: lowercase letters, digits and single dashes."""
    return prefect_slug(run_id)


def artifact_keys(run_id: str) -> dict[str, str]:
    slug = artifact_slug(run_id)
    return {name: f"spark-{slug}-{name}" for name in RUN_ARTIFACTS}


def stage_artifact_key(run_id: str, stage: str) -> str:
    """Key of a stage's preview table (`train/phase=policy` -> `spark-{run}-train-phase-policy`)."""
    return f"spark-{artifact_slug(run_id)}-{prefect_slug(stage)}"


def artifact_url(key: str) -> str:
    """Where the UI shows every version of an artifact key (absolute when the UI URL is known)."""
    base = (get_current_settings().ui_url or "").rstrip("/")
    return f"{base}/artifacts/key/{key}"


class _InOrder:
    """Artifact requests sent one at a time, in the order given, from a background thread, while publish
    reads the store, draws the plot and declares the assets: each request costs 10-30 ms, most of it the
    server's (a temporary API on a 2-core machine, 2026-12-01). One at a time, as from the task itself,
    so the server sees the same sequence of writes. Each call runs in a copy of the caller's context
    (Prefect's task run and client), so the artifacts belong to this task run."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spark-artifacts")
        self._pending: list[Future[Any]] = []

    def __call__(self, create: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._pending.append(self._pool.submit(contextvars.copy_context().run, create, *args, **kwargs))

    def wait(self) -> None:
        """Until every request so far is answered; raises the first one's error."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for the requests in flight; raise the first error unless the caller is failing anyway."""
        try:
            if raise_errors:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)


def publish_previews(store: Store, run_id: str, iteration: int, nodes: list[lineage.StageNode],
                     send: Callable[..., None] | None = None) -> dict[str, str]:
    """One table artifact per table stage: its columns and first rows. Returns stage -> artifact key.
    `send(create, *args, **kwargs)` makes the request (default: at once, in this thread)."""
    send = send or (lambda create, *args, **kwargs: create(*args, **kwargs))
    keys = {}
    for node in nodes:
        if node.kind != "table":
            continue
        columns, rows = report.stage_preview(store, node.uri)
        key = stage_artifact_key(run_id, node.stage)
        shown = f"first {len(rows)} of {node.rows} rows" if rows else f"{node.rows} rows"
        # No rows: columns with empty lists, so the UI still shows the table's header.
        table: Any = rows if rows else {c: [] for c in columns}
        send(create_table_artifact, table, key=key, description=(
            f"{run_id} {iter_name(iteration)} {node.stage}: {shown}, {len(columns)} columns "
            f"(text cut at {report.PREVIEW_WIDTH} characters). {node.uri}"))
        keys[node.stage] = key
    return keys


def publish(cfg: SparkConfig, store: Store, run_id: str, iteration: int) -> dict[str, Any]:
    """Write the iteration's record and plot to the store, create the artifacts and declare the stages as
    assets. Earlier iterations come from their records, so the cost does not grow with the run."""
    keys = artifact_keys(run_id)
    nodes = lineage.iteration_lineage(store, run_id, iteration)
    current = report.iteration_record(cfg, store, run_id, iteration, nodes)
    records = report.run_records(cfg, store, run_id, current, iteration)
    rows = report.metrics_rows(records)
    summary_row = next((r for r in rows if r["iteration"] == iteration), {"iteration": iteration})
    run_uri = store.run_uri(run_id)

    send = _InOrder()
    try:
        send(create_table_artifact, rows, key=keys["metrics"], description=f"SPARK run {run_id}: metrics per iteration")
        send(create_markdown_artifact, report.stages_markdown(store, run_id, iteration), key=keys["stages"],
             description=f"SPARK run {run_id}: Parquet outputs of {iter_name(iteration)}")
        plot_uri, png = report.write_plot(cfg, store, run_id, iteration, rows)  # while those two are sent
        send(create_markdown_artifact, report.summary_markdown(summary_row, plot_uri, png), key=keys["summary"],
             description=f"SPARK run {run_id}: iteration {iteration}")
        send.wait()
        # Fault tests hold publishing here: some artifacts exist, the rest and LATEST not (spark_core.faults).
        faults.hold_point(store.join(run_uri, iter_name(iteration), "publish"), "mid_write")
        previews = publish_previews(store, run_id, iteration, nodes, send)
        send(create_markdown_artifact, lineage.lineage_markdown(run_id, iteration, nodes, run_uri),
             key=keys["lineage"], description=f"SPARK run {run_id}: lineage of {iter_name(iteration)}")
        links = {stage: artifact_url(key) for stage, key in previews.items()}
        stages = {it: [(stage, count) for stage, count in rec["stages"]] for it, rec in records.items()}
        send(create_markdown_artifact, report.run_index_markdown(run_id, run_uri, rows, stages, links),
             key=keys["index"], description=f"SPARK run {run_id}: index of its iterations")
        assets = record_assets(run_id, iteration, nodes, links)  # while the last artifacts are sent
    except BaseException:
        send.close(raise_errors=False)  # the error in hand is the one to report
        raise
    send.close()
    # Stored last: a record exists only for an iteration published in full.
    report.save_record(store, run_id, iteration, current)
    return {"artifacts": [*keys.values(), *previews.values()], "plot": plot_uri, "assets": assets}


@task(name="publish", task_run_name="publish-it{iteration}",
      **task_options(timeout_s=PUBLISH_TIMEOUT_S))
def publish_task(cfg: SparkConfig, store: str, run_id: str, iteration: int) -> dict[str, Any]:
    """Artifacts (metrics, summary with plot, stage previews, lineage, run index) and the stages as assets."""
    return publish(cfg, Store(store), run_id, iteration)
