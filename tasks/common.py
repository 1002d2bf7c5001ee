"""Settings every task shares: tags, timeouts, and which failures are worth a retry.

GPU-bound tasks (sampling, training, evaluation) carry the tag ``gpu``. On a server, limit them to one
at a time per machine with a tag concurrency limit::

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
from typing import Any

from spark_core.store import RunLockedError, StoreError

GPU_TAG = "gpu"
SPARK_TAG = "spark"


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


def task_options(*, gpu: bool, timeout_s: float) -> dict[str, Any]:
    """Keyword arguments for `@task`: tags, timeout, storage retries, and no Prefect result caching
    (the store's `_SUCCESS.json` manifests are the cache)."""
    from prefect.cache_policies import NO_CACHE

    return {
        "tags": [SPARK_TAG, GPU_TAG] if gpu else [SPARK_TAG],
        "timeout_seconds": timeout_s,
        "retries": RETRIES,
        "retry_delay_seconds": RETRY_DELAYS_S,
        "retry_condition_fn": retry_on_storage_error,
        "cache_policy": NO_CACHE,
        "persist_result": False,
    }
