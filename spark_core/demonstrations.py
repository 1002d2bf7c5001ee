"""Role prompts: the chat every judgment and reflection prompt is sent in, demonstrations included.

A weak model sees the solver's answer format demonstrated (``data.few_shot``) but, with a bare user
turn, never the judge's. :class:`RolePrompts` puts every judgment and reflection prompt in the same
chat as the policy's (``data.system_prompt`` first) and, with ``reward_data.demonstrations = N > 0``,
precedes it by N worked demonstrations of the SAME kind, rendered by the same builder of
:mod:`spark_core.prompts` with the same wording and judge context as the real prompt: a user turn and
the assistant's reply, a one-line check followed by the boxed verdict or answer, e.g.
``47 + 25 = 72, but the response says 74. \\boxed{No}``.

One function (:meth:`RolePrompts.messages`) builds the chat for reward items (training) and for the
test-time judge, revision and pairwise prompts (:mod:`spark_core.reflection`,
:mod:`spark_core.evaluation`), so the two are identical by construction.

Demonstrations are built from arithmetic questions the project generates itself
(:func:`demonstration_questions`): a dedicated seeded stream (``spark-demo-*``) over the run's
arithmetic levels, rejecting every question text of the run's training data and evaluation
benchmarks (:func:`run_question_texts`), so no demonstration answers a question the model is trained
or tested on. Labels are balanced in every prompt: half the pointwise demonstrations show a correct
response (Yes / A) and half a wrong one (No / B), half the pairwise ones have the correct response at
(A) and half at (B), half of the neutral reflection ones show a right earlier answer; their order is
shuffled per prompt with that prompt's own seeded rng, so copying the last demonstration's verdict
pays nothing on average.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Iterable, Sequence

from . import prompts
from .config import ArithmeticLevel

if TYPE_CHECKING:  # pragma: no cover
    from .config import SparkConfig

Messages = list[dict[str, str]]

# Demonstration questions drawn per run (each prompt samples its demonstrations from them).
POOL_SIZE = 64
# Offsets that turn a right answer into a plausible wrong one.
_MISTAKES = (-10, -2, -1, 1, 2, 10)
# Used when the run's data is not the arithmetic task (or its levels are exhausted).
_FALLBACK_LEVELS = (ArithmeticLevel(digits=2, operands=2, ops=["+"]),)


@dataclass(frozen=True)
class DemoQuestion:
    """A project-made arithmetic question: ``What is {expression}?`` with integer ``value``."""

    question: str
    expression: str
    value: int

    def wrong_value(self, rng: random.Random) -> int:
        return self.value + rng.choice(_MISTAKES)


def solver_reply(expression: str, shown: int) -> str:
    """A response in the solver's format whose final answer is ``shown``."""
    return f"{expression} = {shown}. The answer is \\boxed{{{shown}}}."


# ------------------------------------------------------------------------------------- questions


def _operand_range(digits: int) -> tuple[int, int]:
    return (0, 9) if digits == 1 else (10 ** (digits - 1), 10**digits - 1)


def _draw(level: ArithmeticLevel, rng: random.Random) -> DemoQuestion:
    lo, hi = _operand_range(level.digits)
    nums = [rng.randint(lo, hi) for _ in range(level.operands)]
    ops = [rng.choice(level.ops) for _ in range(level.operands - 1)]
    expr = str(nums[0]) + "".join(f" {op} {n}" for op, n in zip(ops, nums[1:]))
    value = eval(expr, {"__builtins__": {}})  # noqa: S307 - integers and + - * only
    return DemoQuestion(f"What is {expr}?", expr, int(value))


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def demonstration_questions(
    levels: Sequence[ArithmeticLevel], exclude: Iterable[str], seed: int, size: int = POOL_SIZE
) -> list[DemoQuestion]:
    """``size`` distinct questions from ``levels`` (dedicated stream), none of whose text is in ``exclude``.

    Levels a run has exhausted (one-digit additions: 100 questions, all used by training) are
    skipped; if the levels cannot supply ``size`` questions, harder ones (one more digit) are used.
    """
    banned = {_normalise(t) for t in exclude}
    rng = random.Random(f"spark-demo-{seed}")
    chosen: dict[str, DemoQuestion] = {}
    pools = [list(levels) or list(_FALLBACK_LEVELS)]
    while len(chosen) < size:
        current = pools[-1]
        for _ in range(200 * size):
            q = _draw(rng.choice(current), rng)
            key = _normalise(q.question)
            if key not in banned and key not in chosen:
                chosen[key] = q
                if len(chosen) == size:
                    break
        else:
            if all(lv.digits >= 12 for lv in current):
                raise ValueError(f"cannot find {size} demonstration questions outside the run's questions")
            pools.append([lv.model_copy(update={"digits": min(12, lv.digits + 1)}) for lv in current])
    out = list(chosen.values())
    assert not {_normalise(q.question) for q in out} & banned
    return out


def run_question_texts(cfg: "SparkConfig") -> set[str]:
    """Every question text the run trains or is evaluated on (what demonstrations must avoid)."""
    from .benchmarks import load_benchmark
    from .data import load_training_questions

    texts = {q.question for q in load_training_questions(cfg.data)}
    for bcfg in cfg.eval.benchmarks:
        if bcfg.source != "preference":
            texts |= {q.question for q in load_benchmark(bcfg, cfg)}
    return texts


# ---------------------------------------------------------------------------------------- prompts


class RolePrompts:
    """Builds the full chat of a judgment or reflection prompt (see the module docstring).

    ``count`` demonstrations per prompt (even; 0 = none) drawn from ``pool``; ``system_prompt`` as the
    policy's. With neither, :meth:`messages` returns the prompt's bare user turn.
    """

    def __init__(self, system_prompt: str | None = None, pool: Sequence[DemoQuestion] = (), count: int = 0):
        if count % 2:
            raise ValueError(f"demonstrations must be even (half of each label), got {count}")
        if count and len(pool) < count:
            raise ValueError(f"{count} demonstrations need at least {count} demonstration questions, got {len(pool)}")
        self.system_prompt = system_prompt
        self.pool = list(pool)
        self.count = count

    # -- the one builder
    def messages(self, prompt: prompts.JudgmentPrompt | prompts.ReflectionPrompt, rng: random.Random) -> Messages:
        """System prompt, ``count`` demonstrations of the prompt's kind, then the prompt's own turn."""
        out: Messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        if self.count:
            out += self.demonstrations(prompt, rng)
        return out + list(prompt.messages)

    def demonstrations(self, prompt: prompts.JudgmentPrompt | prompts.ReflectionPrompt, rng: random.Random) -> Messages:
        """The user/assistant turns demonstrating ``prompt``'s kind (balanced labels, shuffled order)."""
        questions = rng.sample(self.pool, self.count)
        flags = [True] * (self.count // 2) + [False] * (self.count // 2)
        rng.shuffle(flags)
        turns: Messages = []
        for q, flag in zip(questions, flags):
            if isinstance(prompt, prompts.ReflectionPrompt):
                user, reply = _reflection_demo(prompt, q, flag, rng)
            elif prompt.style == "letter":
                user, reply = _pairwise_demo(prompt, q, flag, rng)
            else:
                user, reply = _pointwise_demo(prompt, q, flag, rng)
            turns += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return turns

    def rng(self, *key: object) -> random.Random:
        """A prompt's own seeded rng (e.g. ``rng(seed, question_id, kind)``)."""
        return random.Random(json.dumps([str(k) for k in key]))


def _pointwise_demo(p: prompts.JudgmentPrompt, q: DemoQuestion, correct: bool, rng: random.Random) -> tuple[str, str]:
    shown = q.value if correct else q.wrong_value(rng)
    demo = prompts.pointwise_judgment(
        q.question, solver_reply(q.expression, shown), str(shown), p.context_mode, p.style, p.template_index
    )
    verdict = demo.positive_label if correct else demo.negative_label
    check = f"{q.expression} = {q.value}, and the response says {shown}." if correct else (
        f"{q.expression} = {q.value}, but the response says {shown}."
    )
    return demo.messages[-1]["content"], f"{check} \\boxed{{{verdict}}}"


def _pairwise_demo(p: prompts.JudgmentPrompt, q: DemoQuestion, right_first: bool, rng: random.Random) -> tuple[str, str]:
    wrong = q.wrong_value(rng)
    a, b = (q.value, wrong) if right_first else (wrong, q.value)
    demo = prompts.pairwise_judgment(
        q.question, solver_reply(q.expression, a), str(a), solver_reply(q.expression, b), str(b),
        p.context_mode, p.template_index,
    )
    letter = demo.positive_label if right_first else demo.negative_label
    return demo.messages[-1]["content"], f"{q.expression} = {q.value}; (A) says {a}, (B) says {b}. \\boxed{{{letter}}}"


def _reflection_demo(p: prompts.ReflectionPrompt, q: DemoQuestion, flag: bool, rng: random.Random) -> tuple[str, str]:
    # An explicit wording says the earlier answer is wrong, so it always shows a wrong one; a neutral
    # wording shows a right earlier answer in half the demonstrations (confirm it) and a wrong one in
    # the other half (fix it).
    right = flag and not p.explicit
    shown = q.value if right else q.wrong_value(rng)
    demo = prompts.reflection_request(
        q.question, solver_reply(q.expression, shown), str(shown), p.mode, p.explicit, p.template_index
    )
    check = f"{q.expression} = {q.value}, so {shown} is right." if right else f"{q.expression} = {q.value}, not {shown}."
    return demo.messages[-1]["content"], f"{check} The answer is \\boxed{{{q.value}}}."


# ------------------------------------------------------------------------------------------ per run


def _levels(cfg: "SparkConfig") -> list[ArithmeticLevel]:
    return list(cfg.data.arithmetic.levels) if cfg.data.source == "arithmetic" else list(_FALLBACK_LEVELS)


@lru_cache(maxsize=8)
def _pool_for(key: str) -> tuple[DemoQuestion, ...]:
    from .config import SparkConfig

    cfg = SparkConfig.model_validate(json.loads(key))
    return tuple(demonstration_questions(_levels(cfg), run_question_texts(cfg), cfg.seed))


def role_prompts(cfg: "SparkConfig") -> RolePrompts:
    """The run's :class:`RolePrompts`: the policy's system prompt and ``reward_data.demonstrations``."""
    count = cfg.reward_data.demonstrations
    if not count:
        return RolePrompts(cfg.data.system_prompt)
    key = json.dumps(
        {"seed": cfg.seed, "data": cfg.data.model_dump(mode="json"), "eval": cfg.eval.model_dump(mode="json")},
        sort_keys=True,
    )
    return RolePrompts(cfg.data.system_prompt, _pool_for(key), count)


def build_messages(
    roles: RolePrompts | None, prompt: prompts.JudgmentPrompt | prompts.ReflectionPrompt, *key: object
) -> Messages:
    """``roles.messages(prompt, roles.rng(*key))``, or the bare prompt without roles."""
    if roles is None:
        return list(prompt.messages)
    return roles.messages(prompt, roles.rng(*key))
