"""The event a finished iteration announces, `spark.iteration.completed`, as plain data.

The flow (flows/iteration.py, through tasks/events.py) emits it with ``prefect.events.emit_event``; the
`spark-iteration` deployment's trigger (deployments/prefect.yaml, off by default) starts the next
iteration of the same run when it sees one. The resource is the run::

    prefect.resource.id   spark.run.{run_id}
    prefect.resource.name {run_id}
    spark.run-id          {run_id}
    spark.iteration       "3"            (labels are strings)
    spark.trigger-next    "true"|"false" true when the trigger should start the next iteration

``spark.trigger-next`` is false once the run has all its iterations, and for an iteration run inside
a `spark-run` flow (that flow starts the next one itself). The payload carries ``run_id``, ``store``,
``iteration``, ``iterations`` (the target) and ``metrics`` (the iteration's summary), so a trigger can
template the next flow run's parameters from ``event.payload``.
"""

from __future__ import annotations

import math
from typing import Any

ITERATION_COMPLETED = "spark.iteration.completed"
RUN_RESOURCE_PREFIX = "spark.run."
TRIGGER_NEXT_LABEL = "spark.trigger-next"


def run_resource_id(run_id: str) -> str:
    return f"{RUN_RESOURCE_PREFIX}{run_id}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def iteration_completed(run_id: str, store_uri: str, iteration: int, iterations: int,
                        metrics: dict[str, Any], continued_by_parent: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``emit_event``: event name, resource (the run) and payload (the metrics)."""
    trigger_next = iteration < iterations and not continued_by_parent
    return {
        "event": ITERATION_COMPLETED,
        "resource": {
            "prefect.resource.id": run_resource_id(run_id),
            "prefect.resource.name": run_id,
            "spark.run-id": run_id,
            "spark.iteration": str(iteration),
            TRIGGER_NEXT_LABEL: "true" if trigger_next else "false",
        },
        "payload": {
            "run_id": run_id,
            "store": store_uri,
            "iteration": iteration,
            "iterations": iterations,
            "metrics": _json_safe({k: v for k, v in metrics.items() if k not in ("run_id", "status")}),
        },
    }
