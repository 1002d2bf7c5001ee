"""Judgment and reflection prompt wordings (the reward data of spark_core/reward_data.py), written for this project.

Three families, each a list of wordings with a stable template id:

* pointwise judgment (``pw-yn-NN`` for the Yes/No label style, ``pw-ab-NN`` for A = correct /
  B = incorrect): is this one response's final answer correct?
* pairwise judgment (``pair-NN``): two responses shown as (A) and (B), exactly one correct; which?
* reflection (``refl-{cot|answer}-{explicit|neutral}-NN``): solve the problem again after seeing an
  earlier attempt. ``cot`` shows the whole earlier reasoning, ``answer`` only its final answer.
  ``explicit`` wordings say outright that the earlier answer is wrong; ``neutral`` ones ask the model
  to check it, confirm it if right and fix it if not. About a third of each mode's wordings are explicit.

Every judgment wording asks for brief reasoning and a verdict in ``\\boxed{}``; every reflection wording
ends by asking for a fresh solution with the final answer in ``\\boxed{}``.

What a judge sees of a response is the *judge context* (``context_mode``):

* ``answer``: only the extracted final answer, as ``Final answer: X``;
* ``cot``: only the completion text. Its own boxed answer stays in it, defused (``boxed{X}``): the
  reasoning cannot be shown without the conclusion it reached;
* ``both``: the completion followed by ``Final answer: X`` (the paper's best setting).

Whatever is shown goes between ``<response>`` lines as quoted data (:mod:`spark_core.quoting`), so a
``\\boxed{Yes}`` or an instruction inside a response cannot pass as the judge's own.

Template ids are part of the data (``reward_items.template_id``): never reorder or edit a wording in
place; append new ones at the end of their family so existing ids keep their meaning.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

from .quoting import quote_response

ContextMode = Literal["answer", "cot", "both"]
PointwiseStyle = Literal["yes_no", "a_b"]
ReflectionMode = Literal["cot", "answer"]
Messages = list[dict[str, str]]

CONTEXT_MODES: tuple[str, ...] = ("answer", "cot", "both")
POINTWISE_STYLES: tuple[str, ...] = ("yes_no", "a_b")
REFLECTION_MODES: tuple[str, ...] = ("cot", "answer")

# Labels the reward-phase verifier compares against the model's final \boxed{} content.
POINTWISE_LABELS: dict[str, tuple[str, str]] = {"yes_no": ("Yes", "No"), "a_b": ("A", "B")}
PAIRWISE_LABELS: tuple[str, str] = ("A", "B")


@dataclass(frozen=True)
class JudgmentPrompt:
    """A pointwise or pairwise judgment prompt.

    ``style`` is ``yes_no`` or ``a_b`` (pointwise) or ``letter`` (pairwise). For pointwise prompts
    ``positive_label``/``negative_label`` are the verdicts for a correct/incorrect response; for
    pairwise prompts they are simply the two letters ``A`` and ``B`` (the label of an item is the
    letter of whichever response is correct).
    """

    messages: Messages
    template_id: str
    style: str
    positive_label: str
    negative_label: str
    # How it was built, so demonstrations can be rendered through the same builder and wording.
    template_index: int = 0
    context_mode: str = "both"


@dataclass(frozen=True)
class ReflectionPrompt:
    """A "solve it again" prompt built on an earlier attempt."""

    messages: Messages
    template_id: str
    mode: str
    explicit: bool
    template_index: int = 0


# ------------------------------------------------------------------------------------- wordings
# Placeholders: {question}, {response} (pointwise), {response_a}/{response_b} (pairwise),
# {previous} (reflection: the earlier completion in cot mode, its final answer in answer mode).
# They are filled in one regex pass, so braces inside the filled-in text are never re-read.

_POINTWISE_YES_NO: tuple[str, ...] = (
    "Below is a math problem and a proposed solution. Decide whether the solution's final answer is "
    "correct.\n\nProblem:\n{question}\n\nProposed solution:\n{response}\n\nThink it through briefly, "
    "then give your verdict as \\boxed{Yes} if the final answer is correct or \\boxed{No} if it is not.",
    "You are grading a student's work.\n\nQuestion:\n{question}\n\nStudent's response:\n{response}\n\n"
    "Is the student's final answer right? Explain your reasoning in a few sentences and finish with "
    "\\boxed{Yes} or \\boxed{No}.",
    "Question:\n{question}\n\nCandidate response:\n{response}\n\nDoes the candidate response reach "
    "the correct final answer to the question? Reason briefly, then answer \\boxed{Yes} or \\boxed{No}.",
    "Act as a careful reviewer. Work out the problem below on your own, compare your result with the "
    "submitted answer, and say whether the submission is correct.\n\nProblem:\n{question}\n\n"
    "Submission:\n{response}\n\nPut your verdict in a box: \\boxed{Yes} (correct) or \\boxed{No} "
    "(incorrect).",
    "Check the following response to a math question.\n\n[Question]\n{question}\n\n[Response]\n"
    "{response}\n\nAfter a short check, state whether its final answer is correct by writing exactly "
    "\\boxed{Yes} or \\boxed{No}.",
    "Here is a problem together with someone's attempt at it.\n\nProblem: {question}\n\nAttempt:\n"
    "{response}\n\nIs the attempt's final answer correct? Give brief reasoning first; your last line "
    "must be \\boxed{Yes} if it is correct and \\boxed{No} otherwise.",
)

_POINTWISE_A_B: tuple[str, ...] = (
    "Below is a math problem and a proposed solution.\n\nProblem:\n{question}\n\nProposed solution:\n"
    "{response}\n\nWhich statement is true?\n(A) The final answer is correct.\n(B) The final answer is "
    "incorrect.\nReason briefly, then write your choice as \\boxed{A} or \\boxed{B}.",
    "Evaluate the response to the question below.\n\nQuestion:\n{question}\n\nResponse:\n{response}\n\n"
    "Options:\n(A) correct final answer\n(B) incorrect final answer\nThink it over in a few sentences "
    "and give the letter of the right option in \\boxed{}.",
    "You are checking a solution for correctness.\n\n[Problem]\n{question}\n\n[Solution]\n{response}\n\n"
    "Answer A if the solution's final answer is correct and B if it is not. Explain briefly, then put "
    "the letter in \\boxed{}, e.g. \\boxed{A}.",
    "Problem:\n{question}\n\nAn answer was submitted:\n{response}\n\nClassify the submission: "
    "(A) right or (B) wrong. Solve the problem yourself briefly to decide, and end with \\boxed{A} or "
    "\\boxed{B}.",
    "Read the question and the candidate response.\n\nQuestion: {question}\n\nCandidate response:\n"
    "{response}\n\nIs the candidate's final answer correct? Choose (A) yes, it is correct, or (B) no, "
    "it is incorrect. Give short reasoning and your choice in the form \\boxed{A} or \\boxed{B}.",
    "Grade this work.\n\nTask:\n{question}\n\nWork submitted:\n{response}\n\nGrade A means the final "
    "answer is correct; grade B means it is not. After a brief justification, output the grade inside "
    "\\boxed{}.",
)

_PAIRWISE: tuple[str, ...] = (
    "Two responses to the same math problem are shown below. Exactly one of them has the correct final "
    "answer.\n\nProblem:\n{question}\n\nResponse (A):\n{response_a}\n\nResponse (B):\n{response_b}\n\n"
    "Reason briefly about which one is correct, then give its letter as \\boxed{A} or \\boxed{B}.",
    "Question:\n{question}\n\n(A)\n{response_a}\n\n(B)\n{response_b}\n\nOne of the two responses above "
    "answers the question correctly and the other does not. Which is the correct one? Explain shortly "
    "and put the letter in \\boxed{}.",
    "You are comparing two solutions to a problem; only one reaches the right answer.\n\n[Problem]\n"
    "{question}\n\n[Solution A]\n{response_a}\n\n[Solution B]\n{response_b}\n\nWork out which solution "
    "is correct and finish with \\boxed{A} or \\boxed{B}.",
    "Here is a problem and two candidate answers, labelled (A) and (B). One is right, one is wrong.\n\n"
    "Problem: {question}\n\nCandidate (A):\n{response_a}\n\nCandidate (B):\n{response_b}\n\nThink it "
    "through in a few sentences, then write the letter of the right candidate inside \\boxed{}.",
    "Judge two attempts at the same question.\n\nQuestion:\n{question}\n\nAttempt (A):\n{response_a}\n\n"
    "Attempt (B):\n{response_b}\n\nExactly one attempt has a correct final answer. After brief "
    "reasoning, answer with \\boxed{A} or \\boxed{B}.",
    "Problem:\n{question}\n\nThe following two responses disagree, and exactly one of them is "
    "correct.\n\nResponse (A):\n{response_a}\n\nResponse (B):\n{response_b}\n\nSolve the problem "
    "briefly yourself to decide, then report the letter of the correct response in \\boxed{}.",
    "Which of these two responses gives the correct final answer?\n\nQuestion: {question}\n\n(A) "
    "{response_a}\n\n(B) {response_b}\n\nOnly one is correct. Give a short justification and your "
    "choice as \\boxed{A} or \\boxed{B}.",
    "Act as a grader. Two students answered the question below; one is right and one is wrong.\n\n"
    "Question:\n{question}\n\nStudent (A):\n{response_a}\n\nStudent (B):\n{response_b}\n\nDecide which "
    "student is right. Keep the reasoning short and end with the letter in \\boxed{}, e.g. \\boxed{B}.",
)

_REFLECTION_COT_EXPLICIT: tuple[str, ...] = (
    "Problem:\n{question}\n\nAn earlier attempt at this problem is shown below. Its final answer is "
    "wrong.\n\nEarlier attempt:\n{previous}\n\nFind where it goes wrong and solve the problem again "
    "from the start. Reason step by step and put your final answer within \\boxed{}.",
    "The following solution to the problem contains an error and reaches an incorrect answer.\n\n"
    "Problem:\n{question}\n\nFlawed solution:\n{previous}\n\nWrite a new, correct solution. Reason "
    "step by step, and put your final answer within \\boxed{}.",
    "Question:\n{question}\n\nA previous response to this question, reproduced below, is incorrect.\n\n"
    "Previous response:\n{previous}\n\nDo not trust its conclusion. Solve the question again carefully, "
    "step by step, and give the final answer within \\boxed{}.",
)

_REFLECTION_COT_NEUTRAL: tuple[str, ...] = (
    "Problem:\n{question}\n\nHere is an earlier attempt at this problem:\n{previous}\n\nCheck the "
    "attempt carefully. If its answer holds up, confirm it; if you find a mistake, fix it. Then give a "
    "complete solution, reasoning step by step, with the final answer within \\boxed{}.",
    "Below is a problem and a worked solution that may or may not be right.\n\nProblem:\n{question}\n\n"
    "Worked solution:\n{previous}\n\nReview each step. Keep what is sound and repair anything that is "
    "not. Finish with your own full solution and put the final answer within \\boxed{}.",
    "Question:\n{question}\n\nSomeone answered it like this:\n{previous}\n\nVerify this reasoning. If "
    "it is right, say so and restate the answer; if not, correct it. Either way, solve the question "
    "step by step and put your final answer within \\boxed{}.",
    "Review the following reasoning for the problem.\n\n[Problem]\n{question}\n\n[Reasoning]\n"
    "{previous}\n\nDecide whether the reasoning and its answer are sound, correcting them where needed. "
    "Then write a fresh solution, step by step, ending with the final answer within \\boxed{}.",
    "Problem: {question}\n\nDraft solution:\n{previous}\n\nRe-examine the draft. If it is correct, "
    "confirm its answer; otherwise find the mistake and fix it. Present a complete step-by-step "
    "solution and put the final answer within \\boxed{}.",
    "A solution to the question below is given for you to double-check.\n\nQuestion:\n{question}\n\n"
    "Given solution:\n{previous}\n\nRecheck the work independently. Confirm the answer if it is right "
    "or correct it if it is not, then solve the question again step by step with the final answer "
    "within \\boxed{}.",
)

_REFLECTION_ANSWER_EXPLICIT: tuple[str, ...] = (
    "Problem:\n{question}\n\nA previous attempt gave the final answer {previous}, which is wrong.\n\n"
    "Solve the problem again from the start. Reason step by step and put your final answer within "
    "\\boxed{}.",
    "Question:\n{question}\n\nThe answer {previous} has been proposed for this question, but it is "
    "incorrect. Work out the correct answer, reasoning step by step, and put your final answer within "
    "\\boxed{}.",
    "Problem:\n{question}\n\nNote: {previous} is not the correct answer to this problem. Find the "
    "right one. Reason step by step, and put your final answer within \\boxed{}.",
)

_REFLECTION_ANSWER_NEUTRAL: tuple[str, ...] = (
    "Problem:\n{question}\n\nAn earlier attempt gave the final answer {previous}. Check it: if it is "
    "right, confirm it; if not, find the correct answer. Solve the problem step by step and put your "
    "final answer within \\boxed{}.",
    "Question:\n{question}\n\nProposed answer: {previous}\n\nVerify the proposed answer by working the "
    "question out yourself, step by step. Keep it if it holds and replace it if it does not. Put your "
    "final answer within \\boxed{}.",
    "Someone claims the answer to the problem below is {previous}.\n\nProblem:\n{question}\n\nDecide "
    "whether the claim holds by solving the problem yourself, step by step, and put your final answer "
    "within \\boxed{}.",
    "Problem:\n{question}\n\nA candidate answer is {previous}. Double-check it with a full solution of "
    "your own. Confirm the candidate if your work agrees, otherwise give the answer you find. Reason "
    "step by step and put your final answer within \\boxed{}.",
    "Question:\n{question}\n\nA first pass at this question ended with {previous}. Take a second, "
    "careful pass: redo the work step by step, keep that answer if it survives and correct it if it "
    "does not, and put your final answer within \\boxed{}.",
    "Problem:\n{question}\n\nSomeone answered {previous}. Re-solve the problem independently, step by "
    "step, confirming or correcting that answer, and put your final answer within \\boxed{}.",
)


def _family(prefix: str, texts: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Number a family's wordings: ids are 1-based and zero-padded (``pair-01``)."""
    return tuple((f"{prefix}-{i + 1:02d}", text) for i, text in enumerate(texts))


POINTWISE_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "yes_no": _family("pw-yn", _POINTWISE_YES_NO),
    "a_b": _family("pw-ab", _POINTWISE_A_B),
}
PAIRWISE_TEMPLATES: tuple[tuple[str, str], ...] = _family("pair", _PAIRWISE)
REFLECTION_TEMPLATES: dict[tuple[str, bool], tuple[tuple[str, str], ...]] = {
    ("cot", True): _family("refl-cot-explicit", _REFLECTION_COT_EXPLICIT),
    ("cot", False): _family("refl-cot-neutral", _REFLECTION_COT_NEUTRAL),
    ("answer", True): _family("refl-answer-explicit", _REFLECTION_ANSWER_EXPLICIT),
    ("answer", False): _family("refl-answer-neutral", _REFLECTION_ANSWER_NEUTRAL),
}

# Template counts, for callers that pick an index themselves.
POINTWISE_TEMPLATE_COUNTS: dict[str, int] = {k: len(v) for k, v in POINTWISE_TEMPLATES.items()}
PAIRWISE_TEMPLATE_COUNT: int = len(PAIRWISE_TEMPLATES)
REFLECTION_TEMPLATE_COUNTS: dict[tuple[str, bool], int] = {
    k: len(v) for k, v in REFLECTION_TEMPLATES.items()
}


def all_template_ids() -> list[str]:
    """Every template id of every family, in family order (ids are unique)."""
    ids = [tid for fam in POINTWISE_TEMPLATES.values() for tid, _ in fam]
    ids += [tid for tid, _ in PAIRWISE_TEMPLATES]
    ids += [tid for fam in REFLECTION_TEMPLATES.values() for tid, _ in fam]
    return ids


# --------------------------------------------------------------------------------------- pickers


def pick_pointwise_template(rng: random.Random, style: str) -> int:
    """A uniformly random pointwise template index for ``style``."""
    _check_choice("style", style, POINTWISE_STYLES)
    return rng.randrange(POINTWISE_TEMPLATE_COUNTS[style])


def pick_pairwise_template(rng: random.Random) -> int:
    """A uniformly random pairwise template index."""
    return rng.randrange(PAIRWISE_TEMPLATE_COUNT)


def pick_reflection_template(rng: random.Random, mode: str, explicit: bool) -> int:
    """A uniformly random reflection template index among the wordings of (mode, explicit)."""
    _check_choice("mode", mode, REFLECTION_MODES)
    return rng.randrange(REFLECTION_TEMPLATE_COUNTS[(mode, bool(explicit))])


# -------------------------------------------------------------------------------------- builders

_PLACEHOLDER = re.compile(r"\{(question|response|response_a|response_b|previous)\}")


def _fill(template: str, **fields: str) -> str:
    # One pass: text substituted in is not scanned again, so a question that happens to contain
    # "{response}" or LaTeX braces stays as written.
    def sub(match: re.Match[str]) -> str:
        return fields[match.group(1)]

    return _PLACEHOLDER.sub(sub, template)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _pick(family: tuple[tuple[str, str], ...], index: int, what: str) -> tuple[str, str]:
    if not 0 <= index < len(family):
        raise IndexError(f"{what} template_index {index} out of range (0..{len(family) - 1})")
    return family[index]


def _need_answer(answer: str | None, context_mode: str) -> str:
    if answer is None or not str(answer).strip():
        raise ValueError(f"context_mode {context_mode!r} shows the final answer, but the answer is empty")
    return str(answer).strip()


def render_response(response: str, answer: str | None, context_mode: str) -> str:
    """What the judge sees of one response under ``context_mode`` (see the module docstring)."""
    _check_choice("context_mode", context_mode, CONTEXT_MODES)
    if context_mode == "cot":
        shown = response.strip()
    else:
        final = f"Final answer: {_need_answer(answer, context_mode)}"
        shown = final if context_mode == "answer" else f"{response.strip()}\n\n{final}"
    return quote_response(shown)  # quoted data: the text judged cannot pass as the judge's own verdict


def pointwise_judgment(
    question: str,
    response: str,
    answer: str | None,
    context_mode: str = "both",
    style: str = "yes_no",
    template_index: int = 0,
) -> JudgmentPrompt:
    """Ask whether one response's final answer is correct (Yes/No or A = correct / B = incorrect)."""
    _check_choice("style", style, POINTWISE_STYLES)
    template_id, text = _pick(POINTWISE_TEMPLATES[style], template_index, f"pointwise {style}")
    content = _fill(
        text, question=question.strip(), response=render_response(response, answer, context_mode)
    )
    positive, negative = POINTWISE_LABELS[style]
    return JudgmentPrompt(
        messages=[{"role": "user", "content": content}],
        template_id=template_id,
        style=style,
        positive_label=positive,
        negative_label=negative,
        template_index=template_index,
        context_mode=context_mode,
    )


def pairwise_judgment(
    question: str,
    response_a: str,
    answer_a: str | None,
    response_b: str,
    answer_b: str | None,
    context_mode: str = "both",
    template_index: int = 0,
) -> JudgmentPrompt:
    """Ask which of two responses, shown as (A) and (B), has the correct final answer."""
    template_id, text = _pick(PAIRWISE_TEMPLATES, template_index, "pairwise")
    content = _fill(
        text,
        question=question.strip(),
        response_a=render_response(response_a, answer_a, context_mode),
        response_b=render_response(response_b, answer_b, context_mode),
    )
    first, second = PAIRWISE_LABELS
    return JudgmentPrompt(
        messages=[{"role": "user", "content": content}],
        template_id=template_id,
        style="letter",
        positive_label=first,
        negative_label=second,
        template_index=template_index,
        context_mode=context_mode,
    )


def reflection_request(
    question: str,
    response: str,
    answer: str | None,
    mode: str = "answer",
    explicit: bool = True,
    template_index: int = 0,
) -> ReflectionPrompt:
    """Ask for a fresh solution after an earlier attempt.

    ``mode="cot"`` shows the earlier completion as generated (its boxed answer included);
    ``mode="answer"`` shows only its extracted final answer, which must then be non-empty.
    """
    _check_choice("mode", mode, REFLECTION_MODES)
    family = REFLECTION_TEMPLATES[(mode, bool(explicit))]
    template_id, text = _pick(family, template_index, f"reflection {mode}")
    previous = response.strip() if mode == "cot" else _need_answer(answer, "answer")
    content = _fill(text, question=question.strip(), previous=previous)
    return ReflectionPrompt(
        messages=[{"role": "user", "content": content}],
        template_id=template_id,
        mode=mode,
        explicit=bool(explicit),
        template_index=template_index,
    )


# ---------------------------------------------------------------------------------- test time
# The test-time judge and reviser use training wordings (the same builders, so the same text a reward
# item of that kind would get): the first Yes/No pointwise wording, and the first explicit reflection
# wording that shows the earlier completion.
TEST_TIME_JUDGE_TEMPLATE: tuple[str, int] = ("yes_no", 0)
TEST_TIME_REVISION_TEMPLATE: tuple[str, bool, int] = ("cot", True, 0)
TEST_TIME_PAIRWISE_TEMPLATE: int = 0


def self_judgment_prompt(question: str, completion: str, answer: str | None, context_mode: str = "both") -> JudgmentPrompt:
    """The self-judgment prompt of test-time reflection (a training pointwise Yes/No wording)."""
    style, index = TEST_TIME_JUDGE_TEMPLATE
    return pointwise_judgment(question, completion, answer, context_mode=context_mode, style=style, template_index=index)


def revision_prompt(question: str, completion: str, answer: str | None) -> ReflectionPrompt:
    """The revision prompt of test-time reflection (a training explicit CoT reflection wording)."""
    mode, explicit, index = TEST_TIME_REVISION_TEMPLATE
    return reflection_request(question, completion, answer, mode=mode, explicit=explicit, template_index=index)


def eval_pairwise_prompt(
    question: str, response_a: str, answer_a: str | None, response_b: str, answer_b: str | None, context_mode: str
) -> JudgmentPrompt:
    """The pairwise judge prompt of evaluation (a training pairwise wording)."""
    return pairwise_judgment(
        question, response_a, answer_a, response_b, answer_b, context_mode=context_mode,
        template_index=TEST_TIME_PAIRWISE_TEMPLATE,
    )
