"""Each stage of an iteration declared as a Prefect asset, so the server records its materialization.

One materializing task per stage (``prefect.assets.materialize``): the asset key is the stage's URI
(``spark_core.lineage.asset_key``), ``asset_deps`` are the keys of the inputs its manifest recorded (the
previous iteration's checkpoint among them), and ``add_asset_metadata`` attaches row count, columns and
inputs. Prefect then emits ``prefect.asset.materialization.succeeded`` per stage (payload = that
metadata, related resources = the inputs) and ``prefect.asset.referenced`` per input. The OSS server
stores these events (Event Feed, ``/events/filter``); Prefect Cloud also draws the asset graph from them.

The stages write the store themselves (``spark_core.stages``); these tasks declare what the manifests
say after the fact, at publish time, so a resumed iteration declares every stage once more.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize
from prefect.cache_policies import NO_CACHE

from spark_core.lineage import StageNode, asset_specs

from .common import prefect_slug

MATERIALIZED_BY = "spark-flow"


def _declare(key: str, metadata: dict[str, Any]) -> str:
    add_asset_metadata(key, metadata)
    return key


def record_assets(run_id: str, iteration: int, nodes: list[StageNode], urls: dict[str, str] | None = None
                  ) -> list[str]:
    """Declare every stage in `nodes` as a materialized asset; return the keys. `urls`: stage -> a page
    to show with the asset (its preview artifact)."""
    specs, skipped = asset_specs(run_id, iteration, nodes)
    logger = get_run_logger()
    if skipped:
        logger.warning("not declared as assets (not valid Prefect asset keys): %s", ", ".join(skipped))
    by_uri = {n.uri: n.stage for n in nodes}
    for spec in specs:
        stage = by_uri[spec.metadata["uri"]]
        url = (urls or {}).get(stage)
        asset = Asset(key=spec.key, properties=AssetProperties(name=spec.name, description=spec.description,
                                                               url=url if url and "://" in url else None))
        declare = materialize(
            asset, by=MATERIALIZED_BY, asset_deps=spec.deps, name="asset",
            task_run_name=f"asset-it{iteration}-{prefect_slug(stage)}",
            cache_policy=NO_CACHE, persist_result=False,
        )(_declare)
        declare(spec.key, spec.metadata)
    logger.info("iteration %d: %d stages declared as assets", iteration, len(specs))
    return [s.key for s in specs]
