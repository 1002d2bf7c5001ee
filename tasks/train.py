"""GRPO updates of both phases (GPU-bound, in `flows.steps.GPU_STEPS`), the stages of
`spark_core.stages.train`; the last update of an iteration writes its checkpoint with trainer state.

With ``train.launcher`` = inprocess (default) the stage runs in this process on the shared workspace;
with torchrun / accelerate on ``train.num_processes`` ranks. ``spark_core.distributed.launch`` decides.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from spark_core.config import SparkConfig
from spark_core.distributed.launch import run_train_stage

from .common import GPU_TIMEOUT_S, step_run_name, task_options


@task(name="train-policy", task_run_name=step_run_name("train-policy"),
      **task_options(timeout_s=GPU_TIMEOUT_S))
def train_policy_task(cfg: SparkConfig, store: str, run_id: str, iteration: int, step: int = 1) -> dict[str, Any]:
    """GRPO on the policy rollouts; the summary's `reward_phase` says whether a reward phase follows."""
    return run_train_stage(cfg, store, run_id, iteration, "policy", step)


@task(name="train-reward", task_run_name=step_run_name("train-reward"),
      **task_options(timeout_s=GPU_TIMEOUT_S))
def train_reward_task(cfg: SparkConfig, store: str, run_id: str, iteration: int, step: int = 1) -> dict[str, Any]:
    """GRPO on the judged reward items (same optimizer); the last step's writes the iteration's `checkpoint`."""
    return run_train_stage(cfg, store, run_id, iteration, "reward", step)
