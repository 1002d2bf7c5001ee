"""Rollout generation for both phases (GPU-bound, in `flows.steps.GPU_STEPS`)."""

from __future__ import annotations

from typing import Any

from prefect import task

from spark_core import stages
from spark_core.config import SparkConfig
from spark_core.store import Store

from .common import GPU_TIMEOUT_S, step_run_name, task_options


@task(name="sample-policy", task_run_name=step_run_name("sample-policy"),
      **task_options(timeout_s=GPU_TIMEOUT_S))
def sample_policy_task(cfg: SparkConfig, store: str, run_id: str, iteration: int, step: int = 1) -> dict[str, Any]:
    """K rollouts per question of the step's batch, from the weights after the earlier steps -> `samples`."""
    return stages.sample_policy(cfg, Store(store), run_id, iteration, step=step)


@task(name="sample-reward", task_run_name=step_run_name("sample-reward"),
      **task_options(timeout_s=GPU_TIMEOUT_S))
def sample_reward_task(cfg: SparkConfig, store: str, run_id: str, iteration: int, step: int = 1) -> dict[str, Any]:
    """K samples per popped judgment/reflection item, from the after-policy model -> `reward_samples`."""
    return stages.sample_reward(cfg, Store(store), run_id, iteration, step=step)
