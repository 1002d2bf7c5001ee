"""Test-time self-reflection: the judge/revise loop, driven by a scripted stand-in engine."""

from __future__ import annotations

import pytest

from spark_core import prompts
from spark_core.reflection import parse_verdict, self_reflect, self_reflect_batch

from scripted_engine import ScriptedEngine, chat_fmt

Q = "What is 2 + 3?"
Q2 = "What is 4 + 4?"
A0 = "2 + 3 = 6. The answer is \\boxed{6}."
A1 = "Let me redo it: 2 + 3 = 5. The answer is \\boxed{5}."
A2 = "Once more: 2 + 3 = 5. \\boxed{5}"


def qmsgs(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{question} Put the answer in \\boxed{{}}."}]


def ask(question: str) -> str:
    return chat_fmt(qmsgs(question))


def judge(question: str, completion: str, answer: str | None, context: str = "both") -> str:
    return chat_fmt(prompts.pointwise_judgment(question, completion, answer, context, "yes_no", 0).messages)


def revise(question: str, completion: str, answer: str | None) -> str:
    return chat_fmt(prompts.reflection_request(question, completion, answer, "cot", True, 0).messages)


def run(engine: ScriptedEngine, questions: list[str], **kw):
    kw.setdefault("max_new_tokens", 32)
    return self_reflect_batch(engine, chat_fmt, questions, question_messages=qmsgs, **kw)


def test_stops_when_judged_correct() -> None:
    engine = ScriptedEngine([(ask(Q), A1), (judge(Q, A1, "5"), "It checks out. \\boxed{Yes}")])
    (trace,) = run(engine, [Q], max_rounds=2)
    assert trace.stopped_because == "judged_correct"
    assert trace.final_answer == "5" and trace.first_answer == "5"
    assert (trace.n_judgments, trace.n_revisions) == (1, 0)
    assert len(trace.rounds) == 1 and trace.rounds[0]["verdict"] == "Yes"
    assert len(engine.calls) == 2  # answer, judge: nothing after Yes
    # Greedy decoding everywhere.
    assert all(params.temperature == 0.0 and params.n == 1 for _, params in engine.calls)


def test_revises_after_no_then_stops_on_yes() -> None:
    engine = ScriptedEngine(
        [
            (ask(Q), A0),
            (judge(Q, A0, "6"), "2 + 3 is not 6. \\boxed{No}"),
            (revise(Q, A0, "6"), A1),
            (judge(Q, A1, "5"), "\\boxed{Yes}"),
        ]
    )
    (trace,) = run(engine, [Q], max_rounds=2)
    assert [r["answer"] for r in trace.rounds] == ["6", "5"]
    assert [r["verdict"] for r in trace.rounds] == ["No", "Yes"]
    assert trace.final_answer == "5"
    assert trace.stopped_because == "judged_correct"
    assert (trace.n_judgments, trace.n_revisions) == (2, 1)


def test_max_rounds_takes_last_revision_without_judgment() -> None:
    engine = ScriptedEngine(
        [
            (ask(Q), A0),
            (judge(Q, A0, "6"), "\\boxed{No}"),
            (revise(Q, A0, "6"), A1),
            (judge(Q, A1, "5"), "\\boxed{No}"),
            (revise(Q, A1, "5"), A2),
            # No rule judges A2: asking would raise inside ScriptedEngine.
        ]
    )
    (trace,) = run(engine, [Q], max_rounds=2)
    assert trace.stopped_because == "max_rounds"
    assert (trace.n_judgments, trace.n_revisions) == (2, 2)
    assert [r["round"] for r in trace.rounds] == [0, 1, 2]
    assert trace.rounds[-1]["completion"] == A2
    assert trace.rounds[-1]["judgment_completion"] is None and trace.rounds[-1]["verdict"] is None
    assert trace.final_answer == "5"
    assert len(engine.calls) == 5
    assert not any(judge(Q, A2, "5") == p for p in engine.prompts)


def test_one_round_limit() -> None:
    engine = ScriptedEngine([(ask(Q), A0), (judge(Q, A0, "6"), "\\boxed{No}"), (revise(Q, A0, "6"), A1)])
    (trace,) = run(engine, [Q], max_rounds=1)
    assert (trace.n_judgments, trace.n_revisions) == (1, 1)
    assert trace.final_answer == "5" and trace.stopped_because == "max_rounds"


def test_zero_rounds_is_the_first_answer() -> None:
    engine = ScriptedEngine([(ask(Q), A0)])
    (trace,) = run(engine, [Q], max_rounds=0)
    assert trace.stopped_because == "no_rounds"
    assert trace.final_answer == "6" and len(trace.rounds) == 1
    assert len(engine.calls) == 1


def test_unparsed_verdict_is_treated_as_no() -> None:
    engine = ScriptedEngine(
        [(ask(Q), A0), (judge(Q, A0, "6"), "I am not sure."), (revise(Q, A0, "6"), A1)]
    )
    (trace,) = run(engine, [Q], max_rounds=1)
    assert trace.rounds[0]["judgment_completion"] == "I am not sure."
    assert trace.rounds[0]["verdict"] is None
    assert trace.n_revisions == 1 and trace.final_answer == "5"


def test_attempt_without_answer_is_not_judged() -> None:
    no_box = "I think it is six."
    engine = ScriptedEngine([(ask(Q), no_box), (revise(Q, no_box, None), A1), (judge(Q, A1, "5"), "\\boxed{Yes}")])
    (trace,) = run(engine, [Q], max_rounds=2)
    assert trace.rounds[0]["judgment_completion"] is None and trace.rounds[0]["answer"] is None
    assert (trace.n_judgments, trace.n_revisions) == (1, 1)
    assert trace.final_answer == "5" and trace.stopped_because == "judged_correct"


def test_batch_only_active_questions_continue() -> None:
    engine = ScriptedEngine(
        [
            (ask(Q), A0),
            (ask(Q2), "4 + 4 = 8. \\boxed{8}"),
            (judge(Q, A0, "6"), "\\boxed{No}"),
            (judge(Q2, "4 + 4 = 8. \\boxed{8}", "8"), "\\boxed{Yes}"),
            (revise(Q, A0, "6"), A1),
            (judge(Q, A1, "5"), "\\boxed{Yes}"),
        ]
    )
    t1, t2 = run(engine, [Q, Q2], max_rounds=2, golds=["5", "8"])
    assert (t1.final_answer, t2.final_answer) == ("5", "8")
    assert (t1.gold, t2.gold) == ("5", "8")
    # Call sizes: 2 answers, 2 judgments, 1 revision, 1 judgment (question 2 stopped at round 0).
    assert [len(batch) for batch, _ in engine.calls] == [2, 2, 1, 1]


@pytest.mark.parametrize("context", ["answer", "cot", "both"])
def test_judge_context_controls_what_the_judge_sees(context: str) -> None:
    reasoning = "Counting on fingers: REASONING-MARKER gives 6."
    completion = f"{reasoning} \\boxed{{6}}"
    engine = ScriptedEngine([(ask(Q), completion), ("Decide whether", "\\boxed{Yes}")])
    run(engine, [Q], max_rounds=1, judge_context=context)
    judge_prompt = engine.calls[1][0][0]
    assert judge_prompt == judge(Q, completion, "6", context)
    assert ("REASONING-MARKER" in judge_prompt) == (context != "answer")
    assert ("Final answer: 6" in judge_prompt) == (context != "cot")


def test_self_reflect_single() -> None:
    engine = ScriptedEngine([(ask(Q), A1), (judge(Q, A1, "5"), "\\boxed{Yes}")])
    trace = self_reflect(engine, chat_fmt, Q, question_messages=qmsgs, gold="5", max_new_tokens=16)
    assert trace.gold == "5" and trace.final_answer == "5"
    assert trace.to_dict()["rounds"][0]["verdict"] == "Yes"


def test_negative_rounds_rejected() -> None:
    with pytest.raises(ValueError, match="max_rounds"):
        run(ScriptedEngine([]), [Q], max_rounds=-1)


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("so \\boxed{Yes}", ("Yes", "No"), "Yes"),
        ("\\boxed{no}", ("Yes", "No"), "No"),
        ("\\boxed{\\text{Yes}.}", ("Yes", "No"), "Yes"),
        ("first \\boxed{Yes} then \\boxed{No}", ("Yes", "No"), "No"),  # the last box counts
        ("\\boxed{maybe}", ("Yes", "No"), None),
        ("Yes, it is right.", ("Yes", "No"), None),  # no box: unparsed
        ("", ("Yes", "No"), None),
        ("\\boxed{(B)}", ("A", "B"), "B"),
        ("\\box{A}", ("A", "B"), "A"),  # the reference code's \box{} spelling
    ],
)
def test_parse_verdict(text: str, labels: tuple[str, str], expected: str | None) -> None:
    assert parse_verdict(text, labels) == expected
