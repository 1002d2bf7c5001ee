"""Reward-data construction (verified rollouts recycled into judgment and reflection items) and the FIFO
pool, on synthetic verified rollouts."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import pyarrow as pa
import pytest

from spark_core import prompts
from spark_core.config import RewardDataConfig
from spark_core.reward_data import build_reward_items, update_pool, verify_mode
from spark_core.schemas import REWARD_ITEMS, VERIFIED
from spark_core.quoting import neutralise

UNCAPPED = 10**6


def fmt(messages: list[dict[str, str]]) -> str:
    """Trivial chat formatter: role tags and contents (no model needed)."""
    return "\n".join(f"<{m['role']}>{m['content']}" for m in messages) + "\n<assistant>"


def cfg(**kw: Any) -> RewardDataConfig:
    kw.setdefault("max_judgment_items", UNCAPPED)
    kw.setdefault("max_reflection_items", UNCAPPED)
    return RewardDataConfig(**kw)


def make_verified(patterns: list[str], gold: str | None = "GOLD") -> pa.Table:
    """One group per pattern; one rollout per letter.

    c = correct, w = wrong with an extracted answer, e = no answer (null), s = blank answer ("  "),
    t = verification timed out (answer extracted, correctness unknown), x = verifier error.
    """
    rows = []
    for g, pattern in enumerate(patterns):
        qid = f"q{g:05d}"
        for i, state in enumerate(pattern):
            if state == "c":
                answer, reward, status = gold, 1.0, "ok"
            elif state in "wtx":
                answer = f"wrong-{qid}-{i}"
                reward = 0.0
                status = {"w": "ok", "t": "timeout", "x": "error"}[state]
            else:
                answer, reward, status = (None if state == "e" else "  "), 0.0, "no_answer"
            shown = answer if answer and answer.strip() else "nothing"
            rows.append(
                {
                    "question_id": qid,
                    "sample_idx": i,
                    "prompt": f"<user>Question {qid}",
                    "question": f"Question {qid}: compute something.",
                    "completion": f"Reasoning of {qid} sample {i} step by step. So \\boxed{{{shown}}}",
                    "completion_ids": [1, 2, 3],
                    "label": gold,
                    "answer": answer,
                    "reward": reward,
                    "verify_status": status,
                }
            )
    return pa.Table.from_pylist(rows, schema=VERIFIED)


def rollouts_by_key(verified: pa.Table) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["question_id"], r["sample_idx"]): r for r in verified.to_pylist()}


def within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """Binomial check: count/n is within `sigmas` standard deviations of p."""
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def positive_label(style: str) -> str:
    return prompts.POINTWISE_LABELS[style][0]


def check_item_against_sources(item: dict[str, Any], src: dict[tuple[str, int], dict[str, Any]]) -> None:
    """Every label and every prompt must agree with the rollouts the item was built from."""
    qid, idx, text = item["source_question_id"], item["source_sample_idx"], item["prompt"]
    shown = [src[(qid, i)] for i in idx]
    for r in shown:
        assert r["answer"] and r["answer"].strip(), "an empty answer was shown"
        assert r["verify_status"] == "ok"
    assert shown[0]["question"] in text
    if item["kind"] == "reflection":
        (r,) = shown
        assert r["reward"] == 0.0 and item["label"] == r["label"]
        assert item["label_style"] == "math" and item["context_mode"] == item["template_id"].split("-")[1]
        if item["context_mode"] == "cot":
            assert r["completion"] in text
        else:
            assert r["answer"] in text and r["completion"] not in text
        return
    mode = item["context_mode"]
    for r in shown:
        assert (neutralise(r["completion"]) in text) == (mode in ("cot", "both"))
        assert (f"Final answer: {r['answer']}" in text) == (mode in ("answer", "both"))
    if item["kind"] == "pointwise":
        (r,) = shown
        assert item["label_style"] in ("yes_no", "a_b")
        assert (item["label"] == positive_label(item["label_style"])) == (r["reward"] == 1.0)
        assert item["label"] in prompts.POINTWISE_LABELS[item["label_style"]]
    else:
        assert item["kind"] == "pairwise" and item["label_style"] == "letter" and len(shown) == 2
        assert sorted(r["reward"] for r in shown) == [0.0, 1.0]
        right = shown["AB".index(item["label"])]
        assert right["reward"] == 1.0
        marker = "completion" if mode != "answer" else "answer"
        key_a = neutralise(shown[0][marker]) if marker == "completion" else f"Final answer: {shown[0]['answer']}"
        key_b = neutralise(shown[1][marker]) if marker == "completion" else f"Final answer: {shown[1]['answer']}"
        assert text.index(key_a) < text.index(key_b), "(A) must come before (B)"


# ------------------------------------------------------------------------------------ group rules


@pytest.mark.parametrize("context_mode", ["answer", "cot", "both"])
def test_labels_and_prompts_match_sources(context_mode: str) -> None:
    patterns = ["cccc", "wwww", "ccww", "cwww", "ccwe", "wwee", "cccw"] * 40
    verified = make_verified(patterns)
    table = build_reward_items(verified, cfg(context_mode=context_mode), fmt, iteration=3, seed=11)
    assert table.schema.equals(REWARD_ITEMS)
    src = rollouts_by_key(verified)
    items = table.to_pylist()
    for item in items:
        check_item_against_sources(item, src)
        assert item["prompt"].startswith("<user>") and item["prompt"].endswith("<assistant>")
        assert item["iteration"] == 3
        if item["kind"] != "reflection":
            assert item["context_mode"] == context_mode
    kinds = Counter(i["kind"] for i in items)
    assert kinds["pointwise"] and kinds["pairwise"] and kinds["reflection"]


def test_one_judgment_and_one_reflection_per_group() -> None:
    patterns = ["cccc", "wwww", "ccww", "cwww", "cccw"] * 50
    verified = make_verified(patterns)
    items = build_reward_items(verified, cfg(), fmt, iteration=0, seed=1).to_pylist()
    by_group: dict[str, Counter[str]] = {}
    for item in items:
        by_group.setdefault(item["source_question_id"], Counter())[
            "reflection" if item["kind"] == "reflection" else "judgment"
        ] += 1
    assert len(by_group) == len(patterns)
    for g, pattern in enumerate(patterns):
        counts = by_group[f"q{g:05d}"]
        assert counts["judgment"] == 1
        assert counts["reflection"] == (1 if "w" in pattern else 0)


def test_uniform_groups_are_pointwise_with_fixed_label() -> None:
    verified = make_verified(["cccc"] * 100 + ["wwww"] * 100)
    items = build_reward_items(verified, cfg(reflection=False), fmt, iteration=0, seed=2).to_pylist()
    assert len(items) == 200 and all(i["kind"] == "pointwise" for i in items)
    for item in items:
        all_correct = int(item["source_question_id"][1:]) < 100
        assert (item["label"] == positive_label(item["label_style"])) == all_correct
    # The rollout shown is drawn at random, not always the first one.
    assert len({i["source_sample_idx"][0] for i in items}) == 4


def test_empty_answers_are_never_shown_or_used() -> None:
    # All wrong and nothing extracted: no judgment, no reflection.
    assert build_reward_items(make_verified(["eeee", "ssss", "eses"] * 20), cfg(), fmt, 0, 0).num_rows == 0
    # All wrong with a single extracted answer: both items must use that rollout.
    items = build_reward_items(make_verified(["eswe"] * 50), cfg(), fmt, 0, 0).to_pylist()
    assert len(items) == 100 and all(i["source_sample_idx"] == [2] for i in items)
    # Mixed, but every wrong rollout is empty: pairwise and negative pointwise are impossible, so only
    # positive pointwise items remain (the wrong class drawn -> skipped) and no reflection.
    items = build_reward_items(make_verified(["ccee"] * 400), cfg(), fmt, 0, 0).to_pylist()
    assert {i["kind"] for i in items} == {"pointwise"}
    assert all(i["label"] == positive_label(i["label_style"]) for i in items)
    assert within(len(items), 400, 0.3 * 0.5)


def test_unknown_correctness_is_left_out() -> None:
    # Timed-out / errored verifications are dropped from the group: "cctx" is an all-correct group.
    items = build_reward_items(make_verified(["cctx"] * 60 + ["ttxx"] * 10), cfg(), fmt, 0, 5).to_pylist()
    assert len(items) == 60
    assert all(i["kind"] == "pointwise" and i["source_sample_idx"][0] in (0, 1) for i in items)
    assert all(i["label"] == positive_label(i["label_style"]) for i in items)


def test_no_reflection_without_gold() -> None:
    items = build_reward_items(make_verified(["wwww"] * 10, gold=None), cfg(), fmt, 0, 0).to_pylist()
    assert len(items) == 10 and {i["kind"] for i in items} == {"pointwise"}


def test_order_ids_and_pandas_input() -> None:
    verified = make_verified(["ccww", "wwww", "cccc", "cwww"] * 10)
    table = build_reward_items(verified, cfg(), fmt, iteration=12, seed=4)
    ids = table.column("item_id").to_pylist()
    assert ids == [f"it0012-{n:05d}" for n in range(table.num_rows)]
    order = [(q, k == "reflection") for q, k in zip(table.column("source_question_id").to_pylist(),
                                                   table.column("kind").to_pylist())]
    assert order == sorted(order), "rows go by group, judgment before reflection"
    # Unique across iterations.
    other = build_reward_items(verified, cfg(), fmt, iteration=13, seed=4)
    assert not set(ids) & set(other.column("item_id").to_pylist())
    # A pandas frame (shuffled rows) gives the same items as the Arrow table.
    frame = verified.to_pandas().sample(frac=1.0, random_state=0)
    assert build_reward_items(frame, cfg(), fmt, iteration=12, seed=4).equals(table)


def test_bad_input_is_named() -> None:
    verified = make_verified(["ccww"]).drop_columns(["reward"])
    with pytest.raises(ValueError, match="reward"):
        build_reward_items(verified, cfg(), fmt, 0, 0)
    with pytest.raises(TypeError, match="DataFrame"):
        build_reward_items([{"question_id": "q"}], cfg(), fmt, 0, 0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ proportions


@pytest.mark.parametrize(
    "probs",
    [
        {},  # paper defaults: 0.3 pointwise in mixed groups, swap 0.5, yes/no 0.5, cot 0.5, explicit 1/3
        {"pointwise_prob_mixed": 0.8, "pairwise_swap_prob": 0.2, "yes_no_prob": 0.9,
         "reflection_cot_prob": 0.15, "reflection_explicit_prob": 0.7},
    ],
)
def test_proportions(probs: dict[str, float]) -> None:
    c = cfg(**probs)
    n_groups = 3000
    # Lopsided mixed groups: the pointwise class must still be drawn uniformly, not by rollout share.
    verified = make_verified(["cccw"] * (n_groups // 2) + ["cwww"] * (n_groups // 2))
    items = build_reward_items(verified, c, fmt, iteration=0, seed=123).to_pylist()
    judg = [i for i in items if i["kind"] != "reflection"]
    refl = [i for i in items if i["kind"] == "reflection"]
    assert len(judg) == n_groups and len(refl) == n_groups

    point = [i for i in judg if i["kind"] == "pointwise"]
    pair = [i for i in judg if i["kind"] == "pairwise"]
    assert within(len(point), n_groups, c.pointwise_prob_mixed)
    assert within(sum(i["label"] == "B" for i in pair), len(pair), c.pairwise_swap_prob)
    assert within(sum(i["label_style"] == "yes_no" for i in point), len(point), c.yes_no_prob)
    assert within(sum(i["label"] == positive_label(i["label_style"]) for i in point), len(point), 0.5)
    assert within(sum(i["context_mode"] == "cot" for i in refl), n_groups, c.reflection_cot_prob)
    assert within(sum("-explicit-" in i["template_id"] for i in refl), n_groups, c.reflection_explicit_prob)

    # Wordings are drawn uniformly within each family: every template id shows up.
    used = {i["template_id"] for i in items}
    assert {t for t, _ in prompts.PAIRWISE_TEMPLATES} <= used
    for style in ("yes_no", "a_b"):
        assert {t for t, _ in prompts.POINTWISE_TEMPLATES[style]} <= used
    assert {t for fam in prompts.REFLECTION_TEMPLATES.values() for t, _ in fam} <= used


def test_reflection_rollout_is_uniform_among_wrong() -> None:
    items = build_reward_items(make_verified(["cwww"] * 3000), cfg(judgment=False), fmt, 0, 9).to_pylist()
    counts = Counter(i["source_sample_idx"][0] for i in items)
    assert set(counts) == {1, 2, 3}
    assert all(within(counts[k], 3000, 1 / 3) for k in (1, 2, 3))


# ------------------------------------------------------------------------------- caps and switches


def test_caps_subsample() -> None:
    verified = make_verified(["ccww", "cwww", "cccc", "wwww"] * 25)
    full = build_reward_items(verified, cfg(), fmt, 0, seed=3)
    capped = build_reward_items(verified, cfg(max_judgment_items=7, max_reflection_items=5), fmt, 0, seed=3)
    kinds = Counter(capped.column("kind").to_pylist())
    assert kinds["reflection"] == 5 and kinds["pointwise"] + kinds["pairwise"] == 7
    # The kept items are exactly items of the uncapped build (ids aside), spread over the groups.
    def strip(t: pa.Table) -> set[tuple[tuple[str, str], ...]]:
        return {tuple((k, str(v)) for k, v in r.items() if k != "item_id") for r in t.to_pylist()}

    assert strip(capped) <= strip(full)
    assert max(capped.column("source_question_id").to_pylist()) > "q00010"
    none = build_reward_items(verified, cfg(max_judgment_items=0, max_reflection_items=0), fmt, 0, 3)
    assert none.num_rows == 0 and none.schema.equals(REWARD_ITEMS)


def test_switches() -> None:
    verified = make_verified(["ccww", "cwww", "cccc", "wwww"] * 25)
    both = build_reward_items(verified, cfg(), fmt, 0, seed=8).to_pylist()
    only_refl = build_reward_items(verified, cfg(judgment=False), fmt, 0, seed=8).to_pylist()
    only_judg = build_reward_items(verified, cfg(reflection=False), fmt, 0, seed=8).to_pylist()
    assert {i["kind"] for i in only_refl} == {"reflection"}
    assert {i["kind"] for i in only_judg} == {"pointwise", "pairwise"}
    # Switching one kind off leaves the other kind's items unchanged (independent random streams).
    drop_id = lambda rows: [{k: v for k, v in r.items() if k != "item_id"} for r in rows]  # noqa: E731
    assert drop_id(only_refl) == drop_id([i for i in both if i["kind"] == "reflection"])
    assert drop_id(only_judg) == drop_id([i for i in both if i["kind"] != "reflection"])
    assert build_reward_items(verified, cfg(judgment=False, reflection=False), fmt, 0, 8).num_rows == 0


def test_determinism_and_seed_dependence() -> None:
    verified = make_verified(["ccww", "cwww", "cccc", "wwww"] * 25)
    a = build_reward_items(verified, cfg(), fmt, 0, seed=21)
    b = build_reward_items(verified, cfg(), fmt, 0, seed=21)
    c = build_reward_items(verified, cfg(), fmt, 0, seed=22)
    assert a.equals(b)
    assert not a.equals(c)


# ------------------------------------------------------------------------------------------- pool


def items(prefix: str, n: int, extra: bool = False) -> pa.Table:
    rows = [
        {
            "item_id": f"{prefix}-{k:05d}",
            "kind": "pointwise",
            "source_question_id": "q",
            "source_sample_idx": [k],
            "prompt": "p",
            "label": "Yes",
            "context_mode": "both",
            "template_id": "pw-yn-01",
            "label_style": "yes_no",
            "iteration": 0,
        }
        for k in range(n)
    ]
    table = pa.Table.from_pylist(rows, schema=REWARD_ITEMS)
    return table.append_column("extra", pa.array([1] * n)) if extra else table


def ids(table: pa.Table) -> list[str]:
    return table.column("item_id").to_pylist()


def test_pool_fills_then_pops_oldest_first() -> None:
    popped, pool = update_pool(None, items("a", 3), batch_size=4, max_pool_size=100)
    assert popped.num_rows == 0 and popped.schema.equals(REWARD_ITEMS)
    assert ids(pool) == ["a-00000", "a-00001", "a-00002"]
    popped, pool = update_pool(pool, items("b", 3), batch_size=4, max_pool_size=100)
    assert ids(popped) == ["a-00000", "a-00001", "a-00002", "b-00000"]
    assert ids(pool) == ["b-00001", "b-00002"]
    assert pool.schema.equals(REWARD_ITEMS) and popped.schema.equals(REWARD_ITEMS)
    # Exactly a batch: popped whole, nothing left.
    popped, pool = update_pool(pool, items("c", 2), batch_size=4, max_pool_size=100)
    assert ids(popped) == ["b-00001", "b-00002", "c-00000", "c-00001"] and pool.num_rows == 0


def test_pool_drops_oldest_beyond_max() -> None:
    _, pool = update_pool(None, items("a", 5), batch_size=10, max_pool_size=10)
    popped, pool = update_pool(pool, items("b", 4), batch_size=10, max_pool_size=10)
    assert popped.num_rows == 0 and pool.num_rows == 9
    popped, pool = update_pool(pool, items("c", 4), batch_size=4, max_pool_size=6)
    # 13 items -> the oldest 7 are dropped -> [b-00002, b-00003, c-0..3] -> pop 4.
    assert ids(popped) == ["b-00002", "b-00003", "c-00000", "c-00001"]
    assert ids(pool) == ["c-00002", "c-00003"]


def test_pool_schema_and_errors() -> None:
    popped, pool = update_pool(None, items("a", 2, extra=True), batch_size=1, max_pool_size=5)
    assert popped.schema.equals(REWARD_ITEMS) and pool.schema.equals(REWARD_ITEMS)
    assert ids(popped) == ["a-00000"] and ids(pool) == ["a-00001"]
    with pytest.raises(ValueError, match="never fill"):
        update_pool(None, items("a", 2), batch_size=8, max_pool_size=4)
    with pytest.raises(ValueError, match="label"):
        update_pool(None, items("a", 2).drop_columns(["label"]), batch_size=1, max_pool_size=4)
    # An empty build (e.g. both kinds switched off) keeps the pool as it was.
    _, pool = update_pool(None, items("a", 2), batch_size=4, max_pool_size=10)
    popped, pool2 = update_pool(pool, REWARD_ITEMS.empty_table(), batch_size=4, max_pool_size=10)
    assert popped.num_rows == 0 and ids(pool2) == ids(pool)


def test_built_items_go_through_the_pool() -> None:
    built = build_reward_items(make_verified(["ccww"] * 10), cfg(), fmt, iteration=1, seed=0)
    popped, pool = update_pool(None, built, batch_size=8, max_pool_size=64)
    assert ids(popped) == ids(built)[:8] and ids(pool) == ids(built)[8:]


# ---------------------------------------------------------------------------------------- verify


def test_verify_mode() -> None:
    assert verify_mode("reflection") == "math"
    assert verify_mode("pointwise") == "choice"
    assert verify_mode("pairwise") == "choice"
    with pytest.raises(ValueError, match="kind"):
        verify_mode("policy")


def test_item_ids_pattern() -> None:
    table = build_reward_items(make_verified(["ccww"] * 3), cfg(), fmt, iteration=7, seed=0)
    assert all(re.fullmatch(r"it0007-\d{5}", i) for i in ids(table))


def test_balanced_pointwise_labels_subsample_the_larger_class_only() -> None:
    """A mostly-wrong policy (30 all-wrong groups, 10 all-right, 20 mixed): with balancing the pointwise
    items are half 'correct', half 'incorrect'; pairwise and reflection items are exactly those without."""
    verified = make_verified(["wwww"] * 30 + ["cccc"] * 10 + ["cwww"] * 20)
    plain = build_reward_items(verified, cfg(), fmt, iteration=0, seed=5).to_pylist()
    balanced = build_reward_items(verified, cfg(balance_pointwise_labels=True), fmt, iteration=0, seed=5).to_pylist()

    def classes(rows: list[dict[str, Any]]) -> Counter:
        return Counter(r["label"] == positive_label(r["label_style"]) for r in rows if r["kind"] == "pointwise")

    before, after = classes(plain), classes(balanced)
    assert before[False] > 2 * before[True] > 0, before  # the paper's rule: mostly 'incorrect'
    assert after[True] == after[False] == before[True], after

    def others(rows: list[dict[str, Any]]) -> list[tuple]:
        return [(r["kind"], r["source_question_id"], tuple(r["source_sample_idx"]), r["prompt"], r["label"])
                for r in rows if r["kind"] != "pointwise"]

    assert others(balanced) == others(plain)
    kept = {(r["source_question_id"], r["prompt"]) for r in plain}
    assert all((r["source_question_id"], r["prompt"]) in kept for r in balanced)  # a subset, never new items
