"""GRPO updates of both phases (GPU-bound: tag `gpu`); each writes a checkpoint with trainer state.

With ``train.launcher`` = inprocess (default) the stage runs in this process on the shared workspace.
With torchrun / accelerate it runs on ``train.num_processes`` ranks started by
``spark_core.distributed.launch_train_stage``: this process first drops its in-memory model, trainer and
engine (the ranks need the accelerator, and the weights they write make the in-memory ones stale), and
the next stage reloads from the store.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import task

from spark_core import stages
from spark_core.config import SparkConfig
from spark_core.store import Store

from .common import GPU_TIMEOUT_S, task_options


def run_train_stage(cfg: SparkConfig, store: str, run_id: str, iteration: int,
                    phase: Literal["policy", "reward"]) -> dict[str, Any]:
    """One train stage, in process or over the configured launcher's ranks."""
    stage, table = (stages.train_policy, stages.TRAIN_POLICY) if phase == "policy" else (
        stages.train_reward, stages.TRAIN_REWARD)
    st = Store(store)
    done = st.is_done(st.stage_uri(run_id, iteration, table))
    if cfg.train.launcher == "inprocess" or done:
        return stage(cfg, st, run_id, iteration)  # a finished stage returns its summary without training
    from spark_core import distributed  # torch-heavy; only a launch needs it

    stages.workspace().close()  # frees the model, the KL reference and any engine
    return distributed.launch_train_stage(cfg, store, run_id, iteration, phase)


@task(name="train-policy", task_run_name="train-policy-it{iteration}",
      **task_options(gpu=True, timeout_s=GPU_TIMEOUT_S))
def train_policy_task(cfg: SparkConfig, store: str, run_id: str, iteration: int) -> dict[str, Any]:
    """GRPO on the policy rollouts; the summary's `reward_phase` says whether a reward phase follows."""
    return run_train_stage(cfg, store, run_id, iteration, "policy")


@task(name="train-reward", task_run_name="train-reward-it{iteration}",
      **task_options(gpu=True, timeout_s=GPU_TIMEOUT_S))
def train_reward_task(cfg: SparkConfig, store: str, run_id: str, iteration: int) -> dict[str, Any]:
    """GRPO on the judged reward items (same optimizer) -> the iteration's `checkpoint`."""
    return run_train_stage(cfg, store, run_id, iteration, "reward")
