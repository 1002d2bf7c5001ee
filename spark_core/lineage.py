"""Lineage of an iteration, read from the stage manifests: which stage read which inputs.

Every ``_SUCCESS.json`` records the URIs its stage read (``inputs``). From them this module builds

- the iteration's nodes (:func:`iteration_lineage`), one per complete stage;
- asset keys and specs for Prefect assets (:func:`asset_key`, :func:`asset_specs`): the key of a stage is
  its URI (``s3://...``, or ``file://`` + the absolute path of a local store), its dependencies the keys
  of its inputs, so the previous iteration's checkpoint links iteration ``i`` to ``i-1``;
- a Mermaid flowchart and a markdown table of the same edges (:func:`lineage_markdown`).

No Prefect import: the tasks layer hands the specs to ``prefect.assets`` (tasks/assets.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import Store

# Prefect asset keys: a URI with a lowercase scheme, at most 512 characters, none of these characters.
ASSET_KEY_MAX = 512
_ASSET_FORBIDDEN = set("\n\r\t\0 #?&%\"'<>[]{}|\\^`")
_URI_RE = re.compile(r"^[a-z0-9]+://")
MODEL_SOURCE = "model.source="  # the input iteration 0's checkpoint records (the model it was built from)


@dataclass(frozen=True)
class StageNode:
    """One complete stage of an iteration, as its manifest describes it."""

    stage: str  # name under iter=NNNN/, e.g. `train/phase=policy`
    uri: str
    kind: str  # "table" or "checkpoint"
    rows: int | None
    columns: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    files: int = 0
    seconds: float | None = None
    config_hash: str | None = None
    written_at: str = ""  # ISO time (ms) the manifest was written; orders the nodes as the iteration ran


def iteration_lineage(store: Store, run_id: str, iteration: int) -> list[StageNode]:
    """The complete stages of one iteration with their inputs, in the order they ran."""
    nodes = []
    for stage in store.list_stages(run_id, iteration):
        uri = store.stage_uri(run_id, iteration, stage)
        m = store.manifest_or_none(uri)
        if m is None:  # removed between the listing and now
            continue
        nodes.append(StageNode(
            stage=stage, uri=uri, kind=str(m.get("kind", "table")), rows=m.get("rows"),
            columns=list(m.get("columns") or []), inputs=[str(i) for i in m.get("inputs") or []],
            files=len(m.get("files") or []), seconds=m.get("seconds"), config_hash=m.get("config_hash"),
            written_at=str(m.get("written_at") or ""),
        ))
    return sorted(nodes, key=lambda n: (n.written_at, n.stage))


def asset_key(uri: str) -> str | None:
    """The Prefect asset key of a stage URI or manifest input, or None when it cannot be one.

    ``s3://...`` stays as it is; a local path becomes ``file://`` + its absolute path; the model an
    initial checkpoint was built from (``model.source=NAME``) becomes ``model://NAME``. None when the
    result would contain a character Prefect refuses in keys (a space, ``%``, ``#`` ...) or be too long.
    """
    if uri.startswith(MODEL_SOURCE):
        key = "model://" + uri[len(MODEL_SOURCE):].lstrip("/")
    elif _URI_RE.match(uri):
        key = uri
    elif "://" not in uri and "=" not in uri.split("/")[0]:
        key = "file://" + str(Path(uri).resolve())
    else:
        return None
    key = key.rstrip("/")
    if len(key) > ASSET_KEY_MAX or any(c in _ASSET_FORBIDDEN for c in key) or not _URI_RE.match(key):
        return None
    return key


@dataclass(frozen=True)
class AssetSpec:
    """What one Prefect asset materialization says about a stage: its key, name, inputs and metadata."""

    key: str
    name: str
    description: str
    deps: list[str]
    metadata: dict[str, Any]


def asset_specs(run_id: str, iteration: int, nodes: list[StageNode]) -> tuple[list[AssetSpec], list[str]]:
    """One spec per stage whose URI makes a valid key, and the URIs that could not be keys (to report)."""
    specs, skipped = [], []
    for node in nodes:
        key = asset_key(node.uri)
        if key is None:
            skipped.append(node.uri)
            continue
        deps = []
        for uri in node.inputs:
            dep = asset_key(uri)
            if dep is None:
                skipped.append(uri)
            elif dep not in deps:
                deps.append(dep)
        what = f"{node.rows} rows, {len(node.columns)} columns" if node.kind == "table" else node.kind
        specs.append(AssetSpec(
            key=key,
            name=f"{run_id} {node.stage} (iteration {iteration})",
            description=f"SPARK run {run_id}, iteration {iteration}, stage {node.stage}: {what}.",
            deps=deps,
            metadata={
                "run_id": run_id, "iteration": iteration, "stage": node.stage, "kind": node.kind,
                "rows": node.rows, "columns": node.columns, "files": node.files, "uri": node.uri,
                "inputs": node.inputs, "seconds": node.seconds, "config_hash": node.config_hash,
            },
        ))
    return specs, skipped


def relative_label(uri: str, run_uri: str) -> str:
    """A stage URI as the run-relative path people read (`iter=0000/checkpoint`); others unchanged."""
    prefix = run_uri.rstrip("/") + "/"
    return uri[len(prefix):] if uri.startswith(prefix) else uri


def _mermaid_text(text: str) -> str:
    # Inside a quoted Mermaid label a double quote must be an entity.
    return text.replace('"', "#quot;")


def _size(node: StageNode) -> str:
    if node.rows is None:
        return node.kind
    return "1 row" if node.rows == 1 else f"{node.rows} rows"


def lineage_mermaid(nodes: list[StageNode], run_uri: str) -> str:
    """A left-to-right Mermaid flowchart: one box per stage and per outside input, an arrow per read."""
    ids: dict[str, str] = {}
    lines = ["flowchart LR"]

    def node_id(label: str, text: str) -> str:
        if label not in ids:
            ids[label] = f"n{len(ids)}"
            lines.append(f'  {ids[label]}["{_mermaid_text(text)}"]')
        return ids[label]

    for node in nodes:
        label = relative_label(node.uri, run_uri)
        node_id(label, f"{label}<br/>{_size(node)}")
    for node in nodes:
        target = ids[relative_label(node.uri, run_uri)]
        for uri in node.inputs:
            label = relative_label(uri, run_uri)
            lines.append(f"  {node_id(label, label)} --> {target}")
    return "\n".join(lines)


def lineage_markdown(run_id: str, iteration: int, nodes: list[StageNode], run_uri: str) -> str:
    """The iteration's lineage as a table, then the same edges as a Mermaid diagram: Prefect's V2 UI
    (`/v2`) draws it, the default UI of Prefect 3.9 prints its source as a code block."""
    rows = []
    for node in nodes:
        reads = "<br>".join(f"`{relative_label(u, run_uri)}`" for u in node.inputs) or "-"
        size = "" if node.rows is None else str(node.rows)
        rows.append(f"| `{node.stage}` | {node.kind} | {size} | {reads} |")
    return "\n".join([
        f"### Lineage of run `{run_id}`, iteration {iteration}",
        "",
        f"Paths are relative to `{run_uri}`. Each stage lists the inputs its `_SUCCESS.json` recorded.",
        "",
        "| stage | kind | rows | reads |",
        "|---|---|---:|---|",
        *rows,
        "",
        "The same as a diagram (drawn by the UI at `/v2`; the default UI shows its source):",
        "",
        "```mermaid",
        lineage_mermaid(nodes, run_uri),
        "```",
    ])
