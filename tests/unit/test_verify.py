"""Rule-based rewards: boxed extraction, math/choice checks, and the process pool's timeouts."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from spark_core import verify_pool as verify_mod
from spark_core.verify import (
    VerifyResult,
    extract_boxed,
    verify,
    verify_choice,
)
from spark_core.verify_pool import shutdown_pool, verify_batch

TOWER = "\\boxed{9^{9^{9^{9}}}}"
HUGE_EXPR = "\\boxed{" + "1+" * 600_000 + "1}"  # 1.2 MB that SymPy cannot finish in time


@pytest.fixture(scope="module", autouse=True)
def _stop_pool_after_module() -> Iterator[None]:
    yield
    shutdown_pool()


# ---------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{a^{b^{c}}}", "a^{b^{c}}"),
        ("\\boxed{\\{1, \\{2\\}\\}}", "\\{1, \\{2\\}\\}"),  # escaped braces do not close the box
        ("\\box{Yes}", "Yes"),
        ("\\boxed {7}", "7"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\boxed{3}}", "3"),
        ("\\boxed{}", ""),
        ("\\boxed{1} and then \\boxed{2", None),  # last box unclosed (truncated)
        ("\\fbox{3}", None),
        ("no box here", None),
        ("", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "x" * 2_000_000 + "\\boxed{5}",
        "\\boxed{" + "{" * 1_000_000,
        "\\boxed{" * 300_000,
        "\\box" * 500_000,
        "\\boxed{" + "{}" * 500_000 + "}",
        "\\boxed{" + "\\{" * 500_000 + "}",
    ],
)
def test_extract_boxed_is_fast_on_megabytes(text: str) -> None:
    start = time.perf_counter()
    extract_boxed(text)
    assert time.perf_counter() - start < 3.0  # a quadratic scan would take hours


# --------------------------------------------------------------------------------- math checks
@pytest.mark.parametrize(
    ("completion", "gold", "reward"),
    [
        ("so \\boxed{1/2}", "0.5", 1.0),
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\frac{1}{2}}", "1/2", 1.0),
        ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
        ("\\boxed{8.0}", "8", 1.0),
        ("\\boxed{1,000}", "1000", 1.0),
        ("\\boxed{1000}", "1,000", 1.0),
        ("\\boxed{+5}", "5", 1.0),
        ("\\boxed{$42$.}", "42", 1.0),
        ("\\boxed{\\text{Monday}}", "Monday", 1.0),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", 1.0),
        ("\\boxed{x+1}", "1+x", 1.0),
        ("\\boxed{12}", "The answer is \\boxed{12}", 1.0),
        ("\\boxed{3}", "4", 0.0),
        ("\\boxed{1/3}", "0.5", 0.0),
        ("\\boxed{2x}", "x^2", 0.0),
        ("\\boxed{1,001}", "1000", 0.0),
        ("\\boxed{\\text{Tuesday}}", "Monday", 0.0),
        ("\\boxed{4} wait, no: \\boxed{3}", "4", 0.0),
    ],
)
def test_math_equivalence(completion: str, gold: str, reward: float) -> None:
    result = verify(completion, gold)
    assert result.status == "ok"
    assert result.reward == reward


@pytest.mark.parametrize(
    ("completion", "answer"),
    [("I am not sure.", None), ("\\boxed{}", ""), ("\\boxed{ }", " "), ("\\boxed{5", None)],
)
def test_missing_answer_is_no_answer(completion: str, answer: str | None) -> None:
    assert verify(completion, "5") == VerifyResult(0.0, answer, "no_answer")


def test_result_is_frozen_and_carries_answer() -> None:
    result = verify("\\boxed{\\frac{2}{4}}", "0.5")
    assert result == VerifyResult(1.0, "\\frac{2}{4}", "ok")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.reward = 0.0  # type: ignore[misc]


# ------------------------------------------------------------------------------- choice checks
@pytest.mark.parametrize(
    ("completion", "label", "reward"),
    [
        ("\\boxed{Yes}", "Yes", 1.0),
        ("\\boxed{\\text{Yes}}", "Yes", 1.0),
        ("\\boxed{yes}", "Yes", 1.0),
        ("\\boxed{ NO. }", "No", 1.0),
        ("\\boxed{(A)}", "A", 1.0),
        ("\\boxed{A.}", "A", 1.0),
        ("**\\boxed{**B**}**", "B", 1.0),
        ("\\box{\\textbf{B}}", "B", 1.0),
        ("\\boxed{\\text{(B)}}", "B", 1.0),
        ("\\boxed{A}", "B", 0.0),
        ("\\boxed{Yes}", "No", 0.0),
        ("\\boxed{Option A}", "A", 0.0),
        ("\\boxed{A and B}", "A", 0.0),
        ("\\boxed{A} on reflection \\boxed{B}", "A", 0.0),
    ],
)
def test_choice(completion: str, label: str, reward: float) -> None:
    result = verify_choice(completion, label)
    assert (result.reward, result.status) == (reward, "ok")


def test_choice_statuses_and_bad_label() -> None:
    assert verify_choice("I think it is correct", "Yes") == VerifyResult(0.0, None, "no_answer")
    with pytest.raises(ValueError, match="Yes, No, A, B"):
        verify_choice("\\boxed{C}", "C")


# ------------------------------------------------------------------------------------ batches
MIXED = [
    ("\\boxed{1/2}", "0.5", "math"),
    ("\\boxed{x+1}", "1+x", "math"),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{1}{\\sqrt{2}}", "math"),
    ("\\boxed{2x}", "x^2", "math"),
    ("\\boxed{8.0}", "8", "math"),
    ("\\boxed{7}", "8", "math"),
    ("nothing boxed", "8", "math"),
    ("\\boxed{x+1}", "1+x", "math"),  # a duplicate pair is checked once
    ("\\boxed{(A)}", "A", "choice"),
    ("\\boxed{\\text{No}}", "Yes", "choice"),
    ("no verdict", "No", "choice"),
]


def _singles() -> list[VerifyResult]:
    return [verify(c, g) if m == "math" else verify_choice(c, g) for c, g, m in MIXED]


def _batch() -> list[VerifyResult]:
    completions, golds, modes = map(list, zip(*MIXED))
    return verify_batch(completions, golds, modes, timeout_s=10.0, processes=2)


def test_batch_matches_single_results() -> None:
    expected = _singles()
    assert [r.reward for r in expected] == [1, 1, 1, 0, 1, 0, 0, 1, 1, 0, 0]
    assert _batch() == expected


def test_batch_from_threads_matches_main_thread() -> None:
    """Prefect runs tasks in threads, where Math-Verify's signal-based timeouts cannot work."""
    expected = _batch()
    outputs: list[list[VerifyResult]] = []
    singles: list[list[VerifyResult]] = []
    threads = [threading.Thread(target=lambda: outputs.append(_batch())) for _ in range(2)]
    threads.append(threading.Thread(target=lambda: singles.append(_singles())))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert outputs == [expected, expected]
    assert singles == [expected]


def test_batch_validates_arguments() -> None:
    assert verify_batch([], []) == []
    with pytest.raises(ValueError, match="golds"):
        verify_batch(["a"], [])
    with pytest.raises(ValueError, match="mode"):
        verify_batch(["\\boxed{1}"], ["1"], modes=["exact"])
    with pytest.raises(ValueError, match="timeout_s"):
        verify_batch(["\\boxed{1}"], ["1"], timeout_s=0)


def test_adversarial_items_time_out_in_bounded_time() -> None:
    """Items that would never finish time out; the ordinary ones beside them in the batch are still
    checked. The per-item limit (5 s) is many times what the ordinary items need, so a loaded machine
    cannot turn them into timeouts (with 1 s, a 1.5 MB answer could time out under load)."""
    completions = [TOWER, HUGE_EXPR, "x" * 1_500_000 + "\\boxed{7}", "\\boxed{x+1}", TOWER]
    golds = ["3", "3", "7", "1+x", "3"]
    start = time.monotonic()
    results = verify_batch(completions, golds, timeout_s=5.0, processes=2)
    elapsed = time.monotonic() - start
    assert results[0] == VerifyResult(0.0, "9^{9^{9^{9}}}", "timeout")
    assert results[1].status in ("timeout", "error") and results[1].reward == 0.0
    assert results[2] == VerifyResult(1.0, "7", "ok")
    assert results[3] == VerifyResult(1.0, "x+1", "ok")
    assert results[4] == results[0]
    # Bounded, not fast: 3 slow items at about 5 s each on 2 workers plus worker start-up; without the
    # limit the tower would never finish.
    assert elapsed < 180, elapsed


def test_stuck_worker_is_killed_and_replaced() -> None:
    """A worker that cannot run its own timer (here: stopped) is killed at the wall-clock deadline."""
    warm = verify_batch(["\\boxed{x+2}", "\\boxed{y+2}"], ["2+x", "2+y"], processes=2)
    assert [r.reward for r in warm] == [1, 1]
    pool = verify_mod._POOL
    assert pool is not None
    stuck = pool.pids()
    assert stuck
    for pid in stuck:
        os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    results = verify_batch(["\\boxed{x+3}", "\\boxed{z+1}"], ["3+x", "1+z"], timeout_s=0.5, processes=2)
    elapsed = time.monotonic() - start
    assert [r.status for r in results] == ["timeout", "timeout"]
    assert elapsed < 60, elapsed  # bounded (stopped workers never answer), with room for a loaded machine
    assert not set(stuck) & set(pool.pids())
    # The next batch runs on fresh workers.
    assert verify_batch(["\\boxed{x+3}", "\\boxed{z+1}"], ["3+x", "1+z"], processes=2) == [
        VerifyResult(1.0, "x+3", "ok"),
        VerifyResult(1.0, "z+1", "ok"),
    ]


def test_shutdown_then_reuse() -> None:
    shutdown_pool()
    assert verify_mod._POOL is None
    assert verify_batch(["\\boxed{a+b}"], ["b+a"]) == [VerifyResult(1.0, "a+b", "ok")]
    assert verify_mod._POOL is not None


def test_workers_that_died_between_batches_are_replaced() -> None:
    verify_batch(["\\boxed{x+4}", "\\boxed{y+4}"], ["4+x", "4+y"], processes=2)
    pool = verify_mod._POOL
    assert pool is not None
    for worker in list(pool.workers):
        worker.proc.kill()
        worker.proc.join(timeout=10)
    results = verify_batch(["\\boxed{x+5}", "\\boxed{y+5}"], ["5+x", "5+y"], processes=2)
    assert results == [VerifyResult(1.0, "x+5", "ok"), VerifyResult(1.0, "y+5", "ok")]
