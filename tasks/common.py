"""Settings every task shares: timeouts, and which failures are worth a retry.

Tasks carry no tags by default: Prefect asks the server for a concurrency slot for every tagged task
run, and on a SQLite server that request writes to the database, so it can fail with "database is
locked" while another write is going on; the client then retries after about 2 s (Prefect 3.9.1,
``concurrency/services.py`` and ``client/base.py``). To limit the GPU-bound steps on a server, create a
tag limit AND pass its tag to the flow (``gpu_concurrency_tag``, see ``flows.steps.GPU_STEPS``)::

    prefect concurrency-limit create gpu 1

Timeouts are generous defaults for real runs and can be changed without code through environment
variables: ``SPARK_GPU_TASK_TIMEOUT_S`` (default 6 h), ``SPARK_CPU_TASK_TIMEOUT_S`` (1 h) and
``SPARK_PUBLISH_TIMEOUT_S`` (10 min).

Only storage failures are retried by Prefect (the store already retried its own I/O with backoff; a
Prefect retry covers an object store that is down for longer, e.g. restarting). Every stage is
idempotent, so a retried task resumes from what is already in the store. Other errors fail at once:
retrying a bug or a bad config only wastes accelerator time.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

from spark_core.store import RunLockedError, StoreError



def _seconds(var: str, default: float) -> float:
    raw = os.environ.get(var)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a number of seconds") from None


GPU_TIMEOUT_S = _seconds("SPARK_GPU_TASK_TIMEOUT_S", 6 * 3600)
CPU_TIMEOUT_S = _seconds("SPARK_CPU_TASK_TIMEOUT_S", 3600)
PUBLISH_TIMEOUT_S = _seconds("SPARK_PUBLISH_TIMEOUT_S", 600)
RETRIES = 2
RETRY_DELAYS_S = [10, 60]  # backoff between the two retries


def prefect_slug(text: str) -> str:
    """`text` as Prefect artifact keys and limit names accept it: lowercase letters, digits, dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def retry_on_storage_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only when the failure came from the object store."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - an unreadable result is not a storage error
            return False
    if isinstance(exc, RunLockedError):
        return False
    return isinstance(exc, (StoreError, ConnectionError))


def step_run_name(prefix: str) -> Callable[[], str]:
    """A task's run name: `{prefix}-it{iteration}`, plus `-step{step}` when an iteration holds several RL steps
    (so a run of one step per iteration keeps its names)."""
    def name() -> str:
        from prefect.runtime import task_run

        params = task_run.parameters
        several = getattr(params.get("cfg"), "steps_per_iteration", 1) > 1
        return f"{prefix}-it{params.get('iteration')}" + (f"-step{params.get('step', 1)}" if several else "")
    return name


def describe_outputs(summary: Any, seconds: float | None = None) -> str:
    """One log line for a task's summary: what it wrote (stage, rows, URI) and how long it took."""
    if not isinstance(summary, dict):
        return f"done: {summary!r}"[:500]
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    if "uri" in summary:
        rows = f"{summary['rows']} rows" if summary.get("rows") is not None else "checkpoint"
        stage = summary.get("stage", "output")
        if summary.get("skipped"):
            return f"{stage}: already complete ({rows} at {summary['uri']}); nothing to do{took}"
        stage_s = f"; stage {summary['seconds']:.1f} s" if isinstance(summary.get("seconds"), (int, float)) else ""
        return f"{stage}: wrote {rows} to {summary['uri']}{took}{stage_s}"
    facts = ", ".join(f"{k}={v}" for k, v in summary.items())
    return f"done{took}: {facts}"[:1000]


def log_outputs(task: Any, task_run: Any, state: Any) -> None:
    """On-completion hook of every task: log its row counts, output URI and seconds to the task run log."""
    from prefect.logging.loggers import task_run_logger

    try:
        summary = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - no result to describe; the state itself says it completed
        summary = None
    start = getattr(task_run, "start_time", None)
    seconds = (state.timestamp - start).total_seconds() if start is not None and state.timestamp else None
    task_run_logger(task_run, task).info(describe_outputs(summary, seconds))


def task_options(*, timeout_s: float) -> dict[str, Any]:
    """Keyword arguments for `@task`: timeout, storage retries, no Prefect result caching (the store's
    `_SUCCESS.json` manifests are the cache), and a log line of what the task wrote. No tags (see above)."""
    from prefect.cache_policies import NO_CACHE

    return {
        "on_completion": [log_outputs],
        "timeout_seconds": timeout_s,
        "retries": RETRIES,
        "retry_delay_seconds": RETRY_DELAYS_S,
        "retry_condition_fn": retry_on_storage_error,
        "cache_policy": NO_CACHE,
        "persist_result": False,
    }
