"""GRPO updates of both phases (GPU-bound: tag `gpu`); each writes a checkpoint with trainer state."""

from __future__ import annotations

from typing import Any

from prefect import task

from spark_core import stages
from spark_core.config import SparkConfig
from spark_core.store import Store

from .common import GPU_TIMEOUT_S, task_options


@task(name="train-policy", task_run_name="train-policy-it{iteration}",
      **task_options(gpu=True, timeout_s=GPU_TIMEOUT_S))
def train_policy_task(cfg: SparkConfig, store: str, run_id: str, iteration: int) -> dict[str, Any]:
    """GRPO on the policy rollouts; the summary's `reward_phase` says whether a reward phase follows."""
    return stages.train_policy(cfg, Store(store), run_id, iteration)


@task(name="train-reward", task_run_name="train-reward-it{iteration}",
      **task_options(gpu=True, timeout_s=GPU_TIMEOUT_S))
def train_reward_task(cfg: SparkConfig, store: str, run_id: str, iteration: int) -> dict[str, Any]:
    """GRPO on the judged reward items (same optimizer) -> the iteration's `checkpoint`."""
    return stages.train_reward(cfg, Store(store), run_id, iteration)
