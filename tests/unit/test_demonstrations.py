"""Role prompts: balanced, disjoint demonstrations and one chat builder for training and test time."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from spark_core import prompts
from spark_core.config import RewardDataConfig, load_config
from spark_core.demonstrations import (
    RolePrompts,
    build_messages,
    demonstration_questions,
    role_prompts,
    run_question_texts,
)
from spark_core.reflection import judge_batch, self_reflect_batch
from spark_core.reward_data import build_reward_items

from scripted_engine import ScriptedEngine, chat_fmt
from test_reward_data import make_verified

Q = "What is 12 + 30?"
GOOD = "12 + 30 = 42. The answer is \\boxed{42}."
BAD = "12 + 30 = 41. The answer is \\boxed{41}."
BOXED = re.compile(r"\\boxed\{([^{}]*)\}\s*\.?$")


def roles(count: int = 4, system: str | None = "SYS") -> RolePrompts:
    cfg = load_config(preset="smollm2-arith")
    return RolePrompts(system, role_prompts(cfg).pool, count)


def verdicts(messages: list[dict[str, str]]) -> list[str]:
    """The boxed verdict/answer of every demonstration (assistant turn)."""
    return [BOXED.search(m["content"]).group(1) for m in messages if m["role"] == "assistant"]


KINDS = {
    "pointwise-yn": prompts.pointwise_judgment(Q, GOOD, "42", "both", "yes_no", 1),
    "pointwise-ab": prompts.pointwise_judgment(Q, GOOD, "42", "answer", "a_b", 2),
    "pairwise": prompts.pairwise_judgment(Q, GOOD, "42", BAD, "41", "both", 3),
    "reflection-cot": prompts.reflection_request(Q, BAD, "41", "cot", False, 1),
    "reflection-answer": prompts.reflection_request(Q, BAD, "41", "answer", True, 0),
    "judge": prompts.self_judgment_prompt(Q, GOOD, "42", "both"),
    "revision": prompts.revision_prompt(Q, BAD, "41"),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_gets_demonstrations_in_its_own_wording_then_the_real_turn(kind: str) -> None:
    prompt = KINDS[kind]
    msgs = roles(4).messages(prompt, random.Random(0))
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 4 + ["user"]
    assert msgs[0]["content"] == "SYS" and msgs[-1] == prompt.messages[-1]
    # Same wording as the real prompt: its template text up to the first placeholder opens every demo.
    opening = prompt.messages[-1]["content"].split("\n")[0][:20]
    assert all(m["content"].startswith(opening) for m in msgs[1:-1:2])
    # Each reply is a one-line check then the boxed verdict or answer.
    for reply in msgs[2:-1:2]:
        assert "=" in reply["content"] and BOXED.search(reply["content"])


def test_demonstration_labels_are_balanced_and_their_order_varies() -> None:
    r = roles(4)
    orders = set()
    for seed in range(30):
        yn = verdicts(r.messages(KINDS["pointwise-yn"], random.Random(seed)))
        assert Counter(yn) == {"Yes": 2, "No": 2}
        ab = verdicts(r.messages(KINDS["pointwise-ab"], random.Random(seed)))
        assert Counter(ab) == {"A": 2, "B": 2}
        pair = verdicts(r.messages(KINDS["pairwise"], random.Random(seed)))
        assert Counter(pair) == {"A": 2, "B": 2}
        orders.add(tuple(yn))
    assert len(orders) > 3  # shuffled per prompt: the last demonstration's verdict is not fixed


def test_demonstration_verdicts_are_right() -> None:
    for seed in range(10):
        msgs = roles(4).messages(KINDS["pointwise-yn"], random.Random(seed))
        for user, reply in zip(msgs[1:-1:2], msgs[2:-1:2]):
            expr = re.search(r"What is ([0-9 +*-]+)\?", user["content"]).group(1)
            shown = re.search(r"Final answer: (-?\d+)", user["content"]).group(1)
            right = eval(expr) == int(shown)  # noqa: S307
            assert reply["content"].endswith("\\boxed{Yes}" if right else "\\boxed{No}")
        # Reflection demonstrations end with the right answer, and neutral ones confirm a right one half the time.
        refl = roles(4).messages(KINDS["reflection-cot"], random.Random(seed))
        kept = 0
        for user, reply in zip(refl[1:-1:2], refl[2:-1:2]):
            expr = re.search(r"What is ([0-9 +*-]+)\?", user["content"]).group(1)
            assert verdicts([reply]) == [str(eval(expr))]  # noqa: S307
            kept += "is right" in reply["content"]
        assert kept == 2


def test_explicit_reflection_demonstrations_only_show_wrong_answers() -> None:
    msgs = roles(4).messages(KINDS["revision"], random.Random(3))
    assert all("not" in m["content"] for m in msgs[2:-1:2])


def test_no_demonstrations_and_no_system_prompt_is_the_bare_turn() -> None:
    prompt = KINDS["judge"]
    assert RolePrompts(None).messages(prompt, random.Random(0)) == prompt.messages
    assert build_messages(None, prompt, 1, 2) == prompt.messages
    with_system = RolePrompts("SYS").messages(prompt, random.Random(0))
    assert with_system == [{"role": "system", "content": "SYS"}] + prompt.messages


def test_demonstration_count_must_be_even() -> None:
    with pytest.raises(ValueError, match="even"):
        RolePrompts(None, roles().pool, 3)
    with pytest.raises(ValueError, match="even"):
        RewardDataConfig(demonstrations=3)


@pytest.mark.parametrize("preset", ["smollm2-arith", "tiny"])
def test_demonstration_questions_are_disjoint_from_the_runs_questions(preset: str) -> None:
    cfg = load_config(preset=preset, overrides={"reward_data": {"demonstrations": 2}})
    used = run_question_texts(cfg)
    pool = role_prompts(cfg).pool
    assert len(pool) >= 2 and len({q.question for q in pool}) == len(pool)
    assert not {q.question for q in pool} & used
    # The smollm2 run's training data uses every one-digit addition: the demonstrations avoid them all.
    assert all(str(eval(q.expression)) == str(q.value) for q in pool)  # noqa: S307


def test_demonstration_questions_skip_an_exhausted_level_and_escalate() -> None:
    level = load_config(preset="tiny").data.arithmetic.levels[0]  # one-digit additions: 100 questions
    every = {f"What is {a} + {b}?" for a in range(10) for b in range(10)}
    pool = demonstration_questions([level], every, seed=0, size=8)
    assert len(pool) == 8 and not {q.question for q in pool} & every


def test_reward_items_and_test_time_prompts_come_from_one_builder() -> None:
    """A pointwise Yes/No reward item on template 0 is, turn for turn, the test-time judge's prompt."""
    r = roles(2)
    verified = make_verified(["cccc"] * 40)
    items = build_reward_items(verified, RewardDataConfig(yes_no_prob=1.0, max_judgment_items=10**6,
                                                          max_reflection_items=10**6),
                               chat_fmt, 1, seed=5, roles=r).to_pylist()
    item = next(it for it in items if it["template_id"] == "pw-yn-01")
    assert item["prompt"].startswith("<system>SYS\n<user>") and item["prompt"].count("<assistant>") == 3
    row = verified.to_pylist()[item["source_sample_idx"][0] + 4 * int(item["source_question_id"][1:])]
    judge_prompt = prompts.self_judgment_prompt(row["question"], row["completion"], row["answer"], "both")
    expected = chat_fmt(r.messages(judge_prompt, r.rng(5, item["source_question_id"], "pointwise")))
    assert item["prompt"] == expected

    engine = ScriptedEngine([("", "\\boxed{Yes}")])
    judge_batch(engine, chat_fmt, [row["question"]], [row["completion"]], [row["answer"]], roles=r, seed=7)
    sent = engine.prompts[0]
    assert sent.startswith("<system>SYS\n<user>") and sent.count("<assistant>") == 3
    assert sent == chat_fmt(r.messages(judge_prompt, r.rng(7, "judge", 0, row["question"])))


def test_self_reflection_uses_separate_budgets_and_demonstrated_prompts() -> None:
    engine = ScriptedEngine([
        ("Earlier attempt", "2 + 3 = 5. The answer is \\boxed{5}."),
        ("Proposed solution", "2 + 3 = 5, but it says 6. \\boxed{No}"),
        ("", "2 + 3 = 6. The answer is \\boxed{6}."),
    ])
    traces = self_reflect_batch(
        engine, chat_fmt, ["What is 2 + 3?"], question_messages=lambda q: [{"role": "user", "content": q}],
        max_rounds=1, max_new_tokens=11, judge_max_new_tokens=22, revision_max_new_tokens=33, roles=roles(2),
    )
    assert [p.max_new_tokens for _, p in engine.calls] == [11, 22, 33]
    assert traces[0].final_answer == "5"
    judge_sent, revise_sent = engine.calls[1][0][0], engine.calls[2][0][0]
    assert judge_sent.count("<assistant>") == 3 and revise_sent.count("<assistant>") == 3
