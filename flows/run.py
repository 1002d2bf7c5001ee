"""A whole SPARK run as a Prefect flow: iterations as subflows until the target count is complete."""

from __future__ import annotations

from typing import Any, Optional

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from spark_core.config import PresetName
from spark_core.overrides import ConfigMapping, ConfigOverrides
from spark_core.stages import StageError
from tasks.common import prefect_slug

from flows.common import resolve
from flows.guard import DEFAULT_WAIT_S
from flows.iteration import spark_iteration


def progress_key(run_id: str) -> str:
    """Key of a run's progress artifact (Prefect keys: lowercase letters, digits, dashes)."""
    return f"spark-{prefect_slug(run_id)}-progress"


def _progress(run_id: str, done: int, total: int) -> tuple[float, str]:
    return 100.0 * min(done, total) / total, f"Run {run_id}: {done} of {total} iterations complete"


@flow(name="spark-run", validate_parameters=True)
def spark_run(
    preset: Optional[PresetName] = None,
    overrides: Optional[ConfigOverrides] = None,  # type: ignore[valid-type]
    config: Optional[ConfigMapping] = None,
    iterations: Optional[int] = None,
    run_id: Optional[str] = None,
    store: Optional[str] = None,
    lock_wait_s: float = DEFAULT_WAIT_S,
    gpu_concurrency_tag: Optional[str] = None,
) -> dict[str, Any]:
    """Create or resume a run and run it until `iterations` (default: the config's) are complete.

    Resumable: completed iterations are skipped (LATEST), and a crashed iteration resumes from the
    stages already in the store. A progress artifact shows iterations done / target as it goes.

    Args:
        preset: Packaged preset a new run starts from. Leave empty to continue an existing run with the
            config recorded in its run.json.
        overrides: Only the values to change from the preset (every field left empty keeps the preset's
            value). Dotted keys work over the API: {"train.lr": 1e-6}.
        config: Advanced, for API callers: a full or partial SparkConfig as JSON (it may name a
            "preset"); preset and overrides are laid over it.
        iterations: Iterations the run should have when this flow run ends (default: the config's).
        run_id: The run to create or continue. Default for a new run: {preset}-{UTC timestamp}.
        store: Store URI above runs/ (a folder or s3://bucket/prefix). Default: the store.uri given in
            config/overrides, else the worker's $SPARK_STORE (the local stack sets s3://spark), else
            ./spark-store.
        lock_wait_s: Seconds to wait while another flow run holds this run before failing.
        gpu_concurrency_tag: Tag the GPU-bound tasks with this tag, for a tag concurrency limit created on
            the server. Leave empty without such a limit (each tagged task then costs a slot request).
    """
    cfg, st, run_id = resolve(config, store, run_id, iterations, preset=preset, overrides=overrides)
    logger = get_run_logger()
    logger.info("run %s in %s: target %d iterations", run_id, st.run_uri(run_id), cfg.iterations)
    progress, text = _progress(run_id, st.latest(run_id) or 0, cfg.iterations)
    artifact = create_progress_artifact(progress, key=progress_key(run_id), description=text)
    results = []
    while True:
        before = st.latest(run_id)
        if before is not None and before >= cfg.iterations:
            break
        results.append(spark_iteration(run_id=run_id, config=cfg, store=st.uri, lock_wait_s=lock_wait_s,
                                       gpu_concurrency_tag=gpu_concurrency_tag))
        after = st.latest(run_id)
        if after is None or (before is not None and after <= before):
            raise StageError(f"run {run_id}: iteration after {before} did not complete (LATEST={after})")
        progress, text = _progress(run_id, after, cfg.iterations)
        update_progress_artifact(artifact, progress, description=text)
    return {"run_id": run_id, "store": st.uri, "latest": st.latest(run_id), "iterations": results}
