"""Rule-based verification of both phases' rollouts (CPU).

`spark_core.verify_pool.verify_batch` runs Math-Verify in its own process pool with a wall-clock limit per
item, so it is safe in the worker thread Prefect may run this task in (Math-Verify's `signal.alarm`
only works in a main thread, which each pool process has).
"""

from __future__ import annotations

from typing import Any

from prefect import task

from spark_core import stages
from spark_core.config import SparkConfig
from spark_core.store import Store

from .common import CPU_TIMEOUT_S, step_run_name, task_options


@task(name="verify-policy", task_run_name=step_run_name("verify-policy"),
      **task_options(timeout_s=CPU_TIMEOUT_S))
def verify_policy_task(cfg: SparkConfig, store: str, run_id: str, iteration: int, step: int = 1) -> dict[str, Any]:
    """Reward 1 when the last \\boxed{} matches the label -> `verified`."""
    return stages.verify_policy(cfg, Store(store), run_id, iteration, step=step)


@task(name="verify-reward", task_run_name=step_run_name("verify-reward"),
      **task_options(timeout_s=CPU_TIMEOUT_S))
def verify_reward_task(cfg: SparkConfig, store: str, run_id: str, iteration: int, step: int = 1) -> dict[str, Any]:
    """Judgments checked against their Yes/No/A/B label, reflections by the math verifier."""
    return stages.verify_reward(cfg, Store(store), run_id, iteration, step=step)
