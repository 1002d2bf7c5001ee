"""Reward-data construction from verified policy rollouts, and the FIFO pool.

From each group of rollouts (the rows of one ``question_id``) with known correctness:

* one **judgment** item: all correct -> pointwise on a random correct rollout (label positive); all
  wrong -> pointwise on a random wrong rollout with an extracted answer (label negative); mixed ->
  with probability ``pointwise_prob_mixed`` a pointwise item (class drawn uniformly, then a rollout of
  that class), else a pairwise item (one correct and one wrong rollout; the correct one is shown as (B)
  with probability ``pairwise_swap_prob``; label = its letter). Pointwise items use the Yes/No style
  with probability ``yes_no_prob``, else A (correct) / B (incorrect).
* one **reflection** item when the group has a wrong rollout with an extracted answer: a random such
  rollout, shown whole (``cot``, probability ``reflection_cot_prob``) or as its final answer only,
  with an explicit "this is wrong" wording with probability ``reflection_explicit_prob``;
  label = the question's gold answer.

With ``balance_pointwise_labels`` (not in the paper) the larger label class of an iteration's pointwise
items is subsampled to the size of the smaller one before the cap (a stream of its own, so the other
items are drawn exactly as without it): the paper's rule labels every all-wrong group "incorrect", and a
policy that is right in a third of its samples then yields mostly "incorrect" items.

A rollout can only be shown if its answer was extracted; an item that needs one that does not exist is
skipped. Rollouts whose verification did not finish (``verify_status`` ``timeout`` or ``error``) have
unknown correctness, so they are left out of their group altogether: a label built on them could be
wrong. At most ``max_judgment_items`` judgment and ``max_reflection_items`` reflection items are kept
(uniform random subsample).

Randomness: ``random.Random(seed)`` seeds three independent streams (judgment, reflection, caps),
and groups are visited in sorted ``question_id`` order, so the result depends only on the input rows,
the config and the seed, and switching one item kind off does not change the items of the other.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Literal

import pandas as pd
import pyarrow as pa

from . import prompts
from .config import RewardDataConfig
from .demonstrations import RolePrompts, build_messages
from .schemas import IMAGES, REWARD_ITEMS, conform
from .vision import with_images

Messages = list[dict[str, str]]
PromptFormatter = Callable[[Messages], str]

REQUIRED_COLUMNS = ("question_id", "sample_idx", "question", "completion", "label", "answer", "reward")
# Verification outcomes that say nothing about correctness (see the module docstring).
UNKNOWN_STATUSES = frozenset({"timeout", "error"})
KINDS = ("pointwise", "pairwise", "reflection")


@dataclass(frozen=True)
class _Rollout:
    sample_idx: int
    completion: str
    answer: str | None  # stripped, None when nothing was extracted
    correct: bool


@dataclass(frozen=True)
class _Group:
    question_id: str
    question: str
    gold: str | None
    rollouts: tuple[_Rollout, ...]
    images: tuple[str, ...] = ()  # the question's image references (vision-language runs)

    def shown(self, correct: bool) -> list[_Rollout]:
        """Rollouts of one class that can be shown (their answer was extracted)."""
        return [r for r in self.rollouts if r.correct is correct and r.answer is not None]


@dataclass(frozen=True)
class _Item:
    group_pos: int  # position of the source group in visiting order (keeps output order stable)
    kind: str
    question_id: str
    sample_idx: tuple[int, ...]
    messages: Messages
    label: str
    context_mode: str
    template_id: str
    label_style: str
    prompt: prompts.JudgmentPrompt | prompts.ReflectionPrompt


# ------------------------------------------------------------------------------------------ input


def _as_records(verified: pd.DataFrame | pa.Table) -> list[dict[str, Any]]:
    if isinstance(verified, pd.DataFrame):
        table = pa.Table.from_pandas(verified, preserve_index=False)
    elif isinstance(verified, pa.Table):
        table = verified
    else:
        raise TypeError(
            f"verified must be a pandas DataFrame or a pyarrow Table, got {type(verified).__name__}"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"verified rollouts lack column(s): {', '.join(missing)}")
    optional = [c for c in ("verify_status", "images") if c in table.column_names]
    wanted = list(REQUIRED_COLUMNS) + optional
    return table.select(wanted).to_pylist()


def _clean_answer(answer: Any) -> str | None:
    if answer is None:
        return None
    text = str(answer).strip()
    return text or None


def _groups(records: list[dict[str, Any]]) -> list[_Group]:
    by_qid: dict[str, list[dict[str, Any]]] = {}
    for row in records:
        by_qid.setdefault(str(row["question_id"]), []).append(row)
    groups = []
    for qid in sorted(by_qid):
        rows = sorted(by_qid[qid], key=lambda r: int(r["sample_idx"]))
        rollouts = tuple(
            _Rollout(
                sample_idx=int(r["sample_idx"]),
                completion=r["completion"] or "",
                answer=_clean_answer(r["answer"]),
                # Rewards are 0/1; the threshold only guards against float noise.
                correct=float(r["reward"]) > 0.5,
            )
            for r in rows
            if r["reward"] is not None and r.get("verify_status") not in UNKNOWN_STATUSES
        )
        if rollouts:
            gold = _clean_answer(rows[0]["label"])
            images = tuple(rows[0].get("images") or ())
            groups.append(_Group(qid, str(rows[0]["question"] or ""), gold, rollouts, images))
    return groups


# ---------------------------------------------------------------------------------------- builders


def _pointwise(
    rng: random.Random, cfg: RewardDataConfig, group: _Group, pos: int, rollout: _Rollout
) -> _Item:
    style = "yes_no" if rng.random() < cfg.yes_no_prob else "a_b"
    index = prompts.pick_pointwise_template(rng, style)
    p = prompts.pointwise_judgment(
        group.question, rollout.completion, rollout.answer, cfg.context_mode, style, index
    )
    return _Item(
        group_pos=pos,
        kind="pointwise",
        question_id=group.question_id,
        sample_idx=(rollout.sample_idx,),
        messages=p.messages,
        label=p.positive_label if rollout.correct else p.negative_label,
        context_mode=cfg.context_mode,
        template_id=p.template_id,
        label_style=style,
        prompt=p,
    )


def _pairwise(rng: random.Random, cfg: RewardDataConfig, group: _Group, pos: int) -> _Item | None:
    good, bad = group.shown(True), group.shown(False)
    if not good or not bad:
        return None
    right, wrong = rng.choice(good), rng.choice(bad)
    swap = rng.random() < cfg.pairwise_swap_prob  # the correct rollout goes to (B)
    first, second = (wrong, right) if swap else (right, wrong)
    index = prompts.pick_pairwise_template(rng)
    p = prompts.pairwise_judgment(
        group.question,
        first.completion,
        first.answer,
        second.completion,
        second.answer,
        cfg.context_mode,
        index,
    )
    return _Item(
        group_pos=pos,
        kind="pairwise",
        question_id=group.question_id,
        sample_idx=(first.sample_idx, second.sample_idx),
        messages=p.messages,
        label=p.negative_label if swap else p.positive_label,
        context_mode=cfg.context_mode,
        template_id=p.template_id,
        label_style="letter",
        prompt=p,
    )


def _judgment_item(rng: random.Random, cfg: RewardDataConfig, group: _Group, pos: int) -> _Item | None:
    n_correct = sum(r.correct for r in group.rollouts)
    if n_correct in (0, len(group.rollouts)):
        candidates = group.shown(n_correct > 0)
        return _pointwise(rng, cfg, group, pos, rng.choice(candidates)) if candidates else None
    if rng.random() < cfg.pointwise_prob_mixed:
        # Class first, uniformly, so a 7-correct/1-wrong group still yields negatives half the time.
        candidates = group.shown(rng.random() < 0.5)
        return _pointwise(rng, cfg, group, pos, rng.choice(candidates)) if candidates else None
    return _pairwise(rng, cfg, group, pos)


def _reflection_item(rng: random.Random, cfg: RewardDataConfig, group: _Group, pos: int) -> _Item | None:
    wrong = group.shown(False)
    if not wrong or group.gold is None:  # nothing to show, or nothing to check the new answer against
        return None
    rollout = rng.choice(wrong)
    mode = "cot" if rng.random() < cfg.reflection_cot_prob else "answer"
    explicit = rng.random() < cfg.reflection_explicit_prob
    index = prompts.pick_reflection_template(rng, mode, explicit)
    p = prompts.reflection_request(group.question, rollout.completion, rollout.answer, mode, explicit, index)
    return _Item(
        group_pos=pos,
        kind="reflection",
        question_id=group.question_id,
        sample_idx=(rollout.sample_idx,),
        messages=p.messages,
        label=group.gold,
        context_mode=mode,
        template_id=p.template_id,
        label_style="math",
        prompt=p,
    )


def _cap(rng: random.Random, items: list[_Item], limit: int) -> list[_Item]:
    if len(items) <= limit:
        return items
    keep = sorted(rng.sample(range(len(items)), limit))
    return [items[i] for i in keep]


def _balance_pointwise(rng: random.Random, items: list[_Item]) -> list[_Item]:
    """Drop pointwise items of the larger label class at random until both classes are the same size."""
    by_class: dict[bool, list[int]] = {True: [], False: []}
    for i, it in enumerate(items):
        if it.kind == "pointwise":
            by_class[it.label == it.prompt.positive_label].append(i)
    smaller = min(len(v) for v in by_class.values())
    dropped = {i for v in by_class.values() if len(v) > smaller for i in rng.sample(v, len(v) - smaller)}
    return [it for i, it in enumerate(items) if i not in dropped]


def build_reward_items(
    verified: pd.DataFrame | pa.Table,
    cfg: RewardDataConfig,
    format_prompt: PromptFormatter,
    iteration: int,
    seed: int,
    roles: RolePrompts | None = None,
) -> pa.Table:
    """Judgment and reflection items from one iteration's verified rollouts (REWARD_ITEMS schema).

    ``prompt`` is ``format_prompt(messages)``: the exact text the reward phase feeds the model, where
    the messages come from ``roles`` (:class:`spark_core.demonstrations.RolePrompts`: system prompt and
    demonstrations, each item with its own rng from ``(seed, question_id, kind)``, a stream apart from
    the item draws) or, without roles, the bare prompt turn.
    ``item_id`` is ``it{iteration:04d}-{n:05d}``, unique across iterations. Rows are ordered by source
    group (sorted question_id), a group's judgment item before its reflection item.
    """
    master = random.Random(seed)
    judgment_rng, reflection_rng, cap_rng = (random.Random(master.getrandbits(64)) for _ in range(3))
    groups = _groups(_as_records(verified))

    judgments: list[_Item] = []
    reflections: list[_Item] = []
    for pos, group in enumerate(groups):
        if cfg.judgment and (item := _judgment_item(judgment_rng, cfg, group, pos)) is not None:
            judgments.append(item)
        if cfg.reflection and (item := _reflection_item(reflection_rng, cfg, group, pos)) is not None:
            reflections.append(item)

    if cfg.balance_pointwise_labels:
        judgments = _balance_pointwise(random.Random(f"{seed}-balance"), judgments)
    kept = _cap(cap_rng, judgments, cfg.max_judgment_items) + _cap(
        cap_rng, reflections, cfg.max_reflection_items
    )
    kept.sort(key=lambda it: (it.group_pos, it.kind == "reflection"))
    # Every judgment and reflection item shows its question's image(s), as the policy saw them.
    images = {g.question_id: list(g.images) for g in groups}
    rows = [
        {
            "item_id": f"it{iteration:04d}-{n:05d}",
            "kind": it.kind,
            "source_question_id": it.question_id,
            "source_sample_idx": list(it.sample_idx),
            "prompt": format_prompt(with_images(
                build_messages(roles, it.prompt, seed, it.question_id, it.kind), len(images[it.question_id]))),
            "label": it.label,
            "context_mode": it.context_mode,
            "template_id": it.template_id,
            "label_style": it.label_style,
            "iteration": iteration,
            **({"images": images[it.question_id]} if images[it.question_id] else {}),
        }
        for n, it in enumerate(kept)
    ]
    has_images = any(g.images for g in groups)
    return pa.Table.from_pylist(rows, schema=REWARD_ITEMS.append(IMAGES) if has_images else REWARD_ITEMS)


# ------------------------------------------------------------------------------------------- pool


def _conform(table: pa.Table, what: str) -> pa.Table:
    missing = [name for name in REWARD_ITEMS.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{what} lacks reward-item column(s): {', '.join(missing)}")
    return conform(table, REWARD_ITEMS)  # keeps `images` (vision-language runs)


def update_pool(
    pool: pa.Table | None, new_items: pa.Table, batch_size: int, max_pool_size: int
) -> tuple[pa.Table, pa.Table]:
    """FIFO pool step: append ``new_items``, drop the oldest beyond ``max_pool_size``, then pop the
    oldest ``batch_size`` items if the pool holds that many.

    Returns ``(popped, remaining)``, both with the REWARD_ITEMS schema; ``popped`` is empty when the
    pool is still short of a batch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_pool_size < batch_size:
        raise ValueError(
            f"max_pool_size ({max_pool_size}) is smaller than batch_size ({batch_size}): "
            "the pool could never fill"
        )
    parts = [_conform(new_items, "new_items")]
    if pool is not None:
        parts.insert(0, _conform(pool, "pool"))
    merged = pa.concat_tables(parts).combine_chunks()
    if merged.num_rows > max_pool_size:
        merged = merged.slice(merged.num_rows - max_pool_size)
    if merged.num_rows < batch_size:
        return merged.slice(0, 0), merged  # empty, with the pool's columns (`images` included)
    return merged.slice(0, batch_size), merged.slice(batch_size)


def verify_mode(kind: str) -> Literal["math", "choice"]:
    """How a reward-phase answer to an item of ``kind`` is checked: math verifier or exact letter/word."""
    if kind == "reflection":
        return "math"
    if kind in ("pointwise", "pairwise"):
        return "choice"
    raise ValueError(f"unknown reward item kind {kind!r}; expected one of {', '.join(KINDS)}")
