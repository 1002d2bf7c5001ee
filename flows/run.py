"""A whole SPARK run as a Prefect flow: iterations as subflows until the target count is complete."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from spark_core.config import SparkConfig
from spark_core.stages import StageError

from flows.common import resolve
from flows.guard import DEFAULT_WAIT_S
from flows.iteration import spark_iteration


@flow(name="spark-run", validate_parameters=True)
def spark_run(
    config: SparkConfig | None = None,
    iterations: int | None = None,
    run_id: str | None = None,
    store: str | None = None,
    lock_wait_s: float = DEFAULT_WAIT_S,
) -> dict[str, Any]:
    """Create or resume a run and run it until `iterations` (default: the config's) are complete.

    Resumable: completed iterations are skipped (LATEST), and a crashed iteration resumes from the
    stages already in the store. `run_id` defaults to `{preset}-{timestamp}` for a new run.
    """
    cfg, st, run_id = resolve(config, store, run_id, iterations)
    logger = get_run_logger()
    logger.info("run %s in %s: target %d iterations", run_id, st.uri, cfg.iterations)
    results = []
    while True:
        before = st.latest(run_id)
        if before is not None and before >= cfg.iterations:
            break
        results.append(spark_iteration(run_id=run_id, config=cfg, store=st.uri, lock_wait_s=lock_wait_s))
        after = st.latest(run_id)
        if after is None or (before is not None and after <= before):
            raise StageError(f"run {run_id}: iteration after {before} did not complete (LATEST={after})")
    return {"run_id": run_id, "store": st.uri, "latest": st.latest(run_id), "iterations": results}
