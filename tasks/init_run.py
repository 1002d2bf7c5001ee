"""Iteration 0: run.json and the initial model checkpoint (also the frozen KL reference)."""

from __future__ import annotations

from typing import Any

from prefect import task

from spark_core import stages
from spark_core.config import SparkConfig
from spark_core.store import Store

from .common import GPU_TIMEOUT_S, task_options


@task(name="init-run", task_run_name="init-run-{run_id}", **task_options(timeout_s=GPU_TIMEOUT_S))
def init_run_task(cfg: SparkConfig, store: str, run_id: str) -> dict[str, Any]:
    """Write run.json and `iter=0000/checkpoint` (skipped when they exist)."""
    return stages.init_run(cfg, Store(store), run_id)
