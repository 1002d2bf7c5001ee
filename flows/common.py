"""Resolving what a flow runs on: the config, the store URI and the run id."""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

from pydantic import BaseModel

from spark_core.config import SparkConfig, _deep_merge, build_config
from spark_core.data import check_data_source
from spark_core.overrides import compose
from spark_core.stages import StageError, check_run_config, run_config
from spark_core.store import Store, validate_run_id

DEFAULT_STORE = "./spark-store"
# The store a deployment's flow runs use when none is given: `spark stack up` writes it into the stack's
# env.sh and the worker's environment (s3://BUCKET), so continuing a run needs only its run id.
STORE_ENV = "SPARK_STORE"


def default_store() -> str:
    """$SPARK_STORE, else ./spark-store."""
    return os.environ.get(STORE_ENV) or DEFAULT_STORE


def default_run_id(cfg: SparkConfig) -> str:
    """`{preset}-{UTC timestamp}`, e.g. `tiny-20250101-120000`."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.preset or 'custom'}-{stamp}"


def _given_store(data: dict[str, Any] | None) -> str | None:
    store = (data or {}).get("store")
    return store.get("uri") if isinstance(store, dict) else None


def resolve(
    config: SparkConfig | dict[str, Any] | None,
    store: str | None,
    run_id: str | None,
    iterations: int | None = None,
    *,
    preset: str | None = None,
    overrides: BaseModel | dict[str, Any] | None = None,
) -> tuple[SparkConfig, Store, str]:
    """The config, the store and the run id a flow works on; every error is raised before any work.

    The config is `preset` < `config` (a full or partial mapping) < `overrides` (only what changes).
    Given none of them, the run must exist and its run.json is the config; given only overrides, they
    apply to an existing run's run.json (e.g. `iterations`). An existing run must have been created
    with an equivalent config (same hash), so a resumed run never silently changes recipe.

    The store URI: `store`, else a `store.uri` given in `config`/`overrides`, else $SPARK_STORE, else the
    preset's (./spark-store when continuing a run).
    """
    data = compose(preset, config, overrides)
    given = store or _given_store(data)
    if data is None or (preset is None and config is None):
        if run_id is None:
            raise StageError("give a preset or a config to start a run, or the run id of an existing run to resume it")
        run_id = validate_run_id(run_id)
        st = Store(given or default_store())
        # The stored config's schedule (pinned before any new iteration count applies).
        cfg = run_config(st, run_id).with_pinned_schedule()
        if data:  # overrides only: laid over the run's own config
            changed = _deep_merge(cfg.model_dump(mode="json"), _deep_merge(data, {"store": {"uri": st.uri}}))
            cfg = build_config(changed, origin=f"overrides of run {run_id}")
            check_run_config(st, run_id, cfg)
        if iterations is not None:
            cfg.iterations = iterations
    else:
        cfg = build_config(data, origin="config parameters")
        st = Store(given or os.environ.get(STORE_ENV) or cfg.store.uri)
        if iterations is not None:
            cfg.iterations = iterations
        # The LR schedule length is fixed when the run is created (run.json carries it), so resuming
        # with another iteration count can never silently change the schedule: it is refused instead.
        cfg = cfg.with_pinned_schedule()
        run_id = validate_run_id(run_id or default_run_id(cfg))
        check_run_config(st, run_id, cfg)
    cfg.store.uri = st.uri
    _preflight(cfg)
    check_data_source(cfg.data)  # a bad data file fails here, before any server, model or task starts
    return cfg, st, run_id


def _preflight(cfg: SparkConfig) -> None:
    """Checks that cost milliseconds here but would otherwise fail a task after the model loaded."""
    from spark_core.config import ConfigError
    from spark_core.data import make_arithmetic

    if cfg.data.source == "arithmetic" or any(b.source == "arithmetic" for b in cfg.eval.benchmarks):
        try:
            make_arithmetic(cfg.data.arithmetic, "test")
        except ValueError as err:
            raise ConfigError(f"data.arithmetic (n_test={cfg.data.arithmetic.n_test}): {err}") from None


EPHEMERAL_STARTUP_S = 120  # the least time given to Prefect's temporary server to start (see below)


@contextmanager
def embedded_prefect() -> Iterator[bool]:
    """Prefect settings for flows run in this process on Prefect's temporary API (no PREFECT_API_URL).
    Yields whether they applied (False when PREFECT_API_URL names a server, whose defaults stay).

    * No flow-run heartbeats. A heartbeat lets a server notice a flow run whose process died; a
      temporary API dies with that process, so nobody could notice, while every flow waits up to 1 s
      for its heartbeat thread on exit (Prefect 3.9.1 `flow_engine._send_heartbeats`: an empty flow
      1.1 s with it, 0.16 s without).
    * Task-run states written in batches (every 5 s) instead of one SQLite transaction per event. The
      temporary server's task-run recorder otherwise writes all the time, and a request that reads and
      then writes in one transaction (here `POST /task_runs/`, which starts each iteration subflow) fails
      with "database is locked" whenever a write landed in between: the server answers 503 and the
      client sleeps about 2 s before it retries (measured: 5 of 5 iterations of a tiny run stalled
      1.7-2.5 s; none with batched writes). The temporary server serves no UI and nothing reads task runs
      during the run; they are all in its database once it stops (its last flush), up to 5 s late.
    * At least 120 s for the temporary server to start (Prefect's default is 20 s of polling). It takes
      about 15 s on an idle 2-core machine (`bench/iteration.py`: "ephemeral API start"), and a loaded one
      went past 20 s and failed the run with "Timed out while attempting to connect to ephemeral Prefect
      API server" (2026-12-01, `bench/prefect_stalls.py` beside the test suite)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE,
        temporary_settings,
    )

    if PREFECT_API_URL.value():
        yield False
        return
    startup_s = max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), EPHEMERAL_STARTUP_S)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                                     PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE: 500,
                                     PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: startup_s}):
        yield True
