"""Recycling verified rollouts into judgment and reflection items, and the FIFO pool step (CPU)."""

from __future__ import annotations

from typing import Any

from prefect import task

from spark_core import stages
from spark_core.config import SparkConfig
from spark_core.store import Store

from .common import CPU_TIMEOUT_S, step_run_name, task_options


@task(name="build-reward-data", task_run_name=step_run_name("build-reward-data"),
      **task_options(timeout_s=CPU_TIMEOUT_S))
def build_reward_data_task(cfg: SparkConfig, store: str, run_id: str, iteration: int, step: int = 1) -> dict[str, Any]:
    """`reward_items` from this iteration's groups; `reward_pool` with the batch popped for the reward phase."""
    return stages.build_reward_data(cfg, Store(store), run_id, iteration, step=step)
