"""What a person browses in the UI, built without Prefect: stage previews (first rows, long text cut),
the run index, the lineage of an iteration (table + Mermaid) from the manifests' `inputs`, asset keys
and specs, and the `spark.iteration.completed` event."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pytest

from spark_core import events, lineage
from spark_core.stages import report
from spark_core.store import Store

RUN = "demo"


def _table_stage(store: Store, it: int, stage: str, table: pa.Table, inputs: list[str]) -> str:
    uri = store.stage_uri(RUN, it, stage)
    store.write_table(uri, table, {"stage": stage, "iteration": it, "inputs": inputs, "seconds": 0.5},
                      rows_per_part=3)
    time.sleep(0.002)  # distinct written_at (ms), the order lineage lists stages in
    return uri


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A run with iteration 0 (checkpoint from the model) and a small iteration 1, made by hand."""
    st = Store(str(tmp_path / "store"))
    st.write_run(RUN, {"preset": "tiny"})
    ckpt0 = st.stage_uri(RUN, 0, "checkpoint")
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "config.json").write_text("{}")
    st.upload_checkpoint(local, ckpt0, {"stage": "checkpoint", "inputs": ["model.source=tiny"]})
    samples = _table_stage(st, 1, "samples", pa.table({
        "question_id": ["q1", "q1", "q2", "q2"],
        "completion": ["x" * 200, "short", 'say "hi"', None],
        "completion_ids": [list(range(100)), [1, 2], [3], []],
        "reward": [0.123456, 1.0, float("nan"), 0.0],
    }), [ckpt0])
    _table_stage(st, 1, "verified", pa.table({"question_id": ["q1"]}), [samples])
    _table_stage(st, 1, "train/phase=policy", pa.table({"loss": pa.array([], pa.float64())}),
                 [st.stage_uri(RUN, 1, "verified"), ckpt0])
    return st


def test_truncate_cell_cuts_text_and_lists_and_rounds() -> None:
    assert report.truncate_cell("a" * 200) == "a" * 79 + "\u2026"
    assert len(report.truncate_cell("a" * 200)) == report.PREVIEW_WIDTH
    assert report.truncate_cell("short") == "short"
    long_list = report.truncate_cell(list(range(100)))
    assert len(long_list) <= report.PREVIEW_WIDTH and long_list.startswith("[0, 1, 2")
    assert long_list.endswith("(100 items)")
    assert report.truncate_cell([1, 2]) == "[1, 2]"
    assert report.truncate_cell(0.123456) == 0.1235
    assert report.truncate_cell(float("nan")) is None
    assert report.truncate_cell(True) is True and report.truncate_cell(None) is None


def test_stage_preview_reads_the_first_rows_of_the_first_part(store: Store) -> None:
    uri = store.stage_uri(RUN, 1, "samples")
    assert len(store.manifest(uri)["files"]) == 2  # 4 rows, 3 per part
    columns, rows = report.stage_preview(store, uri, rows=3)
    assert columns == ["question_id", "completion", "completion_ids", "reward"]
    assert [r["question_id"] for r in rows] == ["q1", "q1", "q2"]
    assert rows[0]["completion"].endswith("\u2026") and len(rows[0]["completion"]) == 80
    assert rows[0]["completion_ids"].endswith("(100 items)")
    assert rows[0]["reward"] == 0.1235 and rows[2]["reward"] is None
    json.dumps(rows, allow_nan=False)  # what Prefect stores must be plain JSON

    empty_cols, empty_rows = report.stage_preview(store, store.stage_uri(RUN, 1, "train/phase=policy"))
    assert empty_cols == ["loss"] and empty_rows == []
    # A checkpoint has no rows to preview.
    assert report.stage_preview(store, store.stage_uri(RUN, 0, "checkpoint"))[1] == []


def test_lineage_lists_each_stage_with_what_it_read(store: Store) -> None:
    nodes = lineage.iteration_lineage(store, RUN, 1)
    assert [n.stage for n in nodes] == ["samples", "verified", "train/phase=policy"]  # the order they ran
    by = {n.stage: n for n in nodes}
    assert by["samples"].inputs == [store.stage_uri(RUN, 0, "checkpoint")]
    assert by["samples"].rows == 4 and by["samples"].kind == "table" and by["samples"].files == 2
    assert by["train/phase=policy"].inputs == [store.stage_uri(RUN, 1, "verified"),
                                              store.stage_uri(RUN, 0, "checkpoint")]
    [ckpt] = lineage.iteration_lineage(store, RUN, 0)
    assert ckpt.kind == "checkpoint" and ckpt.rows is None and ckpt.inputs == ["model.source=tiny"]


def test_lineage_markdown_has_a_table_and_a_mermaid_flowchart(store: Store) -> None:
    nodes = lineage.iteration_lineage(store, RUN, 1)
    md = lineage.lineage_markdown(RUN, 1, nodes, store.run_uri(RUN))
    assert "| `samples` | table | 4 | `iter=0000/checkpoint` |" in md
    assert "| `train/phase=policy` | table | 0 | `iter=0001/verified`<br>`iter=0000/checkpoint` |" in md
    block = md.split("```mermaid\n", 1)[1].split("\n```", 1)[0]
    lines = block.splitlines()
    assert lines[0] == "flowchart LR"
    boxes = dict(line.strip().split("[", 1) for line in lines[1:] if "[" in line)
    ids = {label.strip('"]').split("<br/>")[0]: node for node, label in boxes.items()}
    assert set(ids) == {"iter=0001/samples", "iter=0001/verified", "iter=0001/train/phase=policy",
                        "iter=0000/checkpoint"}
    assert boxes[ids["iter=0001/samples"]] == '"iter=0001/samples<br/>4 rows"]'
    edges = {tuple(line.strip().split(" --> ")) for line in lines if "-->" in line}
    assert edges == {
        (ids["iter=0000/checkpoint"], ids["iter=0001/samples"]),
        (ids["iter=0001/samples"], ids["iter=0001/verified"]),
        (ids["iter=0001/verified"], ids["iter=0001/train/phase=policy"]),
        (ids["iter=0000/checkpoint"], ids["iter=0001/train/phase=policy"]),
    }


def test_mermaid_labels_escape_quotes() -> None:
    node = lineage.StageNode(stage="x", uri='/s/runs/r/iter=0001/x', kind="table", rows=2,
                             inputs=['outside "quoted"'])
    text = lineage.lineage_mermaid([node], "/s/runs/r")
    assert '["outside #quot;quoted#quot;"]' in text and '"' not in text.replace('["', "").replace('"]', "")


def test_asset_keys_are_uris_prefect_accepts(tmp_path: Path) -> None:
    from prefect.assets import Asset  # only to check the keys against Prefect's own validation

    assert lineage.asset_key("s3://spark/runs/r/iter=0001/train/phase=policy") == \
        "s3://spark/runs/r/iter=0001/train/phase=policy"
    local = lineage.asset_key(str(tmp_path / "runs" / "r" / "iter=0001" / "samples"))
    assert local == "file://" + str((tmp_path / "runs/r/iter=0001/samples").resolve())
    assert lineage.asset_key("model.source=tiny") == "model://tiny"
    assert lineage.asset_key("model.source=Qwen/Qwen2.5-7B-Instruct") == "model://Qwen/Qwen2.5-7B-Instruct"
    for key in (lineage.asset_key("s3://b/x/"), local, "model://tiny"):
        Asset(key=key)
    assert lineage.asset_key("/a folder/with space") is None  # Prefect refuses spaces in keys
    assert lineage.asset_key("s3://b/" + "x" * 600) is None
    assert lineage.asset_key("weird=input") is None


def test_asset_specs_link_inputs_including_the_previous_checkpoint(store: Store) -> None:
    nodes = lineage.iteration_lineage(store, RUN, 1)
    specs, skipped = lineage.asset_specs(RUN, 1, nodes)
    assert skipped == []
    by = {s.metadata["stage"]: s for s in specs}
    ckpt0 = lineage.asset_key(store.stage_uri(RUN, 0, "checkpoint"))
    assert by["samples"].key == lineage.asset_key(store.stage_uri(RUN, 1, "samples"))
    assert by["samples"].deps == [ckpt0]
    assert by["train/phase=policy"].deps == [lineage.asset_key(store.stage_uri(RUN, 1, "verified")), ckpt0]
    meta = by["samples"].metadata
    assert meta["rows"] == 4 and meta["columns"][0] == "question_id" and meta["iteration"] == 1
    assert meta["inputs"] == [store.stage_uri(RUN, 0, "checkpoint")]
    json.dumps(meta, allow_nan=False)
    [spec0], _ = lineage.asset_specs(RUN, 0, lineage.iteration_lineage(store, RUN, 0))
    assert spec0.deps == ["model://tiny"] and spec0.metadata["rows"] is None


def test_run_index_lists_iterations_with_folders_links_and_metrics(store: Store) -> None:
    rows = [{"iteration": 0, "arithmetic/accuracy": 0.25, "seconds": 1.0},
            {"iteration": 1, "policy_reward": 0.5, "arithmetic/accuracy": 0.5, "seconds": 2.0}]
    stages = {it: [(n.stage, n.rows) for n in lineage.iteration_lineage(store, RUN, it)] for it in (0, 1)}
    links = {"samples": "http://ui/artifacts/key/spark-demo-samples"}
    md = report.run_index_markdown(RUN, store.run_uri(RUN), rows, stages, links)
    header = next(line for line in md.splitlines() if line.startswith("| iteration"))
    assert header == "| iteration | folder | stages (rows) | policy_reward | arithmetic/accuracy | seconds |"
    line1 = next(line for line in md.splitlines() if line.startswith("| 1 |"))
    assert f"`{store.run_uri(RUN)}/iter=0001/`" in line1
    assert "[samples](http://ui/artifacts/key/spark-demo-samples) (4)" in line1
    assert "verified (1)" in line1 and "| 0.5 | 0.5 | 2.0 |" in line1
    line0 = next(line for line in md.splitlines() if line.startswith("| 0 |"))
    assert "checkpoint" in line0 and "|  | 0.25 | 1.0 |" in line0


@pytest.mark.parametrize("iteration, parent, expect", [(1, False, "true"), (2, False, "false"), (1, True, "false")])
def test_iteration_event_names_the_run_and_whether_to_continue(iteration: int, parent: bool, expect: str) -> None:
    metrics = {"iteration": iteration, "policy_reward": float("nan"), "arithmetic/accuracy": 0.5,
               "run_id": "r1", "status": "ran"}
    ev = events.iteration_completed("r1", "s3://spark", iteration, 2, metrics, continued_by_parent=parent)
    assert ev["event"] == "spark.iteration.completed"
    assert ev["resource"]["prefect.resource.id"] == "spark.run.r1"
    assert ev["resource"]["spark.run-id"] == "r1" and ev["resource"]["spark.iteration"] == str(iteration)
    assert ev["resource"][events.TRIGGER_NEXT_LABEL] == expect
    assert all(isinstance(v, str) for v in ev["resource"].values())  # Prefect resource labels are strings
    assert ev["payload"] == {"run_id": "r1", "store": "s3://spark", "iteration": iteration, "iterations": 2,
                             "metrics": {"iteration": iteration, "policy_reward": None,
                                         "arithmetic/accuracy": 0.5}}
    json.dumps(ev, allow_nan=False)


# ------------------------------------------------------------------ per-iteration records (publish cost)

def test_records_of_earlier_iterations_are_read_not_rebuilt(store: Store) -> None:
    """A publish reads the earlier iterations' stored records: what they say is what the reports show,
    whatever the manifests say now; a missing record is rebuilt from the manifests once and stored."""
    from spark_core.config import SparkConfig

    cfg = SparkConfig()
    assert report.load_record(store, RUN, 0) is None
    current = report.iteration_record(cfg, store, RUN, 1)
    records = report.run_records(cfg, store, RUN, current, 1)
    assert sorted(records) == [0, 1] and records[1] is current
    rebuilt = report.load_record(store, RUN, 0)  # iteration 0 had none: rebuilt and stored
    assert rebuilt is not None and rebuilt["stages"] == [["checkpoint", None]]
    assert current["stages"] == [["samples", 4], ["verified", 1], ["train/phase=policy", 0]]

    doctored = {**rebuilt, "summary": {**rebuilt["summary"], "marker": 7}}
    report.save_record(store, RUN, 0, doctored)
    rows = report.metrics_rows(report.run_records(cfg, store, RUN, current, 1))
    assert [r["iteration"] for r in rows] == [0, 1]
    assert rows[0]["marker"] == 7 and rows[1]["marker"] is None  # one set of columns for every row

    assert report.published_summary(cfg, store, RUN, 0)["marker"] == 7  # the stored one
    assert report.published_summary(cfg, store, RUN, 1) == report.iteration_summary(cfg, store, RUN, 1)  # none
    report.save_record(store, RUN, 0, {**doctored, "version": report.RECORD_VERSION + 1})
    assert report.load_record(store, RUN, 0) is None  # another version: rebuilt on the next publish
    report.forget_record(store, RUN, 0)
    assert not store.exists(report.record_uri(store, RUN, 0))
    report.forget_record(store, RUN, 0)  # forgetting twice is fine


def test_frame_of_rows_is_the_metrics_frame_of_the_manifests(tmp_path: Path) -> None:
    from spark_core.config import SparkConfig
    from spark_core.layout import eval_stage

    cfg = SparkConfig()
    name = cfg.eval.benchmarks[0].name
    st = Store(str(tmp_path / "s"))
    for it, acc in ((0, 0.25), (2, 0.5)):
        st.write_table(st.stage_uri(RUN, it, eval_stage(name)), pa.table({"x": [1]}),
                       {"metrics": {"accuracy": acc, "judge_f1": 0.1 * it}})
    st.write_table(st.stage_uri(RUN, 1, "samples"), pa.table({"x": [1]}), {})
    frame = report.metrics_frame(cfg, st, RUN)
    rows = [report.iteration_summary(cfg, st, RUN, it) for it in (0, 1, 2)]
    assert frame.equals(report.frame_of_rows(cfg, rows))
    assert list(frame["iteration"]) == [0, 2] and list(frame["accuracy"]) == [0.25, 0.5]
    # As publish passes them: every row with every column (None where not evaluated), values rounded.
    records = {it: {"summary": row} for it, row in enumerate(rows)}
    published = report.frame_of_rows(cfg, report.metrics_rows(records))
    assert list(published["iteration"]) == [0, 2] and list(published["accuracy"]) == [0.25, 0.5]


def test_artifact_requests_keep_their_order_context_and_errors() -> None:
    import contextvars
    import threading

    from tasks.publish import _InOrder

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("caller")
    seen: list[tuple[int, str, bool]] = []

    def create(i: int) -> None:
        seen.append((i, var.get(), threading.current_thread() is threading.main_thread()))

    send = _InOrder()
    for i in range(20):
        send(create, i)
    send.wait()
    assert seen == [(i, "caller", False) for i in range(20)]

    def fail() -> None:
        raise RuntimeError("server said no")

    send(fail)
    send(create, 99)
    with pytest.raises(RuntimeError, match="server said no"):
        send.close()
    assert seen[-1][0] == 99  # requests after a failed one still ran before close returned
