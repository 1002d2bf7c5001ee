"""Rollout generation for both phases (GPU-bound: tag `gpu`)."""

from __future__ import annotations

from typing import Any

from prefect import task

from spark_core import stages
from spark_core.config import SparkConfig
from spark_core.store import Store

from .common import GPU_TIMEOUT_S, task_options


@task(name="sample-policy", task_run_name="sample-policy-it{iteration}",
      **task_options(gpu=True, timeout_s=GPU_TIMEOUT_S))
def sample_policy_task(cfg: SparkConfig, store: str, run_id: str, iteration: int) -> dict[str, Any]:
    """K rollouts per question of the iteration's batch, from the previous checkpoint -> `samples`."""
    return stages.sample_policy(cfg, Store(store), run_id, iteration)


@task(name="sample-reward", task_run_name="sample-reward-it{iteration}",
      **task_options(gpu=True, timeout_s=GPU_TIMEOUT_S))
def sample_reward_task(cfg: SparkConfig, store: str, run_id: str, iteration: int) -> dict[str, Any]:
    """K samples per popped judgment/reflection item, from the after-policy model -> `reward_samples`."""
    return stages.sample_reward(cfg, Store(store), run_id, iteration)
