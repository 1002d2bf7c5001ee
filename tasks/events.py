"""Emitting `spark.iteration.completed` (built by ``spark_core.events``) when an iteration is complete."""

from __future__ import annotations

from typing import Any

from prefect import runtime
from prefect.events import emit_event

from spark_core.events import iteration_completed


def emit_iteration_completed(run_id: str, store_uri: str, iteration: int, iterations: int,
                             metrics: dict[str, Any]) -> str | None:
    """Emit the event; return its id (None where no events client is configured).

    An iteration running as a subflow of `spark-run` says so (``spark.trigger-next`` false): its parent
    starts the next iteration, a trigger must not start a second one."""
    in_parent = runtime.flow_run.parent_flow_run_id is not None
    event = emit_event(**iteration_completed(run_id, store_uri, iteration, iterations, metrics,
                                             continued_by_parent=in_parent))
    return None if event is None else str(event.id)
