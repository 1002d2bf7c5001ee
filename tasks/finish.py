"""Closing an iteration: drop the intermediate checkpoint and advance LATEST."""

from __future__ import annotations

from typing import Any

from prefect import task

from spark_core import stages
from spark_core.config import SparkConfig
from spark_core.store import Store

from .common import CPU_TIMEOUT_S, task_options


@task(name="finish-iteration", task_run_name="finish-it{iteration}",
      **task_options(timeout_s=CPU_TIMEOUT_S))
def finish_iteration_task(cfg: SparkConfig, store: str, run_id: str, iteration: int) -> dict[str, Any]:
    """Check the iteration's outputs are complete, then set LATEST to it."""
    return stages.finish_iteration(cfg, Store(store), run_id, iteration)
