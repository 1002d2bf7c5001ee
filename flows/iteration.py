"""One SPARK iteration as a Prefect flow: the paper's loop, read top to bottom.

The policy and the generative reward model are ONE model. Each iteration is `steps_per_iteration` RL
steps (default 1), each on a fresh batch of questions:

1. policy phase: sample K answers per question, verify them against the labels, recycle the verified
   groups into judgment and reflection items (FIFO pool), then a GRPO step on the answers;
2. reward phase (once the pool holds a batch): sample K judgments/reflections per popped item from the
   just-updated model, verify them against their known labels, then a second GRPO step;

then, once per iteration: its ONE checkpoint (written by the last update), evaluation every `eval.every`
iterations, artifacts, LATEST, and the event `spark.iteration.completed` (a deployment trigger may start
the next iteration on it). Between updates the weights stay in the live workspace, not the store.

Every step is a task that reads its inputs from the store and writes its outputs there; a step whose
output already exists is skipped, so re-triggering a crashed iteration resumes it: from the iteration's
start checkpoint, replaying the updates of the steps already stored (no resampling). The loop takes its
steps as an argument (`flows.steps.Steps`): the flow passes the Prefect tasks, the benchmarks the same
stages called directly, so there is one copy of the loop.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from prefect import flow, get_run_logger

from spark_core.config import PresetName, SparkConfig
from spark_core.overrides import ConfigMapping, ConfigOverrides
from spark_core.stages import eval_due, published_summary

from flows.common import resolve
from flows.guard import DEFAULT_WAIT_S, run_guard
from flows.steps import TASKS, Steps
from tasks.events import emit_iteration_completed


def _evaluate(cfg: SparkConfig, store: str, run_id: str, iteration: int, steps: Steps) -> None:
    if eval_due(cfg, iteration):
        for benchmark in cfg.eval.benchmarks:
            steps.evaluate_task(cfg, store, run_id, iteration, benchmark.name)


def start_run(cfg: SparkConfig, store: str, run_id: str, check: Callable[[], None], steps: Steps = TASKS) -> None:
    """Iteration 0: the initial model (also the frozen KL reference) and its baseline evaluation."""
    steps.init_run_task(cfg, store, run_id)
    _evaluate(cfg, store, run_id, 0, steps)
    check()  # still our run lease? only then make the iteration visible
    steps.publish_task(cfg, store, run_id, 0)
    steps.finish_iteration_task(cfg, store, run_id, 0)


def run_iteration(cfg: SparkConfig, store: str, run_id: str, i: int, check: Callable[[], None],
                  steps: Steps = TASKS) -> None:
    """Iteration i >= 1: the checkpoint of i-1 samples; the result is the checkpoint of i."""
    for step in range(1, cfg.steps_per_iteration + 1):
        # Policy phase: answer, check, recycle the checked answers into reward data, learn.
        steps.sample_policy_task(cfg, store, run_id, i, step)
        steps.verify_policy_task(cfg, store, run_id, i, step)
        if cfg.reward_data.enabled:
            steps.build_reward_data_task(cfg, store, run_id, i, step)
        trained = steps.train_policy_task(cfg, store, run_id, i, step)

        # Reward phase: the same model judges/reflects on popped pool items; rewarded by known labels.
        if trained["reward_phase"]:
            steps.sample_reward_task(cfg, store, run_id, i, step)
            steps.verify_reward_task(cfg, store, run_id, i, step)
            steps.train_reward_task(cfg, store, run_id, i, step)

    _evaluate(cfg, store, run_id, i, steps)
    check()  # still our run lease? only then make the iteration visible
    steps.publish_task(cfg, store, run_id, i)
    steps.finish_iteration_task(cfg, store, run_id, i)


@flow(name="spark-iteration", flow_run_name="spark-{run_id}", validate_parameters=True)
def spark_iteration(
    run_id: str,
    preset: Optional[PresetName] = None,
    overrides: Optional[ConfigOverrides] = None,  # type: ignore[valid-type]
    config: Optional[ConfigMapping] = None,
    store: Optional[str] = None,
    lock_wait_s: float = DEFAULT_WAIT_S,
    gpu_concurrency_tag: Optional[str] = None,
) -> dict[str, Any]:
    """Run the next iteration of a run (after its LATEST), creating the run first if needed.

    Nothing happens once LATEST reaches the config's `iterations`. Returns the iteration's metrics.

    Args:
        run_id: The run to create or continue (letters, digits, '.', '_', '-'). Its data lives under
            STORE/runs/RUN_ID/.
        preset: Packaged preset a new run starts from. Leave empty to continue an existing run with the
            config recorded in its run.json.
        overrides: Only the values to change from the preset (every field left empty keeps the preset's
            value), e.g. sampling.n or iterations. Dotted keys work over the API: {"train.lr": 1e-6}.
            For an existing run only results-neutral fields may change (iterations, store options).
        config: Advanced, for API callers: a full or partial SparkConfig as JSON (it may name a
            "preset"); preset and overrides are laid over it.
        store: Store URI above runs/ (a folder or s3://bucket/prefix). Default: the store.uri given in
            config/overrides, else the worker's $SPARK_STORE (the local stack sets s3://spark), else
            ./spark-store.
        lock_wait_s: Seconds to wait while another flow run holds this run (its store lease) before
            failing with the holder's name.
        gpu_concurrency_tag: Tag the GPU-bound tasks (sampling, training, evaluation) with this tag, for
            a tag concurrency limit you created on the server (`prefect concurrency-limit create gpu 1`).
            Leave empty without such a limit: each tagged task asks the server for a slot, which on a
            SQLite server stalls about 2 s whenever the database is busy.
    """
    cfg, st, run_id = resolve(config, store, run_id, preset=preset, overrides=overrides)
    logger = get_run_logger()
    steps = TASKS.with_concurrency_tag(gpu_concurrency_tag)
    with run_guard(st, run_id, lock_wait_s) as lock:
        if st.latest(run_id) is None:
            st.cleanup_tmp(run_id)
            start_run(cfg, st.uri, run_id, lock.check, steps)
        latest = st.latest(run_id) or 0
        if latest >= cfg.iterations:
            logger.info("run %s already has %d of %d iterations; nothing to do", run_id, latest, cfg.iterations)
            return {"run_id": run_id, "iteration": latest, "status": "complete"}
        i = latest + 1
        st.cleanup_tmp(run_id)  # leftovers of a crashed writer; we hold the lock, nobody else writes
        run_iteration(cfg, st.uri, run_id, i, lock.check, steps)
        # A write that failed while the store was unreachable (its task retried and committed) may have
        # left its temporary upload behind: the iteration ends without debris.
        st.cleanup_tmp(run_id, i)
    summary = published_summary(cfg, st, run_id, i)  # one read instead of every manifest
    logger.info("run %s iteration %d: %s", run_id, i, summary)
    # After the lease is released, so the run this event may trigger finds the run free.
    emit_iteration_completed(run_id, st.uri, i, cfg.iterations, summary)
    return {"run_id": run_id, "status": "ran", **summary}
