"""bench/ablation.py's statistics: metrics recomputed from per-question eval rows, and the paired
bootstrap of SPARK minus RLVR over seeds and questions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("bench_ablation", ROOT / "bench" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_ablation"] = module
    spec.loader.exec_module(module)
    return module


def _rows(correct, judged, final=None, pair=None) -> pd.DataFrame:
    n = len(correct)
    final = correct if final is None else final
    return pd.DataFrame({
        "item_id": [f"q{i:03d}" for i in range(n)],
        "correct": correct,
        "judged": judged,
        # null: not judged (no answer); otherwise whether the verdict matched
        "judgment_correct": [None if j == "-" else (j == "Yes") == c for j, c in zip(judged, correct)],
        "final_correct": final,
        "pairwise_correct": pair if pair is not None else [None] * n,
    }).replace({"judged": {"-": None}})


def test_row_metrics_match_the_evaluation_definitions(ablation) -> None:
    rows = _rows([True, True, False, False], ["Yes", None, "No", "Yes"], final=[True, False, True, False],
                 pair=[True, None, False, None])
    m = ablation.row_metrics(rows)
    assert m["accuracy"] == 0.5 and m["accuracy_reflect"] == 0.5
    assert m["right_to_wrong"] == 0.25 and m["wrong_to_right"] == 0.25
    assert m["verdict_parse_rate"] == 0.75  # one unparsed verdict of four
    # Yes-rate on right answers 1/2 (the unparsed one is neither), No-rate on wrong ones 1/2.
    assert m["judge_balanced_accuracy"] == 0.5
    assert m["pairwise_accuracy"] == 0.5


def test_paired_bootstrap_is_centred_on_the_paired_difference(ablation) -> None:
    n = 120
    truth = [i % 2 == 0 for i in range(n)]
    chance = ["Yes" if (i // 2) % 2 == 0 else "No" for i in range(n)]  # independent of truth
    perfect = ["Yes" if t else "No" for t in truth]
    rows = {}
    for seed in (0, 1, 2):
        rows[("rlvr", seed, 4)] = _rows(truth, chance)
        rows[("spark", seed, 4)] = _rows(truth, perfect)
    diff = ablation.paired_bootstrap(rows, [0, 1, 2], 4, reps=60)
    ba = diff["judge_balanced_accuracy"]
    assert ba["mean"] == pytest.approx(0.5)
    assert 0.3 < ba["ci95"][0] <= ba["mean"] <= ba["ci95"][1]
    # Same answers in both arms: no difference in accuracy, and a degenerate CI at 0.
    assert diff["accuracy"]["mean"] == 0.0 and diff["accuracy"]["ci95"] == [0.0, 0.0]
    # No pairs at all: reported as n/a, not as a number.
    assert diff["pairwise_accuracy"]["mean"] is None


def test_paired_bootstrap_refuses_unpaired_questions(ablation) -> None:
    a = _rows([True, False], ["Yes", "No"])
    b = a.copy()
    b["item_id"] = ["x", "y"]
    with pytest.raises(AssertionError, match="different questions"):
        ablation.paired_bootstrap({("rlvr", 0, 1): a, ("spark", 0, 1): b}, [0], 1, reps=10)
