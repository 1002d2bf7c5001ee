"""Evaluation: pure metrics on hand-made cases, the evaluation loop on a scripted engine, and one
end-to-end run on the tiny model."""

from __future__ import annotations

import json
from functools import partial

import pyarrow as pa
import pytest

from spark_core import prompts, schemas
from spark_core.benchmarks import PreferencePair
from spark_core.config import EvalConfig
from spark_core.data import Question
from spark_core.engines.base import SamplingParams
from spark_core.evaluation import (
    EVAL_ROWS,
    PREFERENCE_EVAL,
    accuracy,
    binary_judge_metrics,
    evaluate_benchmark,
    evaluate_preference,
    flip_counts,
    pairwise_accuracy,
)
from spark_core.reflection import judge_batch

from scripted_engine import ScriptedEngine, chat_fmt

SUMMARY_KEYS = {
    "n",
    "accuracy",
    "accuracy_reflect",
    "right_to_wrong",
    "wrong_to_right",
    "judge_precision",
    "judge_recall",
    "judge_f1",
    "judge_accuracy",
    "judge_balanced_accuracy",
    "judge_yes_share",
    "verdict_parse_rate",
    "pairwise_accuracy",
    "pairwise_acc_correct_first",
    "pairwise_acc_correct_second",
    "pairwise_n",
    "avg_at_k",
}

# ------------------------------------------------------------------------------------------ metrics


def test_accuracy() -> None:
    assert accuracy([True, False, True, True]) == 0.75
    assert accuracy([]) == 0.0


def test_judge_metrics_one_of_each() -> None:
    m = binary_judge_metrics([True, True, False, False], [True, False, True, False])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.5, 0.5, 0.5, 0.5)
    assert (m["n"], m["n_unparsed"]) == (4, 0)
    assert (m["balanced_accuracy"], m["parse_rate"], m["yes_share"]) == (0.5, 1.0, 0.5)


def test_balanced_accuracy_is_one_half_for_any_constant_judge() -> None:
    # A mostly-correct solver (8 of 10 right): always-Yes looks good on accuracy and F1, not here.
    truth = [True] * 8 + [False] * 2
    yes = binary_judge_metrics([True] * 10, truth)
    assert yes["accuracy"] == 0.8 and yes["f1"] == pytest.approx(2 * 0.8 / 1.8)
    assert yes["balanced_accuracy"] == 0.5 and yes["yes_share"] == 1.0
    no = binary_judge_metrics([False] * 10, truth)
    assert no["balanced_accuracy"] == 0.5 and no["yes_share"] == 0.0
    perfect = binary_judge_metrics(list(truth), truth)
    assert perfect["balanced_accuracy"] == 1.0
    # Yes-rate on right answers 6/8, No-rate on wrong ones 1/2.
    m = binary_judge_metrics([True] * 6 + [False] * 2 + [False, True], truth)
    assert m["balanced_accuracy"] == pytest.approx((6 / 8 + 1 / 2) / 2)


def test_unparsed_verdicts_are_counted_apart_and_as_neither_yes_nor_no() -> None:
    truth = [True, True, False, False]
    m = binary_judge_metrics([True, None, False, None], truth)
    assert m["n_unparsed"] == 2 and m["parse_rate"] == 0.5
    assert m["yes_share"] == 0.5  # among the two readable verdicts
    assert m["balanced_accuracy"] == 0.5  # Yes-rate 1/2 on right answers, No-rate 1/2 on wrong ones
    assert m["accuracy"] == 0.5  # unparsed = wrong judgment
    none = binary_judge_metrics([None, None], [True, False])
    assert (none["parse_rate"], none["yes_share"], none["balanced_accuracy"]) == (0.0, 0.0, 0.0)


def test_balanced_accuracy_with_one_class_absent_is_that_class_rate() -> None:
    m = binary_judge_metrics([True, False, True], [True, True, True])
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert binary_judge_metrics([], [])["balanced_accuracy"] == 0.0


def test_judge_metrics_precision_recall_differ() -> None:
    # Says Yes to one of two correct answers and to one wrong one: precision 1/2, recall 1/2 ...
    m = binary_judge_metrics([True, False, True], [True, True, False])
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)
    # ... says Yes only once, to a correct answer: precision 1, recall 1/2, F1 2/3.
    m = binary_judge_metrics([True, False], [True, True])
    assert m["precision"] == 1.0 and m["recall"] == 0.5 and m["f1"] == pytest.approx(2 / 3)


def test_judge_metrics_zero_division_is_zero() -> None:
    # Never says Yes and no answer is correct: precision and recall have empty denominators.
    m = binary_judge_metrics([False, False], [False, False])
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert m["accuracy"] == 1.0
    empty = binary_judge_metrics([], [])
    assert (empty["precision"], empty["recall"], empty["f1"], empty["accuracy"], empty["n"]) == (0.0, 0.0, 0.0, 0.0, 0)


def test_judge_metrics_unparsed_is_a_wrong_judgment() -> None:
    # Unparsed on a correct answer = false negative; on a wrong answer = false positive.
    m = binary_judge_metrics([None, None], [True, False])
    assert (m["precision"], m["recall"], m["accuracy"], m["n_unparsed"]) == (0.0, 0.0, 0.0, 2)
    m = binary_judge_metrics([True, None], [True, True])
    assert m["recall"] == 0.5 and m["precision"] == 1.0 and m["accuracy"] == 0.5


def test_metric_length_mismatch() -> None:
    with pytest.raises(ValueError):
        binary_judge_metrics([True], [True, False])
    with pytest.raises(ValueError):
        flip_counts([True], [])
    with pytest.raises(ValueError):
        pairwise_accuracy(["A"], [])


def test_flip_counts() -> None:
    assert flip_counts([True, True, False, False], [True, False, True, False]) == {
        "right_to_wrong": 1,
        "wrong_to_right": 1,
    }
    assert flip_counts([], []) == {"right_to_wrong": 0, "wrong_to_right": 0}


def test_pairwise_accuracy() -> None:
    assert pairwise_accuracy(["A", "B", None, "A"], ["A", "A", "B", "A"]) == 0.5
    assert pairwise_accuracy([], []) == 0.0


# ---------------------------------------------------------------------------- scripted evaluation

QA, QB = "What is 1 + 1?", "What is 2 + 2?"
RIGHT_A, WRONG_B, RIGHT_B = "1 + 1 = 2. \\boxed{2}", "2 + 2 = 5. \\boxed{5}", "Again: 2 + 2 = 4. \\boxed{4}"
QUESTIONS = [Question("qa", QA, "2"), Question("qb", QB, "4")]


def qmsgs(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{question} Box it."}]


def ask(q: str) -> str:
    return chat_fmt(qmsgs(q))


def judge(q: str, completion: str, answer: str) -> str:
    return chat_fmt(prompts.pointwise_judgment(q, completion, answer, "both", "yes_no", 0).messages)


def revise(q: str, completion: str, answer: str) -> str:
    return chat_fmt(prompts.reflection_request(q, completion, answer, "cot", True, 0).messages)


def pair(q: str, a: str, a_ans: str, b: str, b_ans: str) -> str:
    return chat_fmt(prompts.pairwise_judgment(q, a, a_ans, b, b_ans, "both", 0).messages)


def scripted(answer_a=RIGHT_A) -> ScriptedEngine:
    """QA answered right and judged Yes; QB answered wrong, judged No, revised right, judged Yes.
    The pairwise judge always answers (A): a maximal position bias."""
    return ScriptedEngine(
        [
            (pair(QB, RIGHT_B, "4", WRONG_B, "5"), "\\boxed{A}"),
            (pair(QB, WRONG_B, "5", RIGHT_B, "4"), "\\boxed{A}"),
            (judge(QA, RIGHT_A, "2"), "\\boxed{Yes}"),
            (judge(QB, WRONG_B, "5"), "\\boxed{No}"),
            (judge(QB, RIGHT_B, "4"), "\\boxed{Yes}"),
            (revise(QB, WRONG_B, "5"), RIGHT_B),
            (ask(QA), answer_a),
            (ask(QB), WRONG_B),
        ]
    )


def evaluate(engine: ScriptedEngine, **cfg):
    return evaluate_benchmark(
        engine,
        chat_fmt,
        QUESTIONS,
        question_messages=qmsgs,
        eval_cfg=EvalConfig(**cfg),
        max_new_tokens=32,
        seed=0,
        verify_processes=1,
    )


def test_evaluate_benchmark_scripted() -> None:
    engine = scripted()
    table, summary = evaluate(engine, max_rounds=2)
    # The EVAL contract first, then the per-question pairwise verdict.
    assert table.schema == EVAL_ROWS
    assert table.column_names[: len(schemas.EVAL)] == schemas.EVAL.names
    assert SUMMARY_KEYS <= summary.keys()
    json.dumps(summary)  # flat and JSON-able
    assert summary["n"] == 2
    assert summary["accuracy"] == 0.5 and summary["accuracy_reflect"] == 1.0
    assert (summary["right_to_wrong"], summary["wrong_to_right"]) == (0, 1)
    # Verdicts on a0: Yes on the right one, No on the wrong one: a perfect judge.
    assert summary["judge_f1"] == 1.0 and summary["judge_accuracy"] == 1.0
    assert summary["judge_balanced_accuracy"] == 1.0 and summary["verdict_parse_rate"] == 1.0
    assert summary["judge_yes_share"] == 0.5
    # One pair (QB: wrong a0, right a1); the judge always says A.
    assert summary["pairwise_n"] == 1
    assert summary["pairwise_acc_correct_first"] == 1.0
    assert summary["pairwise_acc_correct_second"] == 0.0
    assert summary["pairwise_accuracy"] in (0.0, 1.0)
    assert summary["avg_at_k"] is None

    rows = {r["item_id"]: r for r in table.to_pylist()}
    assert rows["qb"]["prediction"] == "5" and rows["qb"]["final_prediction"] == "4"
    assert rows["qb"]["correct"] is False and rows["qb"]["final_correct"] is True
    assert rows["qb"]["judged"] == "No" and rows["qb"]["judgment_correct"] is True
    assert rows["qb"]["reflection_rounds"] == 1 and rows["qa"]["reflection_rounds"] == 0
    # The per-question pairwise verdict: QA had no pair; QB's one shuffled presentation matches the summary.
    assert rows["qa"]["pairwise_correct"] is None
    assert rows["qb"]["pairwise_correct"] is (summary["pairwise_accuracy"] == 1.0)
    trace = json.loads(rows["qb"]["reflection_trace"])
    assert [r["answer"] for r in trace] == ["5", "4"]
    assert set(trace[0]) == {"round", "completion", "answer", "judgment_completion", "verdict"}
    # QA had no wrong answer to pair with: extra samples were drawn for it only, at temperature.
    sampled = [(batch, params) for batch, params in engine.calls if params.temperature > 0]
    assert len(sampled) == 1 and sampled[0][0] == [ask(QA)] and sampled[0][1].n == 4


def test_evaluate_without_reflection_still_judges() -> None:
    engine = scripted()
    table, summary = evaluate(engine, reflection=False, pairwise=False)
    assert summary["accuracy"] == 0.5
    assert summary["accuracy_reflect"] is None and summary["right_to_wrong"] is None
    assert summary["judge_n"] == 2 and summary["judge_f1"] == 1.0
    assert summary["pairwise_n"] == 0 and summary["pairwise_accuracy"] is None
    assert table.column("final_prediction").to_pylist() == table.column("prediction").to_pylist()
    assert not any(p == revise(QB, WRONG_B, "5") for p in engine.prompts)


def test_evaluate_avg_at_k_and_unparsed_judgment() -> None:
    def answer_a(params: SamplingParams, j: int) -> str:
        # Greedy: right; sampled: right on even samples, wrong on odd ones.
        return RIGHT_A if params.temperature == 0 or j % 2 == 0 else "1 + 1 = 3. \\boxed{3}"

    engine = scripted(answer_a)
    engine.rules.insert(0, (pair(QA, RIGHT_A, "2", "1 + 1 = 3. \\boxed{3}", "3"), "\\boxed{A}"))
    engine.rules.insert(0, (pair(QA, "1 + 1 = 3. \\boxed{3}", "3", RIGHT_A, "2"), "\\boxed{B}"))
    engine.rules.insert(0, (judge(QA, RIGHT_A, "2"), "no verdict here"))  # unparsed: counts wrong
    engine.rules.insert(0, (revise(QA, RIGHT_A, "2"), RIGHT_A))
    _, summary = evaluate(engine, max_rounds=1, avg_k=4, avg_temperature=0.7)
    # QA: samples right/wrong/right/wrong; QB: always the wrong greedy text (the engine ignores temperature).
    assert summary["avg_at_k"] == pytest.approx(2 / 8)
    assert summary["judge_n_unparsed"] == 1 and summary["judge_accuracy"] == 0.5
    # The unparsed verdict is reported apart (parse rate) and is neither Yes nor No.
    assert summary["verdict_parse_rate"] == 0.5 and summary["judge_balanced_accuracy"] == 0.5
    assert summary["pairwise_n"] == 2 and summary["pairwise_parse_rate"] == 1.0
    # QA's pair is judged right in both orders, QB's only when the correct answer is (A).
    assert summary["pairwise_acc_correct_first"] == 1.0 and summary["pairwise_acc_correct_second"] == 0.5


def test_evaluate_preference_both_orders() -> None:
    pairs = [PreferencePair("Say hi", "Hi!", "Go away.", "p0"), PreferencePair("Add 1+1", "2", "3", "p1")]
    p0_first = chat_fmt(prompts.pairwise_judgment("Say hi", "Hi!", None, "Go away.", None, "cot", 0).messages)
    p0_second = chat_fmt(prompts.pairwise_judgment("Say hi", "Go away.", None, "Hi!", None, "cot", 0).messages)
    engine = ScriptedEngine(
        [(p0_first, "\\boxed{A}"), (p0_second, "\\boxed{B}"), ("Add 1+1", "\\boxed{A}")]
    )
    table, summary = evaluate_preference(engine, chat_fmt, pairs, max_new_tokens=16)
    assert table.schema == PREFERENCE_EVAL and table.num_rows == 2
    assert summary["n"] == 2
    assert summary["acc_chosen_first"] == 1.0 and summary["acc_chosen_second"] == 0.5
    assert summary["pairwise_accuracy"] == 0.75 and summary["consistent_accuracy"] == 0.5
    assert summary["n_unparsed"] == 0
    json.dumps(summary)


# ------------------------------------------------------------------------------- tiny model, HF


def test_evaluate_benchmark_tiny_model_end_to_end() -> None:
    models = pytest.importorskip("spark_core.models")
    from spark_core.benchmarks import load_benchmark
    from spark_core.chat import formatter, question_messages
    from spark_core.config import BenchmarkConfig, load_config
    from spark_core.engines.hf import HFEngine

    cfg = load_config(preset="tiny")
    model, tokenizer = models.build_tiny(cfg.model.tiny)
    questions = load_benchmark(BenchmarkConfig(name="arith", source="arithmetic", limit=4), cfg)
    assert len(questions) == 4
    eval_cfg = cfg.eval.model_copy(update={"max_rounds": 1, "avg_k": 2})
    table, summary = evaluate_benchmark(
        HFEngine(model, tokenizer),
        formatter(tokenizer, cfg.data.use_chat_template),
        questions,
        question_messages=partial(question_messages, cfg.data),
        eval_cfg=eval_cfg,
        max_new_tokens=8,
        seed=0,
        verify_processes=1,
    )
    assert isinstance(table, pa.Table) and table.schema == EVAL_ROWS and table.num_rows == 4
    assert table.column("item_id").to_pylist() == [q.question_id for q in questions]
    assert SUMMARY_KEYS <= summary.keys() and summary["n"] == 4
    json.dumps(summary)
    for key in ("accuracy", "accuracy_reflect", "judge_f1", "judge_accuracy", "avg_at_k"):
        assert 0.0 <= summary[key] <= 1.0
    for row in table.to_pylist():
        trace = json.loads(row["reflection_trace"])
        assert 1 <= len(trace) <= 2 and row["reflection_rounds"] == len(trace) - 1

    # The random model rarely boxes an answer, so the judge prompts above may never have been sent:
    # drive the judge paths through the real engine and tokenizer directly.
    engine, fmt = HFEngine(model, tokenizer), formatter(tokenizer, cfg.data.use_chat_template)
    verdicts = judge_batch(engine, fmt, ["What is 1 + 2?"], ["1 + 2 = 3. \\boxed{3}"], ["3"], max_new_tokens=8)
    assert len(verdicts) == 1 and isinstance(verdicts[0][0], str) and verdicts[0][1] in ("Yes", "No", None)
    pairs = [PreferencePair("What is 1 + 2?", "\\boxed{3}", "\\boxed{4}", "p0")]
    ptable, psummary = evaluate_preference(engine, fmt, pairs, max_new_tokens=8)
    assert ptable.schema == PREFERENCE_EVAL and ptable.num_rows == 1 and psummary["n"] == 1
