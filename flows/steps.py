"""The steps the iteration loop (flows/iteration.py) calls: the Prefect tasks, or the same stages directly."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from tasks.build_reward_data import build_reward_data_task
from tasks.evaluate import evaluate_task
from tasks.finish import finish_iteration_task
from tasks.init_run import init_run_task
from tasks.publish import publish_task
from tasks.sample import sample_policy_task, sample_reward_task
from tasks.train import train_policy_task, train_reward_task
from tasks.verify import verify_policy_task, verify_reward_task

Step = Callable[..., dict[str, Any]]

# The steps that hold the accelerator (model loaded, generating or training): the ones a tag concurrency
# limit on a server should serialise (`Steps.with_concurrency_tag`).
GPU_STEPS = ("init_run_task", "sample_policy_task", "train_policy_task", "sample_reward_task",
             "train_reward_task", "evaluate_task")


@dataclass(frozen=True)
class Steps:
    """What the iteration loop (flows/iteration.py) calls per step, named after the Prefect tasks (``TASKS``).

    Every step takes ``(cfg, store_uri, run_id[, iteration[, step | benchmark]])`` and returns the stage's
    summary. ``Steps.direct()`` runs the same stages in this process without Prefect (benchmarks,
    notebooks); ``wrapped`` decorates every step (timers)."""

    init_run_task: Step
    sample_policy_task: Step
    verify_policy_task: Step
    build_reward_data_task: Step
    train_policy_task: Step
    sample_reward_task: Step
    verify_reward_task: Step
    train_reward_task: Step
    evaluate_task: Step
    publish_task: Step
    finish_iteration_task: Step

    @classmethod
    def direct(cls) -> "Steps":
        """The stage functions of ``spark_core.stages`` on ``Store(store_uri)``; publishing is skipped (its
        artifacts live in Prefect). Stages are looked up when called, so wrapping them there is seen."""
        from spark_core import stages
        from spark_core.distributed.launch import run_train_stage
        from spark_core.store import Store

        def on_store(name: str) -> Step:
            return lambda cfg, store, *args: getattr(stages, name)(cfg, Store(store), *args)

        def per_step(name: str) -> Step:  # stages of one RL step: (cfg, store, run_id, iteration, step)
            return lambda cfg, store, run_id, i, step=1: getattr(stages, name)(cfg, Store(store), run_id, i, step=step)

        return cls(
            init_run_task=on_store("init_run"),
            sample_policy_task=per_step("sample_policy"),
            verify_policy_task=per_step("verify_policy"),
            build_reward_data_task=per_step("build_reward_data"),
            train_policy_task=lambda cfg, store, run_id, i, step=1: run_train_stage(cfg, store, run_id, i, "policy", step),
            sample_reward_task=per_step("sample_reward"),
            verify_reward_task=per_step("verify_reward"),
            train_reward_task=lambda cfg, store, run_id, i, step=1: run_train_stage(cfg, store, run_id, i, "reward", step),
            evaluate_task=on_store("evaluate"),
            publish_task=lambda cfg, store, run_id, i: {},
            finish_iteration_task=on_store("finish_iteration"),
        )

    def with_concurrency_tag(self, tag: str | None) -> "Steps":
        """The Prefect tasks of ``GPU_STEPS`` tagged ``tag`` (for a server-side tag concurrency limit), the
        others unchanged; ``self`` when ``tag`` is empty. Tags are off by default because every tagged
        task run asks the server for a slot, which stalls ~2 s whenever a SQLite server is busy writing."""
        if not tag:
            return self
        return replace(self, **{name: getattr(self, name).with_options(tags=[tag]) for name in GPU_STEPS})

    def wrapped(self, wrap: Callable[[str, Step], Step]) -> "Steps":
        """Every step replaced by ``wrap(name, step)``."""
        return replace(self, **{f.name: wrap(f.name, getattr(self, f.name)) for f in fields(self)})


TASKS = Steps(
    init_run_task=init_run_task, sample_policy_task=sample_policy_task, verify_policy_task=verify_policy_task,
    build_reward_data_task=build_reward_data_task, train_policy_task=train_policy_task,
    sample_reward_task=sample_reward_task, verify_reward_task=verify_reward_task,
    train_reward_task=train_reward_task, evaluate_task=evaluate_task, publish_task=publish_task,
    finish_iteration_task=finish_iteration_task,
)
