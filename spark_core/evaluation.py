"""Evaluation of the model as solver and as judge of its own answers.

Metric functions are pure (lists in, numbers out). ``evaluate_benchmark`` runs one benchmark through an
engine and returns a per-question table (columns :data:`spark_core.schemas.EVAL`) and a flat,
JSON-able summary:

=============================  ==================================================================
``n``                          questions evaluated
``accuracy``                   greedy pass@1 of the first answer a0 (no reflection)
``accuracy_reflect``           pass@1 of the answer after self-reflection (None if reflection is off)
``right_to_wrong``             questions reflection turned from correct to wrong (None if off)
``wrong_to_right``             questions reflection turned from wrong to correct (None if off)
``judge_precision/recall/f1``  the model judging its own a0, "a0 is correct" = positive class
``judge_accuracy``             share of those judgments that match the verifier
``judge_balanced_accuracy``    mean of the Yes-rate on right a0 and the No-rate on wrong a0 (0.5 for
                               any constant judge; an unparsed verdict counts as neither Yes nor No)
``judge_yes_share``            share of Yes among the parsed verdicts
``verdict_parse_rate``         share of judgments with a readable Yes/No (unparsed ones are reported
                               here, apart from wrong ones, and count as wrong in the other metrics)
``judge_n``                    a0 answers judged (a0 without a boxed answer is not shown to the judge)
``judge_n_unparsed``           judgments without a readable Yes/No (counted as wrong judgments)
``n_no_answer``                questions whose a0 has no extractable final answer
``mean_revisions``             mean revisions per question during self-reflection
``pairwise_accuracy``          pairwise judge accuracy, each pair in one seeded random order
``pairwise_acc_correct_first`` the same pairs with the correct answer shown as (A)
``pairwise_acc_correct_second`` ... and as (B); the gap between the two exposes position bias
``pairwise_n``                 pairs found (questions with both a correct and a wrong own answer)
``pairwise_parse_rate``        share of pairwise verdicts (both orders) with a readable A/B
``avg_at_k``                   mean accuracy of ``avg_k`` samples at ``avg_temperature`` (None if 0)
=============================  ==================================================================

Zero-division convention: a ratio whose denominator is 0 (no predicted positives, no true positives,
no items) is reported as 0.0, not NaN, so summaries stay JSON-able and plots stay drawable; the
``*_n`` counts tell an empty result from a bad one. Pairwise accuracies are None when no pair exists.

Per-question rows (:data:`EVAL_ROWS`: the :data:`spark_core.schemas.EVAL` columns, then
``pairwise_correct``, the verdict of the question's one shuffled pairwise presentation, null when the
question has no pair) let readers recompute every metric on any subset, e.g. a paired bootstrap.

``evaluate_preference`` scores a judge on external (prompt, chosen, rejected) pairs (RewardBench2
style), each pair shown in both orders.
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable, NamedTuple, Sequence

import pyarrow as pa

from . import prompts, schemas
from .benchmarks import PreferencePair
from .config import EvalConfig
from .data import Question
from .demonstrations import RolePrompts, build_messages
from .engines.base import Engine, SamplingParams
from .reflection import ReflectionTrace, judge_batch, parse_verdict, self_reflect_batch
from .verify import VerifyResult
from .verify_pool import verify_batch
from .images import image_ref
from .vision import with_images

Messages = list[dict[str, str]]
# Verification outcomes that say nothing about correctness: scored wrong for accuracy (the answer was
# not shown to be right), but never used to build a judge pair whose label would then be a guess.
UNKNOWN_STATUSES = frozenset({"timeout", "error"})

# Per-question rows of `evaluate_benchmark`: the EVAL contract, then the question's pairwise verdict
# (its one shuffled presentation) judged right or wrong, null when the question had no right/wrong pair.
EVAL_ROWS = pa.schema(list(schemas.EVAL) + [("pairwise_correct", pa.bool_())])

# Per-pair rows of `evaluate_preference` (no pipeline stage reads them, so they live here).
PREFERENCE_EVAL = pa.schema(
    [
        ("pair_id", pa.string()),
        ("prompt", pa.string()),
        ("verdict_chosen_first", pa.string()),  # judge's letter with chosen shown as (A); null if unparsed
        ("correct_chosen_first", pa.bool_()),
        ("verdict_chosen_second", pa.string()),  # ... with chosen shown as (B)
        ("correct_chosen_second", pa.bool_()),
        ("judgment_chosen_first", pa.string()),  # the judge's full replies
        ("judgment_chosen_second", pa.string()),
    ]
)


# ------------------------------------------------------------------------------------------ metrics


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def accuracy(flags: Sequence[bool]) -> float:
    """Share of true flags (0.0 for an empty list)."""
    return _ratio(sum(1 for f in flags if f), len(flags))


def binary_judge_metrics(predicted_yes: Sequence[bool | None], truth: Sequence[bool]) -> dict[str, float | int]:
    """Precision, recall, F1, accuracy and balanced accuracy of Yes/No verdicts, "the answer is
    correct" being positive, with the parse rate and the Yes-share.

    ``predicted_yes[i]`` is True for Yes, False for No and None for an unparsed verdict. An unparsed
    verdict is a wrong judgment whatever the truth: on a correct answer it counts as a false
    negative, on a wrong answer as a false positive. It is also counted apart: ``parse_rate`` is the
    share of readable verdicts and ``yes_share`` the share of Yes among the readable ones.

    ``balanced_accuracy`` is the mean of the Yes-rate on correct answers and the No-rate on wrong ones
    (an unparsed verdict is neither, so it lowers the rate of its class): 0.5 for any judge that
    ignores its input (always Yes, always No, a coin), where accuracy and F1 reward a constant Yes on
    a mostly-correct solver. With one class absent it is that class's rate. Zero denominators give 0.0.
    """
    if len(predicted_yes) != len(truth):
        raise ValueError(f"{len(predicted_yes)} verdicts for {len(truth)} truths")
    tp = fp = fn = tn = unparsed = 0
    for pred, true in zip(predicted_yes, truth):
        if pred is None:
            unparsed += 1
            pred = not true  # the judgment is wrong either way
        if pred and true:
            tp += 1
        elif pred:
            fp += 1
        elif true:
            fn += 1
        else:
            tn += 1
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    rates = [_ratio(tp, tp + fn)] if tp + fn else []
    rates += [_ratio(tn, tn + fp)] if tn + fp else []
    n_parsed = len(truth) - unparsed
    n_yes = sum(1 for pred in predicted_yes if pred is True)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": _ratio(tp + tn, len(truth)),
        "balanced_accuracy": sum(rates) / len(rates) if rates else 0.0,
        "parse_rate": _ratio(n_parsed, len(truth)),
        "yes_share": _ratio(n_yes, n_parsed),
        "n": len(truth),
        "n_unparsed": unparsed,
    }


def flip_counts(before: Sequence[bool], after: Sequence[bool]) -> dict[str, int]:
    """How many items went from correct to wrong and from wrong to correct."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} before-flags for {len(after)} after-flags")
    return {
        "right_to_wrong": sum(1 for b, a in zip(before, after) if b and not a),
        "wrong_to_right": sum(1 for b, a in zip(before, after) if a and not b),
    }


def pairwise_accuracy(predicted: Sequence[str | None], labels: Sequence[str]) -> float:
    """Share of pairwise verdicts equal to the label letter; an unparsed verdict (None) is wrong."""
    if len(predicted) != len(labels):
        raise ValueError(f"{len(predicted)} verdicts for {len(labels)} labels")
    return _ratio(sum(1 for p, y in zip(predicted, labels) if p is not None and p == y), len(labels))


# ------------------------------------------------------------------------------------ evaluation


def _verify(
    completions: list[str], golds: list[str], timeout_s: float | None, processes: int | None
) -> list[VerifyResult]:
    if not completions:
        return []
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout_s"] = timeout_s
    if processes is not None:
        kwargs["processes"] = processes
    return verify_batch(completions, golds, ["math"] * len(completions), **kwargs)


def _pairwise_judgments(
    engine: Engine,
    format_prompt: Callable[[Messages], str],
    items: list[tuple[str, str, str | None, str, str | None]],
    *,
    context_mode: str,
    max_new_tokens: int,
    seed: int,
    roles: RolePrompts | None = None,
    images: Sequence[Sequence[bytes]] | None = None,
) -> list[tuple[tuple[str, str | None], tuple[str, str | None]]]:
    """Judge (question, first, first_answer, second, second_answer) pairs in both orders.

    Returns, per pair, (reply, verdict) with the first response shown as (A), then as (B). Prompts are
    built as for pairwise reward items (``roles``: system prompt and demonstrations)."""
    texts: list[str] = []
    for k, (question, first, first_ans, second, second_ans) in enumerate(items):
        for order, (a, a_ans, b, b_ans) in enumerate(
            ((first, first_ans, second, second_ans), (second, second_ans, first, first_ans))
        ):
            jp = prompts.eval_pairwise_prompt(question, a, a_ans, b, b_ans, context_mode)
            messages = with_images(build_messages(roles, jp, seed, "pairwise", order, question),
                                   len(images[k]) if images else 0)
            texts.append(format_prompt(messages))
    if not texts:
        return []
    params = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
    both = [list(images[k]) for k in range(len(items)) for _ in range(2)] if images else None
    replies = [out[0].text for out in _generate(engine, texts, params, both)]
    labels = prompts.PAIRWISE_LABELS
    parsed = [(r, parse_verdict(r, labels)) for r in replies]
    return [(parsed[2 * i], parsed[2 * i + 1]) for i in range(len(items))]


def _generate(engine: Engine, texts: list[str], params: SamplingParams,
              images: Sequence[Sequence[bytes]] | None) -> list[Any]:
    """``engine.generate``, with ``images`` only when some prompt has an image (text engines unchanged)."""
    if images is not None and any(images):
        return engine.generate(texts, params, images=[list(x) for x in images])
    return engine.generate(texts, params)


def _trace_json(trace: ReflectionTrace) -> str:
    return json.dumps(trace.rounds, ensure_ascii=False)


def evaluate_benchmark(
    engine: Engine,
    format_prompt: Callable[[Messages], str],
    questions: list[Question],
    *,
    question_messages: Callable[[str], Messages],
    eval_cfg: EvalConfig,
    max_new_tokens: int,
    seed: int = 0,
    pairwise_k: int | None = None,
    verify_timeout_s: float | None = None,
    verify_processes: int | None = None,
    roles: RolePrompts | None = None,
    judge_max_new_tokens: int | None = None,
    revision_max_new_tokens: int | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Evaluate solver and self-judge on ``questions``; returns (EVAL table, summary).

    ``roles`` builds every judge and revision chat as for reward items; judgments (self and pairwise)
    get ``judge_max_new_tokens`` and revisions ``revision_max_new_tokens`` (default: ``max_new_tokens``,
    the answers' budget).

    Steps: self-reflection (greedy a0, then judge/revise up to ``eval_cfg.max_rounds``; with
    ``eval_cfg.reflection`` off only a0 and one judgment of it); verification of every attempt;
    judge metrics on the model's verdict about its own a0; pairwise judge accuracy on pairs of its own
    correct and wrong answers (taken from the reflection attempts, then from ``pairwise_k`` (default
    ``eval_cfg.pairwise_k``) extra
    samples per question at ``eval_cfg.avg_temperature`` where needed, or from the avg@k samples when
    ``eval_cfg.avg_k > 0``); avg@k when ``eval_cfg.avg_k > 0``.
    """
    if pairwise_k is None:
        pairwise_k = eval_cfg.pairwise_k
    texts = [q.question for q in questions]
    golds = [q.answer for q in questions]
    images = [q.images for q in questions] if any(q.images for q in questions) else None
    n = len(questions)
    rounds = eval_cfg.max_rounds if eval_cfg.reflection else 0
    traces = self_reflect_batch(
        engine,
        format_prompt,
        texts,
        question_messages=question_messages,
        golds=golds,
        max_rounds=rounds,
        judge_context=eval_cfg.judge_context,
        max_new_tokens=max_new_tokens,
        seed=seed,
        roles=roles,
        judge_max_new_tokens=judge_max_new_tokens,
        revision_max_new_tokens=revision_max_new_tokens,
        images=images,
    )
    # The verdict on a0: the first judgment of the trace, or one extra judgment round when the
    # procedure itself judged nothing (reflection off, or max_rounds == 0).
    if rounds > 0:
        first_judgments = [(t.rounds[0]["judgment_completion"], t.rounds[0]["verdict"]) for t in traces]
    else:
        first_judgments = judge_batch(
            engine,
            format_prompt,
            texts,
            [t.rounds[0]["completion"] for t in traces],
            [t.rounds[0]["answer"] for t in traces],
            judge_context=eval_cfg.judge_context,
            max_new_tokens=judge_max_new_tokens or max_new_tokens,
            seed=seed,
            roles=roles,
            images=images,
        )

    # Verify every attempt of every trace in one call (a0 and the final answer are among them).
    flat = [(i, r) for i, t in enumerate(traces) for r in t.rounds]
    results = _verify(
        [r["completion"] for _, r in flat], [golds[i] for i, _ in flat], verify_timeout_s, verify_processes
    )
    attempts: list[list[_Attempt]] = [[] for _ in range(n)]
    for (i, rnd), res in zip(flat, results):
        attempts[i].append(_attempt(rnd["completion"], rnd["answer"], res))
    correct = [a[0].correct for a in attempts]
    final_correct = [a[-1].correct for a in attempts]

    # Extra temperature samples: avg@k for every question, or just enough to find pairs.
    need_pair = [i for i in range(n) if _find_pair(attempts[i]) is None]
    if eval_cfg.avg_k > 0:
        sample_for, k = list(range(n)), eval_cfg.avg_k
    elif eval_cfg.pairwise and pairwise_k > 0:
        sample_for, k = need_pair, pairwise_k
    else:
        sample_for, k = [], 0
    samples: dict[int, list[_Attempt]] = {}
    if sample_for:
        params = SamplingParams(
            n=k, temperature=eval_cfg.avg_temperature, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed + 1
        )
        counts = [len(images[i]) if images else 0 for i in sample_for]
        outs = _generate(engine, [format_prompt(with_images(question_messages(texts[i]), c))
                                  for i, c in zip(sample_for, counts)],
                         params, [images[i] for i in sample_for] if images else None)
        sflat = [(i, c.text) for i, out in zip(sample_for, outs) for c in out]
        sres = _verify([t for _, t in sflat], [golds[i] for i, _ in sflat], verify_timeout_s, verify_processes)
        for (i, text), res in zip(sflat, sres):
            samples.setdefault(i, []).append(_attempt(text, res.answer, res))
    avg_at_k = accuracy([s.correct for i in range(n) for s in samples.get(i, [])]) if eval_cfg.avg_k > 0 else None

    summary: dict[str, Any] = {"n": n, "accuracy": accuracy(correct)}
    if eval_cfg.reflection:
        summary["accuracy_reflect"] = accuracy(final_correct)
        summary.update(flip_counts(correct, final_correct))
    else:
        summary.update({"accuracy_reflect": None, "right_to_wrong": None, "wrong_to_right": None})

    judged = [i for i in range(n) if first_judgments[i][0] is not None]
    verdicts = [first_judgments[i][1] for i in judged]
    jm = binary_judge_metrics([None if v is None else v == "Yes" for v in verdicts], [correct[i] for i in judged])
    summary.update(
        {
            "judge_precision": jm["precision"],
            "judge_recall": jm["recall"],
            "judge_f1": jm["f1"],
            "judge_accuracy": jm["accuracy"],
            "judge_balanced_accuracy": jm["balanced_accuracy"],
            "judge_yes_share": jm["yes_share"],
            "verdict_parse_rate": jm["parse_rate"],
            "judge_n": jm["n"],
            "judge_n_unparsed": jm["n_unparsed"],
            "n_no_answer": sum(1 for t in traces if not t.first_answer),
            "mean_revisions": _ratio(sum(t.n_revisions for t in traces), n),
        }
    )
    pair_summary, pair_correct = _pairwise_summary(
            engine, format_prompt, texts, attempts, samples, eval_cfg,
            max_new_tokens=judge_max_new_tokens or max_new_tokens, seed=seed, roles=roles, images=images,
        )
    summary.update(pair_summary)
    summary["avg_at_k"] = avg_at_k

    rows = []
    for i, (q, t) in enumerate(zip(questions, traces)):
        reply, verdict = first_judgments[i]
        rows.append(
            {
                "item_id": q.question_id,
                "question": q.question,
                "gold": q.answer,
                "prediction": t.first_answer,
                "correct": correct[i],
                "judged": verdict,
                # null: a0 had no answer and was not judged; False: judged wrongly or unparsed.
                "judgment_correct": (
                    None if reply is None else verdict is not None and (verdict == "Yes") == correct[i]
                ),
                "final_prediction": t.final_answer,
                "final_correct": final_correct[i],
                "reflection_rounds": t.n_revisions,
                "reflection_trace": _trace_json(t),
                "pairwise_correct": pair_correct.get(i),
                # the question's image references (content addresses; the eval stage stores the images)
                **({"images": [image_ref(b) for b in q.images]} if q.images else {}),
            }
        )
    return pa.Table.from_pylist(rows, schema=schemas.with_images(EVAL_ROWS, rows)), summary


class _Attempt(NamedTuple):
    completion: str
    answer: str | None
    correct: bool
    known: bool  # verification finished (not timeout/error), so `correct` can be trusted


def _attempt(completion: str, answer: str | None, res: VerifyResult) -> _Attempt:
    return _Attempt(completion, answer, res.reward >= 1.0, res.status not in UNKNOWN_STATUSES)


def _find_pair(candidates: Sequence[_Attempt]) -> tuple[_Attempt, _Attempt] | None:
    """The first correct and the first wrong candidate with a final answer and a finished check."""
    usable = [c for c in candidates if c.known and c.answer]
    right = next((c for c in usable if c.correct), None)
    wrong = next((c for c in usable if not c.correct), None)
    return (right, wrong) if right and wrong else None


def _pairwise_summary(
    engine: Engine,
    format_prompt: Callable[[Messages], str],
    texts: list[str],
    attempts: list[list[_Attempt]],
    samples: dict[int, list[_Attempt]],
    eval_cfg: EvalConfig,
    *,
    max_new_tokens: int,
    seed: int,
    roles: RolePrompts | None = None,
    images: Sequence[Sequence[bytes]] | None = None,
) -> tuple[dict[str, Any], dict[int, bool]]:
    """Pairwise metrics, and per question index (those with a pair) whether its shuffled verdict was right."""
    empty = {"pairwise_accuracy": None, "pairwise_acc_correct_first": None, "pairwise_acc_correct_second": None,
             "pairwise_parse_rate": None}
    if not eval_cfg.pairwise:
        return {**empty, "pairwise_n": 0}, {}
    items, where = [], []
    for i, question in enumerate(texts):
        pair = _find_pair(attempts[i] + samples.get(i, []))
        if pair is not None:
            right, wrong = pair
            items.append((question, right.completion, right.answer, wrong.completion, wrong.answer))
            where.append(i)
    if not items:
        return {**empty, "pairwise_n": 0}, {}
    judged = _pairwise_judgments(
        engine, format_prompt, items, context_mode=eval_cfg.judge_context, max_new_tokens=max_new_tokens, seed=seed,
        roles=roles, images=[images[i] for i in where] if images else None,
    )
    first = [a[1] for a, _ in judged]  # correct shown as (A): label A
    second = [b[1] for _, b in judged]  # correct shown as (B): label B
    # One seeded coin per pair picks the order a single shuffled presentation would have used.
    rng = random.Random(seed)
    shuffled, labels = [], []
    for f, s in zip(first, second):
        swap = rng.random() < 0.5
        shuffled.append(s if swap else f)
        labels.append("B" if swap else "A")
    per_question = {i: v is not None and v == y for i, v, y in zip(where, shuffled, labels)}
    return {
        "pairwise_accuracy": pairwise_accuracy(shuffled, labels),
        "pairwise_acc_correct_first": pairwise_accuracy(first, ["A"] * len(first)),
        "pairwise_acc_correct_second": pairwise_accuracy(second, ["B"] * len(second)),
        "pairwise_parse_rate": _ratio(sum(1 for v in first + second if v is not None), len(first) + len(second)),
        "pairwise_n": len(items),
    }, per_question


def evaluate_preference(
    engine: Engine,
    format_prompt: Callable[[Messages], str],
    pairs: Sequence[PreferencePair],
    *,
    max_new_tokens: int,
    seed: int = 0,
    context_mode: str = "cot",
    roles: RolePrompts | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Pairwise judge accuracy on (prompt, chosen, rejected) pairs, each shown in both orders.

    Responses are shown whole (``context_mode="cot"``): free-form responses have no boxed answer.
    Summary: ``n``, ``pairwise_accuracy`` (over both orders), ``acc_chosen_first``,
    ``acc_chosen_second``, ``consistent_accuracy`` (pairs judged right in both orders) and
    ``n_unparsed`` (verdicts without a readable A/B, counted wrong).
    """
    items = [(p.prompt, p.chosen, None, p.rejected, None) for p in pairs]
    images = [p.images for p in pairs] if any(p.images for p in pairs) else None
    judged = _pairwise_judgments(
        engine, format_prompt, items, context_mode=context_mode, max_new_tokens=max_new_tokens, seed=seed,
        roles=roles, images=images,
    )
    rows = []
    for p, ((reply_a, verdict_a), (reply_b, verdict_b)) in zip(pairs, judged):
        rows.append(
            {
                "pair_id": p.pair_id,
                "prompt": p.prompt,
                "verdict_chosen_first": verdict_a,
                "correct_chosen_first": verdict_a == "A",
                "verdict_chosen_second": verdict_b,
                "correct_chosen_second": verdict_b == "B",
                "judgment_chosen_first": reply_a,
                "judgment_chosen_second": reply_b,
            }
        )
    first = [r["correct_chosen_first"] for r in rows]
    second = [r["correct_chosen_second"] for r in rows]
    summary = {
        "n": len(rows),
        "pairwise_accuracy": accuracy(first + second),
        "acc_chosen_first": accuracy(first),
        "acc_chosen_second": accuracy(second),
        "consistent_accuracy": accuracy([a and b for a, b in zip(first, second)]),
        "n_unparsed": sum(1 for r in rows for k in ("verdict_chosen_first", "verdict_chosen_second") if r[k] is None),
    }
    return pa.Table.from_pylist(rows, schema=PREFERENCE_EVAL), summary
