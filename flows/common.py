"""Resolving what a flow runs on: the config, the store URI and the run id."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from spark_core.config import SparkConfig, build_config
from spark_core.stages import StageError, check_run_config, run_config
from spark_core.store import Store, validate_run_id

DEFAULT_STORE = "./spark-store"


def default_run_id(cfg: SparkConfig) -> str:
    """`{preset}-{UTC timestamp}`, e.g. `tiny-20250101-120000`."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.preset or 'custom'}-{stamp}"


def resolve(
    config: SparkConfig | dict[str, Any] | None,
    store: str | None,
    run_id: str | None,
    iterations: int | None = None,
) -> tuple[SparkConfig, Store, str]:
    """The config (given, or the run's run.json), the store and the run id a flow works on.

    The store URI comes from `store`, else the config's `store.uri`. Without a config the run must
    already exist (its run.json is the config). With one, an existing run must have been created with
    an equivalent config (same hash), so a resumed run never silently changes recipe.
    """
    if isinstance(config, dict):
        config = build_config(config, origin="config parameter")
    uri = store or (config.store.uri if config is not None else DEFAULT_STORE)
    st = Store(uri)
    if config is None:
        if run_id is None:
            raise StageError("give a config to start a run, or the run id of an existing run to resume it")
        cfg = run_config(st, validate_run_id(run_id))
    else:
        cfg = config.model_copy(deep=True)
        run_id = validate_run_id(run_id or default_run_id(cfg))
        check_run_config(st, run_id, cfg)
    cfg.store.uri = st.uri
    if iterations is not None:
        cfg.iterations = iterations
    return cfg, st, run_id
