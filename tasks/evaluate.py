"""Evaluation of one benchmark on an iteration's checkpoint (GPU-bound, in `flows.steps.GPU_STEPS`)."""

from __future__ import annotations

from typing import Any

from prefect import task

from spark_core import stages
from spark_core.config import SparkConfig
from spark_core.store import Store

from .common import GPU_TIMEOUT_S, task_options


@task(name="evaluate", task_run_name="evaluate-{benchmark}-it{iteration}",
      **task_options(timeout_s=GPU_TIMEOUT_S))
def evaluate_task(cfg: SparkConfig, store: str, run_id: str, iteration: int, benchmark: str) -> dict[str, Any]:
    """Accuracy with and without self-reflection, self-judgment quality -> `eval/benchmark={name}`."""
    return stages.evaluate(cfg, Store(store), run_id, iteration, benchmark)
