"""Reading a run back for people: per-iteration metrics, the metrics frame and plot, the first rows of a
stage, the run index, and the markdown of the artifacts the publish task shows in Prefect
(tasks/publish.py). The iteration's lineage is ``spark_core.lineage``.

The metrics table, the plot and the run index cover every iteration so far. So that a publish costs the
same at iteration 150 as at iteration 1 (on S3 each manifest is a request), each publish stores its
iteration's *record* (summary + stages with row counts, ``report/record.json``) and later publishes read
the records instead of every earlier iteration's manifests. A record is rebuilt from the manifests where
it is missing: runs published before records existed, and iterations whose checkpoint retention deleted
(``forget_record``).
"""

from __future__ import annotations

import base64
import io
import json
import math
from datetime import datetime
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import SparkConfig
from ..layout import (
    CHECKPOINT, REPORT_PLOT, REPORT_RECORD, REWARD_POOL, REWARD_VERIFIED, TRAIN_POLICY, TRAIN_REWARD, VERIFIED, eval_stage,
    duckdb_recipe, iter_name, step_stage,
)
from ..lineage import StageNode, iteration_lineage
from ..store import Store, StoreError

PREVIEW_ROWS = 5
PREVIEW_WIDTH = 80  # characters per cell in a preview; longer text ends in an ellipsis


def _metric(store: Store, uri: str, name: str) -> Any:
    m = store.manifest_or_none(uri)
    return None if m is None else (m.get("metrics") or {}).get(name)


# Eval metrics copied into the iteration summary (absent ones are skipped).
EVAL_SUMMARY_KEYS = ("accuracy", "accuracy_reflect", "judge_accuracy", "judge_balanced_accuracy", "judge_f1",
                     "verdict_parse_rate", "judge_yes_share", "pairwise_accuracy")


def _reward_summary(store: Store, uri: str) -> dict[str, Any]:
    """Reward-phase diagnostics of an iteration for its summary (None where no reward phase ran)."""
    m = (store.manifest_or_none(uri) or {}).get("metrics") or {}
    by_kind = m.get("parse_rate_by_kind") or {}
    out: dict[str, Any] = {
        "reward_verdict_parse_rate": m.get("verdict_parse_rate"),
        "reward_yes_share": m.get("yes_share"),
        "reward_zero_adv_share": m.get("zero_advantage_share"),
        "reward_no_signal": m.get("no_signal") if m else None,
    }
    out.update({f"reward_parse_rate/{k}": by_kind.get(k) for k in ("pointwise", "pairwise", "reflection")})
    return out


def iteration_summary(cfg: SparkConfig, store: Store, run_id: str, iteration: int) -> dict[str, Any]:
    """Flat metrics of one iteration, read from the manifests (None where a stage did not run)."""
    s = lambda stage: store.stage_uri(run_id, iteration, stage)  # noqa: E731
    n = cfg.steps_per_iteration  # per-step metrics: those of the iteration's last RL step
    last = lambda stage: s(step_stage(stage, n, n))  # noqa: E731
    out: dict[str, Any] = {"iteration": iteration}
    if iteration > 0:
        out.update(
            {
                "policy_reward": _metric(store, last(VERIFIED), "mean_reward"),
                "groups_mixed": _metric(store, last(VERIFIED), "groups_mixed"),
                "pool_size": _metric(store, last(REWARD_POOL), "pool_size"),
                "reward_items": _metric(store, last(REWARD_POOL), "popped"),
                "reward_phase_reward": _metric(store, last(REWARD_VERIFIED), "mean_reward"),
                **_reward_summary(store, last(REWARD_VERIFIED)),
                "policy_loss": _metric(store, last(TRAIN_POLICY), "mean_loss"),
                "reward_loss": _metric(store, last(TRAIN_REWARD), "mean_loss"),
                "global_step": _metric(store, s(CHECKPOINT), "global_step"),
            }
        )
    for b in cfg.eval.benchmarks:
        uri = s(eval_stage(b.name))
        for key in EVAL_SUMMARY_KEYS:
            value = _metric(store, uri, key)
            if key == "verdict_parse_rate" and value is None and _metric(store, uri, "judge_n"):
                value = 1.0 - (_metric(store, uri, "judge_n_unparsed") or 0) / _metric(store, uri, "judge_n")
            if value is not None:
                out[f"{b.name}/{key}"] = value
    manifests = [store.manifest_or_none(s(stage)) or {} for stage in store.list_stages(run_id, iteration)]
    out["seconds"] = round(_stage_seconds(manifests), 1)
    return out


def _stage_seconds(manifests: list[dict[str, Any]]) -> float:
    """Wall-clock seconds the iteration's stages took. Stages written inside another stage's time (the
    checkpoint that the last update writes) are counted once: the union of their [started_at, written_at]
    spans. Manifests without both times fall back to the sum of their own seconds."""
    spans, loose = [], 0.0
    for m in manifests:
        start, end = m.get("started_at"), m.get("written_at")
        if start and end:
            spans.append((datetime.fromisoformat(start).timestamp(), datetime.fromisoformat(end).timestamp()))
        else:
            loose += float(m.get("seconds") or 0) + float(m.get("write_seconds") or 0)
    covered, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered + loose


def metrics_frame(cfg: SparkConfig, store: Store, run_id: str) -> pd.DataFrame:
    """Per (iteration, benchmark) eval metrics of a run, in the shape `plots.metrics_plot` draws."""
    return frame_of_rows(cfg, [iteration_summary(cfg, store, run_id, it) for it in store.list_iterations(run_id)])


def frame_of_rows(cfg: SparkConfig, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The metrics frame of iteration summaries: a row per (iteration, evaluated benchmark); accuracy is
    the pairwise accuracy for a preference benchmark."""
    from ..plots import METRICS_COLUMNS  # the plot's input; imported here (matplotlib) only when drawn

    out = []
    for row in rows:
        for b in cfg.eval.benchmarks:
            if all(v is None for k, v in row.items() if k.startswith(f"{b.name}/")):
                continue  # not evaluated at this iteration (metrics_rows gives every row every column)
            get = lambda key: row.get(f"{b.name}/{key}")  # noqa: E731
            accuracy = get("accuracy")
            out.append({"iteration": row["iteration"], "benchmark": b.name,
                        "accuracy": accuracy if accuracy is not None else get("pairwise_accuracy"),
                        "accuracy_reflect": get("accuracy_reflect"), "judge_f1": get("judge_f1")})
    return pd.DataFrame(out, columns=list(METRICS_COLUMNS))


# --------------------------------------------------------------------------- per-iteration records

RECORD_VERSION = 1  # a record of another version is rebuilt from the manifests


def iteration_record(cfg: SparkConfig, store: Store, run_id: str, iteration: int,
                     nodes: list[StageNode] | None = None) -> dict[str, Any]:
    """What the run's reports need of one iteration, read from its manifests: its summary and its
    complete stages as [stage, rows] in the order they ran (`nodes`: its lineage, if already read)."""
    nodes = iteration_lineage(store, run_id, iteration) if nodes is None else nodes
    stages = [[node.stage, node.rows] for node in nodes]
    return {"version": RECORD_VERSION, "summary": iteration_summary(cfg, store, run_id, iteration),
            "stages": stages}


def record_uri(store: Store, run_id: str, iteration: int) -> str:
    return store.join(store.iter_uri(run_id, iteration), *REPORT_RECORD.split("/"))


def save_record(store: Store, run_id: str, iteration: int, record: dict[str, Any]) -> None:
    store.write_bytes(record_uri(store, run_id, iteration), json.dumps(record, allow_nan=True).encode())


def load_record(store: Store, run_id: str, iteration: int) -> dict[str, Any] | None:
    """The stored record of an iteration, or None (missing, unreadable or of another version)."""
    try:
        record = json.loads(store.read_bytes(record_uri(store, run_id, iteration)))
    except (StoreError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("version") == RECORD_VERSION else None


def forget_record(store: Store, run_id: str, iteration: int) -> None:
    """Drop an iteration's record after its stages changed (retention deleted its checkpoint)."""
    store.remove_bytes(record_uri(store, run_id, iteration))


def published_summary(cfg: SparkConfig, store: Store, run_id: str, iteration: int) -> dict[str, Any]:
    """The iteration's summary as its publish stored it, else read from the manifests."""
    record = load_record(store, run_id, iteration)
    return dict(record["summary"]) if record else iteration_summary(cfg, store, run_id, iteration)


def run_records(cfg: SparkConfig, store: Store, run_id: str, current: dict[str, Any], up_to: int
                ) -> dict[int, dict[str, Any]]:
    """Records of iterations 0..up_to: `current` (freshly built) for up_to, the stored ones for the
    others. Where none is stored the record is rebuilt from the manifests and stored, so each is rebuilt
    once. Call while holding the run's lease (it writes)."""
    out: dict[int, dict[str, Any]] = {}
    for it in (i for i in store.list_iterations(run_id) if i < up_to):
        record = load_record(store, run_id, it)
        if record is None:
            record = iteration_record(cfg, store, run_id, it)
            save_record(store, run_id, it, record)
        out[it] = record
    out[up_to] = current
    return out


def _clean(value: Any) -> Any:
    """JSON-safe cell: NaN/inf become None, floats are rounded for reading."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 4)
    return value


def metrics_rows(records: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per record (iteration), all rows with the same columns."""
    rows = [dict(rec["summary"]) for _, rec in sorted(records.items())]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return [{c: _clean(row.get(c)) for c in columns} for row in rows]


def stages_markdown(store: Store, run_id: str, iteration: int) -> str:
    """The iteration's complete stages with row counts and part locations, and how to read them."""
    lines = [
        f"### Run `{run_id}`, iteration {iteration}: stage outputs",
        "",
        "| stage | rows | location |",
        "|---|---:|---|",
    ]
    for stage, rows in store.list_stages(run_id, iteration).items():
        uri = store.stage_uri(run_id, iteration, stage)
        files = store.manifest(uri).get("files", [])
        if rows is None:
            where = f"`{uri}/` ({len(files)} files)"
        else:
            where = "<br>".join(f"`{uri}/{f}`" for f in files)
        lines.append(f"| {stage} | {'' if rows is None else rows} | {where} |")
    lines += [
        "",
        "Read one stage across all iterations (the `iter` column comes from the folder names), e.g. with "
        "DuckDB (offline: an `s3://` store goes through fsspec, no httpfs download):",
        "",
        "```python",
        duckdb_recipe(store.run_uri(run_id), VERIFIED,
                      steps=2 if store.step_partitions(store.stage_uri(run_id, iteration, VERIFIED)) else 1),
        "```",
    ]
    return "\n".join(lines)


def summary_markdown(row: dict[str, Any], plot_uri: str, png: bytes) -> str:
    """One iteration's metrics as a table, with the plot embedded as a ``data:`` URI."""
    metrics = "\n".join(f"| {k} | {'' if v is None else v} |" for k, v in row.items())
    data = base64.b64encode(png).decode()
    warning = (
        "> **WARNING: the reward phase carried no training signal** (every reward-item group got equal "
        "rewards, advantage 0): this iteration was RLVR plus KL noise.\n\n"
        if row.get("reward_no_signal") else ""
    )
    return (
        f"### SPARK iteration {row['iteration']}\n\n{warning}| metric | value |\n|---|---|\n{metrics}\n\n"
        f"![metrics over iterations](data:image/png;base64,{data})\n\nPlot stored at `{plot_uri}`.\n"
    )


def write_plot(cfg: SparkConfig, store: Store, run_id: str, iteration: int,
               rows: list[dict[str, Any]]) -> tuple[str, bytes]:
    """Draw the run's metrics so far (`rows`: the iteration summaries, as `metrics_rows` gives them), store
    the PNG under the iteration; return its URI and bytes."""
    from ..plots import metrics_plot

    buf = io.BytesIO()
    metrics_plot(frame_of_rows(cfg, rows), buf)
    png = buf.getvalue()
    plot_uri = store.join(store.iter_uri(run_id, iteration), *REPORT_PLOT.split("/"))
    store.write_bytes(plot_uri, png)
    return plot_uri, png


def truncate_cell(value: Any, width: int = PREVIEW_WIDTH) -> Any:
    """A table cell as a person scans it: numbers rounded, text and lists cut at `width` characters."""
    if isinstance(value, float):
        return _clean(value)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, (list, tuple)):
        text = "[" + ", ".join(str(truncate_cell(v, width)) for v in value[:width]) + "]"
        suffix = f" ({len(value)} items)"
        return text if len(text) <= width else text[: max(1, width - len(suffix) - 1)] + "\u2026" + suffix
    text = str(value)
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def stage_preview(store: Store, uri: str, rows: int = PREVIEW_ROWS, width: int = PREVIEW_WIDTH
                  ) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, first `rows` rows with cells truncated) of a complete table stage.

    Reads only the first Parquet part the manifest lists, so a large stage costs one part."""
    manifest = store.manifest(uri)
    columns = list(manifest.get("columns") or [])
    files = manifest.get("files") or []
    if manifest.get("kind") != "table" or not files or not manifest.get("rows"):
        return columns, []
    table = pq.read_table(pa.BufferReader(store.read_bytes(store.join(uri, files[0]))))
    head = table.slice(0, rows).to_pylist()
    columns = columns or table.schema.names
    return columns, [{c: truncate_cell(r.get(c), width) for c in columns} for r in head]


def run_index_markdown(run_id: str, run_uri: str, rows: list[dict[str, Any]],
                       stages: dict[int, list[tuple[str, int | None]]], links: dict[str, str]) -> str:
    """The run index: one line per iteration with its folder, stages (row counts) and key metrics.

    `rows` are `metrics_rows` (one per iteration), `stages` the (stage, rows) pairs per iteration (a
    record's "stages"), `links` stage name -> URL of that stage's preview artifact (every iteration's
    version is listed there)."""
    metric_cols = [c for c in ("policy_reward", "reward_phase_reward", "policy_loss") if any(c in r for r in rows)]
    metric_cols += sorted({c for r in rows for c in r if c.endswith("/accuracy")})
    head = ["iteration", "folder", "stages (rows)", *metric_cols, "seconds"]
    lines = [
        f"### Run `{run_id}`: {len(rows)} iteration(s)",
        "",
        f"Store: `{run_uri}`. Each stage name links to its preview artifact (one version per iteration).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---:" if c != "folder" and c != "stages (rows)" else "---" for c in head) + "|",
    ]
    for row in rows:
        it = int(row["iteration"])
        names = []
        for stage, count in stages.get(it, []):
            name = f"[{stage}]({links[stage]})" if stage in links else stage
            names.append(name if count is None else f"{name} ({count})")
        cells = [str(it), f"`{run_uri.rstrip('/')}/{iter_name(it)}/`", "<br>".join(names) or "-"]
        cells += ["" if row.get(c) is None else str(row[c]) for c in metric_cols]
        cells.append("" if row.get("seconds") is None else str(row["seconds"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
