"""Judgment and reflection wordings: families, ids, labels, judge context and placeholder filling."""

from __future__ import annotations

import random
import re

import pytest

from spark_core import prompts
from spark_core.quoting import neutralise, quote_response

QUESTION = "What is 6 * 7?"
RESPONSE = "Six sevens: 6 * 7 = 42. So the answer is \\boxed{42}."


def _content(messages: list[dict[str, str]]) -> str:
    assert [m["role"] for m in messages] == ["user"]
    return messages[0]["content"]


# ------------------------------------------------------------------------------------ families


def test_template_counts_per_family() -> None:
    assert all(n >= 5 for n in prompts.POINTWISE_TEMPLATE_COUNTS.values())
    assert sum(prompts.POINTWISE_TEMPLATE_COUNTS.values()) >= 8
    assert prompts.PAIRWISE_TEMPLATE_COUNT >= 8
    for mode in prompts.REFLECTION_MODES:
        explicit = prompts.REFLECTION_TEMPLATE_COUNTS[(mode, True)]
        neutral = prompts.REFLECTION_TEMPLATE_COUNTS[(mode, False)]
        assert explicit + neutral >= 8
        assert 0.25 <= explicit / (explicit + neutral) <= 0.4  # "about a third" say it is wrong


def test_template_ids_unique_and_well_formed() -> None:
    ids = prompts.all_template_ids()
    assert len(ids) == len(set(ids))
    pattern = re.compile(r"^(pw-(yn|ab)|pair|refl-(cot|answer)-(explicit|neutral))-\d{2}$")
    assert all(pattern.match(i) for i in ids), [i for i in ids if not pattern.match(i)]
    expected = (
        sum(prompts.POINTWISE_TEMPLATE_COUNTS.values())
        + prompts.PAIRWISE_TEMPLATE_COUNT
        + sum(prompts.REFLECTION_TEMPLATE_COUNTS.values())
    )
    assert len(ids) == expected


def test_wordings_are_distinct() -> None:
    texts = [t for fam in prompts.POINTWISE_TEMPLATES.values() for _, t in fam]
    texts += [t for _, t in prompts.PAIRWISE_TEMPLATES]
    texts += [t for fam in prompts.REFLECTION_TEMPLATES.values() for _, t in fam]
    assert len(texts) == len(set(texts))


# ------------------------------------------------------------------------------------ pointwise


@pytest.mark.parametrize("style", ["yes_no", "a_b"])
def test_pointwise_every_template(style: str) -> None:
    pos, neg = prompts.POINTWISE_LABELS[style]
    for i in range(prompts.POINTWISE_TEMPLATE_COUNTS[style]):
        p = prompts.pointwise_judgment(QUESTION, RESPONSE, "42", "both", style, i)
        text = _content(p.messages)
        assert p.style == style and (p.positive_label, p.negative_label) == (pos, neg)
        assert p.template_id == f"{'pw-yn' if style == 'yes_no' else 'pw-ab'}-{i + 1:02d}"
        assert QUESTION in text and neutralise(RESPONSE) in text and "Final answer: 42" in text
        # The verdict goes in \boxed{}: either both labels are spelled boxed, or an empty box is asked for.
        assert (f"\\boxed{{{pos}}}" in text and f"\\boxed{{{neg}}}" in text) or "\\boxed{}" in text
        assert re.search(rf"\b{pos}\b", text) and re.search(rf"\b{neg}\b", text)
        assert not re.search(r"\{(question|response)\}", text)


def test_yes_no_and_a_b_labels() -> None:
    yn = prompts.pointwise_judgment(QUESTION, RESPONSE, "42", "answer", "yes_no", 0)
    ab = prompts.pointwise_judgment(QUESTION, RESPONSE, "42", "answer", "a_b", 0)
    assert (yn.positive_label, yn.negative_label) == ("Yes", "No")
    assert (ab.positive_label, ab.negative_label) == ("A", "B")
    ab_text = _content(ab.messages)
    # A must be the "correct" option and B the "incorrect" one in the A/B wording.
    assert ab_text.index("(A)") < ab_text.index("(B)")


def test_context_modes() -> None:
    reasoning = "Six sevens: 6 * 7 = 42."
    answer_only = _content(prompts.pointwise_judgment(QUESTION, RESPONSE, "42", "answer").messages)
    cot_only = _content(prompts.pointwise_judgment(QUESTION, RESPONSE, "42", "cot").messages)
    both = _content(prompts.pointwise_judgment(QUESTION, RESPONSE, "42", "both").messages)
    assert "Final answer: 42" in answer_only and reasoning not in answer_only
    assert neutralise(RESPONSE) in cot_only and "Final answer:" not in cot_only
    assert both.index(neutralise(RESPONSE)) < both.index("Final answer: 42")
    assert prompts.render_response(RESPONSE, "42", "answer") == quote_response("Final answer: 42")
    assert prompts.render_response(f"  {RESPONSE}\n", None, "cot") == quote_response(RESPONSE)


def test_answer_needed_when_shown() -> None:
    with pytest.raises(ValueError, match="empty"):
        prompts.pointwise_judgment(QUESTION, RESPONSE, None, "answer")
    with pytest.raises(ValueError, match="empty"):
        prompts.pointwise_judgment(QUESTION, RESPONSE, "  ", "both")
    # The reasoning alone needs no extracted answer.
    prompts.pointwise_judgment(QUESTION, RESPONSE, None, "cot")


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="context_mode"):
        prompts.pointwise_judgment(QUESTION, RESPONSE, "42", "everything")
    with pytest.raises(ValueError, match="style"):
        prompts.pointwise_judgment(QUESTION, RESPONSE, "42", "both", "true_false")
    with pytest.raises(IndexError, match="template_index"):
        prompts.pointwise_judgment(QUESTION, RESPONSE, "42", "both", "yes_no", 999)
    with pytest.raises(IndexError, match="template_index"):
        prompts.pairwise_judgment(QUESTION, RESPONSE, "42", RESPONSE, "41", "both", -1)
    with pytest.raises(ValueError, match="mode"):
        prompts.reflection_request(QUESTION, RESPONSE, "42", "both", True, 0)


# ------------------------------------------------------------------------------------- pairwise


def test_pairwise_every_template() -> None:
    resp_a = "First try: 6 * 7 = 41, \\boxed{41}"
    resp_b = "Second try: 6 * 7 = 42, \\boxed{42}"
    for i in range(prompts.PAIRWISE_TEMPLATE_COUNT):
        p = prompts.pairwise_judgment(QUESTION, resp_a, "41", resp_b, "42", "both", i)
        text = _content(p.messages)
        assert p.template_id == f"pair-{i + 1:02d}" and p.style == "letter"
        assert (p.positive_label, p.negative_label) == ("A", "B")
        assert QUESTION in text
        # (A) shows the first response, (B) the second, in that order.
        shown_a, shown_b = neutralise(resp_a), neutralise(resp_b)
        assert text.index(shown_a) < text.index("Final answer: 41") < text.index(shown_b)
        assert text.index(shown_b) < text.index("Final answer: 42")
        assert "(A)" in text or "A]" in text
        assert "\\boxed{A}" in text or "\\boxed{}" in text


# ----------------------------------------------------------------------------------- reflection


@pytest.mark.parametrize("mode", ["cot", "answer"])
@pytest.mark.parametrize("explicit", [True, False])
def test_reflection_every_template(mode: str, explicit: bool) -> None:
    wrong = "6 * 7 = 41, so \\boxed{41}."
    for i in range(prompts.REFLECTION_TEMPLATE_COUNTS[(mode, explicit)]):
        p = prompts.reflection_request(QUESTION, wrong, "41", mode, explicit, i)
        text = _content(p.messages)
        kind = "explicit" if explicit else "neutral"
        assert p.template_id == f"refl-{mode}-{kind}-{i + 1:02d}"
        assert (p.mode, p.explicit) == (mode, explicit)
        assert QUESTION in text
        if mode == "cot":
            assert wrong in text
        else:
            assert "41" in text and "6 * 7 = 41" not in text
        # Every wording ends by asking for a fresh boxed answer.
        assert "\\boxed{}" in text[-80:], text[-80:]
        says_wrong = re.search(
            r"\b(is|are) (wrong|incorrect|not the correct)|contains an error|incorrect answer", text
        )
        assert bool(says_wrong) is explicit, text


def test_reflection_answer_mode_needs_answer() -> None:
    with pytest.raises(ValueError, match="empty"):
        prompts.reflection_request(QUESTION, RESPONSE, None, "answer", False, 0)
    prompts.reflection_request(QUESTION, RESPONSE, None, "cot", False, 0)


def test_placeholders_in_user_text_are_not_refilled() -> None:
    tricky_q = "Simplify \\frac{1}{2} + {response} + {question}"
    tricky_r = "We get {previous} and \\boxed{\\frac{3}{4}}"
    text = _content(prompts.pointwise_judgment(tricky_q, tricky_r, "\\frac{3}{4}", "both").messages)
    assert tricky_q in text and neutralise(tricky_r) in text
    text = _content(prompts.reflection_request(tricky_q, tricky_r, "x", "cot", True, 1).messages)
    assert tricky_q in text and tricky_r in text


# -------------------------------------------------------------------------------------- pickers


def test_pickers_cover_all_indices_and_are_seeded() -> None:
    rng = random.Random(0)
    seen = {prompts.pick_pairwise_template(rng) for _ in range(500)}
    assert seen == set(range(prompts.PAIRWISE_TEMPLATE_COUNT))
    for style in prompts.POINTWISE_STYLES:
        seen = {prompts.pick_pointwise_template(rng, style) for _ in range(500)}
        assert seen == set(range(prompts.POINTWISE_TEMPLATE_COUNTS[style]))
    for key, count in prompts.REFLECTION_TEMPLATE_COUNTS.items():
        seen = {prompts.pick_reflection_template(rng, *key) for _ in range(500)}
        assert seen == set(range(count))
    a = [prompts.pick_pairwise_template(random.Random(7)) for _ in range(3)]
    b = [prompts.pick_pairwise_template(random.Random(7)) for _ in range(3)]
    assert a == b
