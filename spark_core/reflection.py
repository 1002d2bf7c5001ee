"""Test-time self-reflection: answer, judge the answer with the same model, revise.

The model answers, judges its own answer, and revises it when it judges it wrong:

1. answer the question greedily: completion c0, boxed answer a0;
2. ask for a pointwise Yes/No judgment of a_t (the judge sees the final answer, the reasoning or both:
   ``judge_context``), using the first Yes/No wording of :mod:`spark_core.prompts`, in the chat the
   reward phase trains the judge in (:class:`spark_core.demonstrations.RolePrompts`);
3. ``Yes`` stops with a_t; otherwise a "this answer is wrong, solve it again" prompt (the earlier
   completion shown, explicit wording) gives a_{t+1};
4. at most ``max_rounds`` judgments and ``max_rounds`` revisions; the last revision is taken without
   another judgment. ``max_rounds=0`` returns a0 alone.

Choices the paper leaves open, made here:

* A verdict that cannot be parsed (no ``\\boxed{}`` or something other than Yes/No in it) is treated as
  ``No``: the model did not vouch for its answer, so it is asked to revise. The round records
  ``verdict=None`` so evaluation can count unparsed verdicts separately.
* A completion without an extractable final answer is not shown to the judge (there is no answer to
  judge, and the judge contexts ``answer``/``both`` need one); it goes straight to revision. That round
  records ``judgment_completion=None`` and ``verdict=None`` and does not count as a judgment.
* The final answer is the answer of the last completion, even when a revision has no boxed answer:
  the procedure takes a_{t+1} as is, it does not fall back to earlier answers.

All generation is greedy and batched: each round sends one generate call for the judgments and one for
the revisions of the questions still active.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Sequence, TypedDict

from . import prompts
from .demonstrations import RolePrompts, build_messages
from .engines.base import Engine, SamplingParams
from .verify import extract_boxed, verify_choice
from .vision import with_images

Messages = list[dict[str, str]]
StopReason = Literal["judged_correct", "max_rounds", "no_rounds"]


class ReflectionRound(TypedDict):
    """One attempt and (unless it was the last revision or had no answer) the model's verdict on it."""

    round: int  # 0 = the first answer; t >= 1 = the t-th revision
    completion: str
    answer: str | None  # last \boxed{} content of the completion
    judgment_completion: str | None  # the judge's full reply, None when not judged
    verdict: str | None  # "Yes" / "No", None when not judged or unparsed


@dataclass
class ReflectionTrace:
    """Everything self-reflection did for one question."""

    question: str
    gold: str | None = None
    rounds: list[ReflectionRound] = field(default_factory=list)
    final_answer: str | None = None
    n_judgments: int = 0
    n_revisions: int = 0
    stopped_because: StopReason = "no_rounds"

    @property
    def first_answer(self) -> str | None:
        """a0, the answer before any reflection."""
        return self.rounds[0]["answer"] if self.rounds else None

    @property
    def final_completion(self) -> str:
        return self.rounds[-1]["completion"] if self.rounds else ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_verdict(text: str | None, labels: Sequence[str]) -> str | None:
    """The label among ``labels`` (Yes/No/A/B) that the last ``\\boxed{}`` of ``text`` names, else None.

    Read exactly as the reward phase reads judgments (:func:`spark_core.verify.verify_choice`): case,
    ``\\text{}``-style wrappers, parentheses and a trailing period are ignored, so
    ``\\boxed{\\text{yes}.}`` reads as ``Yes``.
    """
    if not text:
        return None
    for label in labels:
        if verify_choice(text, label).reward >= 1.0:
            return label
    return None


def _greedy(max_new_tokens: int, seed: int) -> SamplingParams:
    return SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)


def _generate_one(engine: Engine, prompts_: list[str], params: SamplingParams,
                  images: Sequence[Sequence[bytes]] | None = None) -> list[str]:
    """One completion text per prompt (an empty call is skipped: engines need not accept []);
    ``images[i]``: prompt i's image bytes (vision-language questions; text calls stay as they were)."""
    if not prompts_:
        return []
    if images is not None and any(images):
        outputs = engine.generate(prompts_, params, images=[list(x) for x in images])
    else:
        outputs = engine.generate(prompts_, params)
    if len(outputs) != len(prompts_):
        raise RuntimeError(f"engine returned {len(outputs)} results for {len(prompts_)} prompts")
    return [out[0].text for out in outputs]


def judge_batch(
    engine: Engine,
    format_prompt: Callable[[Messages], str],
    questions: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str | None],
    *,
    judge_context: str = "both",
    max_new_tokens: int = 256,
    seed: int = 0,
    roles: RolePrompts | None = None,
    round_index: int = 0,
    images: Sequence[Sequence[bytes]] | None = None,
) -> list[tuple[str | None, str | None]]:
    """Greedy Yes/No judgments of (question, completion, answer) triples: (judge reply, verdict).

    Triples without an answer are not judged and give (None, None) (see the module docstring).
    The prompt is :func:`spark_core.prompts.self_judgment_prompt` in the chat ``roles`` builds (the
    builder reward items use; demonstrations drawn with an rng keyed by seed, round and question).
    ``images[i]``: question i's image bytes, shown in the judgment turn (vision-language questions).
    """
    todo = [i for i, a in enumerate(answers) if a is not None and str(a).strip()]
    texts = [
        format_prompt(with_images(
            build_messages(
                roles,
                prompts.self_judgment_prompt(questions[i], completions[i], answers[i], judge_context),
                seed, "judge", round_index, questions[i],
            ), len(images[i]) if images else 0,
        ))
        for i in todo
    ]
    labels = prompts.POINTWISE_LABELS["yes_no"]  # ("Yes", "No")
    replies = _generate_one(engine, texts, _greedy(max_new_tokens, seed), [images[i] for i in todo] if images else None)
    out: list[tuple[str | None, str | None]] = [(None, None)] * len(questions)
    for i, reply in zip(todo, replies):
        out[i] = (reply, parse_verdict(reply, labels))
    return out


def self_reflect_batch(
    engine: Engine,
    format_prompt: Callable[[Messages], str],
    questions: list[str],
    *,
    question_messages: Callable[[str], Messages],
    golds: Sequence[str | None] | None = None,
    max_rounds: int = 2,
    judge_context: str = "both",
    max_new_tokens: int = 256,
    seed: int = 0,
    roles: RolePrompts | None = None,
    judge_max_new_tokens: int | None = None,
    revision_max_new_tokens: int | None = None,
    images: Sequence[Sequence[bytes]] | None = None,
) -> list[ReflectionTrace]:
    """Run self-reflection on every question (batched over the questions still active each round).

    ``question_messages`` turns a raw question into the solver's chat messages (system prompt,
    few-shot turns, instruction); ``format_prompt`` renders messages into the engine's prompt text.
    ``roles`` builds the judge's and the reviser's chat (system prompt, demonstrations), exactly as
    for reward items. ``max_new_tokens`` is the first answer's budget; judgments and revisions get
    ``judge_max_new_tokens`` / ``revision_max_new_tokens`` (default: ``max_new_tokens``).
    ``golds`` is only carried into the traces; the procedure never looks at it. ``images[i]``: question
    i's image bytes, shown in EVERY round (first answer, each judgment, each revision).
    """
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be >= 0, got {max_rounds}")
    if golds is not None and len(golds) != len(questions):
        raise ValueError(f"got {len(golds)} golds for {len(questions)} questions")
    params = _greedy(max_new_tokens, seed)
    traces = [
        ReflectionTrace(question=q, gold=None if golds is None else golds[i]) for i, q in enumerate(questions)
    ]

    count = [len(images[i]) if images else 0 for i in range(len(questions))]
    first = _generate_one(engine, [format_prompt(with_images(question_messages(q), count[i]))
                                   for i, q in enumerate(questions)], params, images)
    for trace, text in zip(traces, first):
        trace.rounds.append(_round(0, text))

    active = list(range(len(questions)))
    for t in range(max_rounds):
        if not active:
            break
        current = [traces[i].rounds[-1] for i in active]
        verdicts = judge_batch(
            engine,
            format_prompt,
            [questions[i] for i in active],
            [r["completion"] for r in current],
            [r["answer"] for r in current],
            judge_context=judge_context,
            max_new_tokens=judge_max_new_tokens or max_new_tokens,
            seed=seed,
            roles=roles,
            round_index=t,
            images=[images[i] for i in active] if images else None,
        )
        revise: list[int] = []
        for i, rnd, (reply, verdict) in zip(active, current, verdicts):
            rnd["judgment_completion"] = reply
            rnd["verdict"] = verdict
            if reply is not None:
                traces[i].n_judgments += 1
            if verdict == "Yes":
                traces[i].stopped_because = "judged_correct"
            else:  # "No", unparsed, or nothing to judge: all ask for a revision
                revise.append(i)
        revision_prompts = [
            format_prompt(with_images(
                build_messages(
                    roles,
                    prompts.revision_prompt(
                        questions[i], traces[i].rounds[-1]["completion"], traces[i].rounds[-1]["answer"]
                    ),
                    seed, "revise", t, questions[i],
                ), count[i],
            ))
            for i in revise
        ]
        revision_params = _greedy(revision_max_new_tokens or max_new_tokens, seed)
        revise_images = [images[i] for i in revise] if images else None
        for i, text in zip(revise, _generate_one(engine, revision_prompts, revision_params, revise_images)):
            traces[i].rounds.append(_round(t + 1, text))
            traces[i].n_revisions += 1
        active = revise

    for i in active:
        # Still active after the loop: either no rounds were allowed, or the last revision stands.
        traces[i].stopped_because = "max_rounds" if max_rounds > 0 else "no_rounds"
    for trace in traces:
        trace.final_answer = trace.rounds[-1]["answer"]
    return traces


def self_reflect(
    engine: Engine,
    format_prompt: Callable[[Messages], str],
    question: str,
    **kwargs: Any,
) -> ReflectionTrace:
    """:func:`self_reflect_batch` for a single question (``gold=`` may be passed for the trace)."""
    gold = kwargs.pop("gold", None)
    return self_reflect_batch(engine, format_prompt, [question], golds=[gold], **kwargs)[0]


def _round(index: int, completion: str) -> ReflectionRound:
    return ReflectionRound(
        round=index,
        completion=completion,
        answer=extract_boxed(completion),
        judgment_completion=None,
        verdict=None,
    )
