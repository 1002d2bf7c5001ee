"""Reward-phase diagnostics (pure): parse rates, zero-advantage share, Yes-share, the no-signal flag."""

from __future__ import annotations

import logging

import pandas as pd
import pyarrow as pa

from spark_core.diagnostics import no_signal_warning, reward_phase_diagnostics


def rows(spec: list[tuple[str, str, str, str | None, float]]) -> pd.DataFrame:
    """(item_id, kind, label, completion, reward) per sample; reflections' answer = their boxed text."""
    out = []
    for item, kind, label, completion, reward in spec:
        answer = None
        if kind == "reflection" and completion and "\\boxed{" in completion:
            answer = completion.split("\\boxed{")[-1].rstrip("}.")
        out.append({"question_id": item, "kind": kind, "label": label, "completion": completion,
                    "answer": answer, "reward": reward})
    return pd.DataFrame(out)


def test_parse_rates_yes_share_and_zero_advantage() -> None:
    df = rows([
        # pointwise Yes/No item: one Yes (right), one No (wrong), one unparsed, one \box{} (SPARK.md quirk)
        ("i1", "pointwise", "Yes", "ok \\boxed{Yes}", 1.0),
        ("i1", "pointwise", "Yes", "hmm \\boxed{No}", 0.0),
        ("i1", "pointwise", "Yes", "I think it is right.", 0.0),
        ("i1", "pointwise", "Yes", "\\box{Yes}", 1.0),
        # pointwise A/B item, all say A (= correct): zero advantage
        ("i2", "pointwise", "A", "\\boxed{A}", 1.0),
        ("i2", "pointwise", "A", "\\boxed{(A)}", 1.0),
        # pairwise item: both B, label A: zero advantage
        ("i3", "pairwise", "A", "\\boxed{B}", 0.0),
        ("i3", "pairwise", "A", "\\boxed{B}", 0.0),
        # reflection: one answer, one none
        ("i4", "reflection", "8", "3 + 5 = 8. \\boxed{8}", 1.0),
        ("i4", "reflection", "8", "no idea", 0.0),
    ])
    d = reward_phase_diagnostics(df)
    assert d["parse_rate_by_kind"] == {"pairwise": 1.0, "pointwise": 5 / 6, "reflection": 0.5}
    assert d["verdict_parse_rate"] == 7 / 8
    assert d["verdict_wrong_rate"] == 3 / 8  # the unparsed one is not counted as wrong
    assert d["yes_share"] == 4 / 5  # Yes, \box{Yes}, A, A among 5 readable pointwise verdicts
    assert d["pairwise_a_share"] == 0.0
    assert d["zero_advantage_share"] == 0.5
    assert d["zero_advantage_by_kind"] == {"pairwise": 1.0, "pointwise": 0.5, "reflection": 0.0}
    assert d["no_signal"] is False and no_signal_warning(1, d) is None


def test_all_groups_flat_is_flagged_with_a_warning() -> None:
    df = rows([
        ("i1", "pointwise", "No", "blah", 0.0),
        ("i1", "pointwise", "No", "blah", 0.0),
        ("i2", "reflection", "9", "\\boxed{9}", 1.0),
        ("i2", "reflection", "9", "\\boxed{9}", 1.0),
    ])
    d = reward_phase_diagnostics(df)
    assert d["no_signal"] is True and d["zero_advantage_share"] == 1.0
    assert d["verdict_parse_rate"] == 0.0 and d["yes_share"] is None
    message = no_signal_warning(3, d)
    assert message is not None and "iteration 3" in message and "NO training signal" in message


def test_empty_input() -> None:
    d = reward_phase_diagnostics(rows([]))
    assert d["verdict_parse_rate"] is None and d["no_signal"] is False and d["parse_rate_by_kind"] == {}


def test_verify_reward_stage_records_diagnostics_and_warns(caplog) -> None:
    from spark_core.stages.verify import _reward_diagnostics

    table = pa.Table.from_pandas(rows([
        ("i1", "pairwise", "B", "\\boxed{A}", 0.0),
        ("i1", "pairwise", "B", "\\boxed{A}", 0.0),
    ]), preserve_index=False)
    with caplog.at_level(logging.WARNING, logger="spark_core.stages"):
        d = _reward_diagnostics(2, table)
    assert d["no_signal"] and d["pairwise_a_share"] == 1.0
    assert any("NO training signal" in r.getMessage() for r in caplog.records)
