"""Rule-based rewards: is the last ``\\boxed{}`` answer of a completion right?

Two checks, as in SPARK (no format reward):

* ``verify`` (math): the last boxed answer is compared with the gold answer by HF Math-Verify,
  with a normalised-string / exact-number fallback (``8.0`` = ``8``, ``1,000`` = ``1000``).
* ``verify_choice`` (judgment items): the last boxed answer, normalised (``\\text{Yes}``, ``(A)``,
  ``**B**`` ...), must equal the label ``Yes``, ``No``, ``A`` or ``B``.

``verify`` runs in the calling process without any timeout: Math-Verify's own timeouts use
``signal.alarm``, which raises (or silently scores 0) outside the main thread, and Prefect runs tasks in
threads. For many or untrusted completions use ``verify_batch``: it checks items in a persistent pool of
worker processes (forkserver, or spawn where forkserver is missing) with a wall-clock limit per item. A
worker interrupts a slow item itself (a timer signal in its own main thread); a worker stuck in C code
that ignores signals is killed and replaced. Code that calls ``verify_batch`` from a script must guard
its entry point with ``if __name__ == "__main__":`` (workers re-import the main module, as usual for
non-fork multiprocessing).
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from multiprocessing.connection import Connection, wait
from typing import Any

__all__ = [
    "STATUSES",
    "CHOICE_LABELS",
    "VerifyResult",
    "extract_boxed",
    "normalize_answer",
    "verify",
    "verify_choice",
    "verify_batch",
    "shutdown_pool",
    "warm_up",
]

STATUSES = ("ok", "no_answer", "timeout", "error")
CHOICE_LABELS = ("Yes", "No", "A", "B")
MODES = ("math", "choice")


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of checking one completion.

    ``reward`` is 1.0 or 0.0; ``answer`` is the extracted boxed content (None when there is none);
    ``status`` is one of ``STATUSES``: ``ok`` (checked), ``no_answer`` (no usable ``\\boxed{}``),
    ``timeout`` (the check ran past its wall-clock limit), ``error`` (the checker failed).
    """

    reward: float
    answer: str | None
    status: str


# ------------------------------------------------------------------------------------ extraction
# `\box{` is accepted too: the reference code's judgment prompts ask for it (see SPARK.md).
_OPENER = re.compile(r"\\box(?:ed)?[ \t]*\{")
# An escaped character (`\{`, `\}`, `\\`) is skipped so that literal braces do not count; runs of the
# same brace are one token, so deep nesting costs one step per run, not per brace.
_BRACE_TOKEN = re.compile(r"\\.|\{+|\}+", re.S)


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\box{...}``) in ``text``; None if absent or unclosed.

    Nested braces are matched; one pass over the text, so megabyte strings are cheap.
    """
    end = len(text)
    while True:  # search backwards: the last opener is usually near the end
        pos = text.rfind("\\box", 0, end)
        if pos < 0:
            return None
        opener = _OPENER.match(text, pos)
        if opener is not None:
            break
        end = pos
    depth = 1
    start = opener.end()
    for tok in _BRACE_TOKEN.finditer(text, start):
        first = text[tok.start()]
        if first == "{":
            depth += tok.end() - tok.start()
        elif first == "}":
            run = tok.end() - tok.start()
            if run >= depth:
                return text[start : tok.start() + depth - 1]
            depth -= run
    return None  # the last box was never closed (e.g. a truncated completion)


# --------------------------------------------------------------------------------- normalisation
# Wrappers whose argument is the answer itself; only innermost (brace-free) ones are unwrapped per pass.
_WRAPPER = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|boxed|box)[ \t]*\{([^{}]*)\}"
)
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad(?![a-zA-Z])|~")
_SIZING = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])")
_WHITESPACE = re.compile(r"\s+")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")
_INTEGER = re.compile(r"-?\d+")
_SLASH_FRACTION = re.compile(r"(-?\d+)/(\d+)")
_LATEX_FRACTION = re.compile(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(\d+)\}")
_WRAPPER_PASSES = 4  # bounded so that deeply nested input stays linear
_NUMBER_MAX_CHARS = 64  # longer "numbers" are left to Math-Verify (and never reach int())
_QUICK_MAX_CHARS = 2000  # the parent's cheap path leaves longer answers to the workers


def normalize_answer(text: str) -> str:
    """Canonical string form used by the fallback comparison.

    Unwraps ``\\text{}``-like wrappers, drops ``$``, spacing commands, ``\\left``/``\\right`` and all
    whitespace, a trailing ``.``, a leading ``+`` and thousands separators of a plain number, and writes
    ``\\dfrac`` as ``\\frac``.
    """
    s = _unwrap(text)
    s = s.replace("$", "")
    s = _SPACING.sub("", s)
    s = _SIZING.sub("", s)
    s = _WHITESPACE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.rstrip(".")
    if s.startswith("+"):
        s = s[1:]
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def _as_number(norm: str) -> Fraction | None:
    """Exact value of a normalised plain number (``-3``, ``0.50``, ``1/2``, ``\\frac{1}{2}``), else None."""
    if not norm or len(norm) > _NUMBER_MAX_CHARS:
        return None
    if _DECIMAL.fullmatch(norm):
        return Fraction(norm)  # exact: "0.1" is 1/10, no float rounding
    if m := _SLASH_FRACTION.fullmatch(norm):
        num, den = int(m.group(1)), int(m.group(2))
        return Fraction(num, den) if den else None
    if m := _LATEX_FRACTION.fullmatch(norm):
        num, den = int(m.group(2)), int(m.group(3))
        if not den:
            return None
        return -Fraction(num, den) if m.group(1) else Fraction(num, den)
    return None


def _normalized_match(a: str, g: str) -> bool:
    """The fallback on normalised strings: equal and non-empty, or equal exact numbers."""
    if a and a == g:
        return True
    a_num = _as_number(a)
    return a_num is not None and a_num == _as_number(g)


def _gold_answer(gold: str) -> str:
    """Gold labels may be plain (``42``), LaTeX, or themselves carry a ``\\boxed{}``."""
    if "\\box" in gold:
        boxed = extract_boxed(gold)
        if boxed is not None:
            return boxed
    return gold


# ----------------------------------------------------------------------------------- math checks
class _MathVerifyLogFilter(logging.Filter):
    """Drops Math-Verify's one-time 'Timeout is disabled' warning: here timeouts are handled outside."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_MathVerifyLogFilter())


def _quick_math(answer: str | None, gold: str) -> VerifyResult | None:
    """Cheap, time-bounded verdicts that need no SymPy; None when Math-Verify must decide.

    Decides: no answer; fallback-equal strings or numbers (reward 1); two different plain integers
    (reward 0, which Math-Verify would also give). Everything else goes to ``_math_reward``.
    """
    if answer is None or not answer.strip():
        return VerifyResult(0.0, answer, "no_answer")
    gold_ans = _gold_answer(gold)
    if len(answer) > _QUICK_MAX_CHARS or len(gold_ans) > _QUICK_MAX_CHARS:
        return None
    a, g = normalize_answer(answer), normalize_answer(gold_ans)
    if _normalized_match(a, g):
        return VerifyResult(1.0, answer, "ok")
    if _INTEGER.fullmatch(a) and _INTEGER.fullmatch(g) and len(a) <= 15 and len(g) <= 15:
        return VerifyResult(0.0, answer, "ok")  # below 1e15 Math-Verify compares integers exactly
    return None


@lru_cache(maxsize=4096)
def _parse_gold(gold_ans: str) -> tuple[Any, ...]:
    """Math-Verify parse of a gold answer, cached: K rollouts of a question share one gold."""
    import math_verify

    return tuple(math_verify.parse("\\boxed{" + gold_ans + "}", parsing_timeout=None))


def _math_reward(answer: str, gold: str) -> float:
    """Math-Verify equivalence (timeouts off: the caller bounds time), then the string fallback."""
    import math_verify

    gold_ans = _gold_answer(gold)
    gold_parsed = list(_parse_gold(gold_ans))
    if gold_parsed:
        pred = math_verify.parse("\\boxed{" + answer + "}", parsing_timeout=None)
        if pred and math_verify.verify(gold_parsed, pred, timeout_seconds=None):
            return 1.0
    return 1.0 if _normalized_match(normalize_answer(answer), normalize_answer(gold_ans)) else 0.0


# One of each common answer shape. Math-Verify's LaTeX parser builds its prediction tables lazily and
# SymPy caches as it goes, so a cold process pays ~0.1-1 s on the first answer of each shape.
_WARM_UP_PAIRS = (
    ("1", "1"),
    ("0.5", "\\frac{1}{2}"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("\\frac{2\\pi}{3}", "\\frac{2}{3}\\pi"),
    ("x^2+3x+2", "(x+1)(x+2)"),
    ("x=3", "3"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("(1,2]", "(1,2]"),
    ("50\\%", "0.5"),
    ("\\text{Monday}", "Monday"),
    ("2^{10}", "1024"),
)


def warm_up() -> None:
    """Check one answer of each common shape so that later checks in this process start warm.

    The verify forkserver runs this once (``spark_core._verify_warmup``), and every worker forked from
    it inherits the warm state; a worker started another way warms itself.
    """
    for answer, gold in _WARM_UP_PAIRS:
        _math_reward(answer, gold)


def verify(completion: str, gold: str) -> VerifyResult:
    """Is the last boxed answer of ``completion`` mathematically equal to ``gold``?

    Runs in this process with no timeout, from any thread; use ``verify_batch`` for untrusted input.
    """
    answer = extract_boxed(completion)
    quick = _quick_math(answer, gold)
    if quick is not None:
        return quick
    assert answer is not None  # _quick_math answers every None
    try:
        return VerifyResult(_math_reward(answer, gold), answer, "ok")
    except Exception:  # a parser bug must cost one item, not the batch
        logging.getLogger(__name__).debug("math check failed", exc_info=True)
        return VerifyResult(0.0, answer, "error")


# --------------------------------------------------------------------------------- choice checks
_CHOICE_STRIP = re.compile(r"[*$\s]|\\[,;:! ]")
_CHOICE_EDGES = "()[]{}.:;,!"
_CHOICE_CANON = {"yes": "Yes", "no": "No", "a": "A", "b": "B"}


def _unwrap(text: str) -> str:
    """Strip `\\text{...}`-like wrappers, nested ones included (bounded passes)."""
    s = text
    for _ in range(_WRAPPER_PASSES):
        unwrapped = _WRAPPER.sub(r"\1", s)
        if unwrapped == s:
            break
        s = unwrapped
    return s


_CHOICE_MAX_CHARS = 200  # a label is a word; longer boxes are wrong without further work


def _normalize_choice(text: str) -> str:
    s = _CHOICE_STRIP.sub("", _unwrap(text))
    return s.strip(_CHOICE_EDGES).casefold()


def _choice_label(label: str) -> str:
    canon = _CHOICE_CANON.get(_normalize_choice(label))
    if canon is None:
        raise ValueError(f"choice label must be one of {', '.join(CHOICE_LABELS)}; got {label!r}")
    return canon


def verify_choice(completion: str, label: str) -> VerifyResult:
    """Does the last boxed answer, normalised (``\\text{Yes}``, ``(A)``, ``A.``, ``**B**``), equal ``label``?

    ``label`` is one of ``Yes``, ``No``, ``A``, ``B`` (a ValueError otherwise). Case is ignored.
    """
    canon = _choice_label(label)
    answer = extract_boxed(completion)
    if answer is None or not answer.strip():
        return VerifyResult(0.0, answer, "no_answer")
    if len(answer) > _CHOICE_MAX_CHARS:
        return VerifyResult(0.0, answer, "ok")
    return VerifyResult(1.0 if _CHOICE_CANON.get(_normalize_choice(answer)) == canon else 0.0, answer, "ok")


# ----------------------------------------------------------------------------------- worker side
class _SoftTimeout(BaseException):
    """Raised by the worker's timer; a BaseException so that Math-Verify's `except Exception` passes it on."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _SoftTimeout


def _worker_main(conn: Connection) -> None:
    """Worker loop: receive ``(timeout_s, [(key, answer, gold), ...])``, send ``(key, reward, status)`` per item."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    signal.signal(signal.SIGALRM, _on_alarm)
    warm_up()  # milliseconds when inherited warm from the forkserver; otherwise done before "ready"
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        timeout_s, items = message
        for key, answer, gold in items:
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
                try:
                    reward, status = _math_reward(answer, gold), "ok"
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _SoftTimeout:
                reward, status = 0.0, "timeout"
            except Exception:
                reward, status = 0.0, "error"
            conn.send((key, reward, status))


# ----------------------------------------------------------------------------------- parent side
_START_TIMEOUT_S = 120.0  # a worker that is not ready by then is a broken environment, not a slow item
_MAX_START_FAILURES = 3
_CHUNK_MAX_ITEMS = 32
_CHUNK_MAX_CHARS = 1 << 20  # a megabyte answer travels (nearly) alone instead of delaying a chunk


def _hard_limit(timeout_s: float) -> float:
    """When the parent kills a worker: after its own timer had a fair chance to fire."""
    return timeout_s + max(0.5, 0.25 * timeout_s)


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))  # respects taskset/cgroup CPU pinning
    return os.cpu_count() or 1


@dataclass
class _Worker:
    proc: Any  # multiprocessing.Process of the chosen context
    conn: Connection
    started_at: float
    ready: bool = False
    inflight: deque = field(default_factory=deque)  # items sent and not yet answered
    item_started_at: float = 0.0


class _Pool:
    """Worker processes with per-item wall-clock deadlines; workers that overrun are killed and replaced."""

    def __init__(self) -> None:
        methods = multiprocessing.get_all_start_methods()
        # Never fork the caller: it may run threads (Prefect), and a forked copy of a threaded process can
        # deadlock. The forkserver is a fresh single-threaded process; it imports and warms Math-Verify
        # once, so each (re)started worker forked from it is ready in milliseconds. (If another library
        # started the forkserver first, the preload does not apply and workers warm themselves.)
        if "forkserver" in methods:
            self.ctx = multiprocessing.get_context("forkserver")
            self.ctx.set_forkserver_preload(["spark_core._verify_warmup"])
        else:
            self.ctx = multiprocessing.get_context("spawn")
        self.workers: list[_Worker] = []
        self.start_failures = 0  # workers lost before "ready" since the last one that made it

    def _start_worker(self) -> None:
        parent_conn, child_conn = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=_worker_main, args=(child_conn,), daemon=True, name="spark-verify")
        proc.start()
        child_conn.close()  # so that the parent sees EOF when the worker dies
        self.workers.append(_Worker(proc=proc, conn=parent_conn, started_at=time.monotonic()))

    def _remove(self, worker: _Worker) -> None:
        if worker.proc.is_alive():
            worker.proc.kill()
        worker.proc.join(timeout=5)
        worker.conn.close()
        self.workers.remove(worker)

    def pids(self) -> list[int]:
        """Process ids of the live workers (for diagnostics and tests)."""
        return [w.proc.pid for w in self.workers if w.proc.is_alive()]

    def shutdown(self) -> None:
        for worker in list(self.workers):
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in list(self.workers):
            worker.proc.join(timeout=1)
            self._remove(worker)

    def run(
        self, items: list[tuple[int, str, str]], timeout_s: float, processes: int
    ) -> dict[int, tuple[float, str]]:
        """Check ``(key, answer, gold)`` items; returns ``{key: (reward, status)}`` for every key."""
        try:
            return self._run(items, timeout_s, processes)
        except BaseException:
            # Busy workers would later answer for keys of this abandoned batch: they must not survive.
            for worker in [w for w in self.workers if w.inflight or not w.ready]:
                self._remove(worker)
            raise

    def _run(
        self, items: list[tuple[int, str, str]], timeout_s: float, processes: int
    ) -> dict[int, tuple[float, str]]:
        results: dict[int, tuple[float, str]] = {}
        queue: deque[tuple[int, str, str]] = deque(items)
        size = max(1, min(processes, len(items)))
        chunk_items = max(1, min(_CHUNK_MAX_ITEMS, math.ceil(len(items) / (size * 4))))
        hard = _hard_limit(timeout_s)

        while len(results) < len(items):
            # (Re)start workers lazily: a batch of 3 slow items needs at most 3 processes.
            while len(self.workers) < size and queue:
                self._start_worker()
            active = self.workers[:size]
            for worker in active:
                if worker.ready and not worker.inflight and queue:
                    chunk = self._take_chunk(queue, chunk_items)
                    worker.inflight.extend(chunk)
                    worker.item_started_at = time.monotonic()
                    try:
                        worker.conn.send((timeout_s, chunk))
                    except OSError:  # it died while idle (killed from outside): nothing was started
                        worker.inflight.clear()
                        queue.extendleft(reversed(chunk))
                        self._remove(worker)
            active = self.workers[:size]

            deadlines = [
                w.item_started_at + hard if w.ready else w.started_at + _START_TIMEOUT_S
                for w in active
                if w.inflight or not w.ready
            ]
            if not deadlines:  # every active worker was just removed: start fresh ones
                continue
            wait_s = max(0.0, min(deadlines) - time.monotonic())
            wait([w.conn for w in active] + [w.proc.sentinel for w in active], timeout=wait_s)

            for worker in list(active):
                self._drain(worker, results)
            now = time.monotonic()
            for worker in list(active):
                dead = not worker.proc.is_alive()
                if not worker.ready:
                    if dead or now - worker.started_at > _START_TIMEOUT_S:
                        code = worker.proc.exitcode
                        self._remove(worker)
                        # One loss may be a kill from outside; repeated ones mean a broken environment.
                        self.start_failures += 1
                        if self.start_failures >= _MAX_START_FAILURES:
                            raise RuntimeError(
                                f"verify workers failed to start {self.start_failures} times in a row "
                                f"(last exit code {code}); run `python -c 'import math_verify'` to see why"
                            )
                    continue
                overdue = bool(worker.inflight) and now - worker.item_started_at > hard
                if dead or overdue:
                    # The item in progress is the culprit; the rest of its chunk is re-queued.
                    if worker.inflight:
                        key = worker.inflight.popleft()[0]
                        results[key] = (0.0, "timeout" if overdue and not dead else "error")
                        queue.extendleft(reversed(worker.inflight))
                        worker.inflight.clear()
                    self._remove(worker)
        return results

    @staticmethod
    def _take_chunk(queue: deque, max_items: int) -> list[tuple[int, str, str]]:
        chunk = [queue.popleft()]
        chars = len(chunk[0][1]) + len(chunk[0][2])
        while queue and len(chunk) < max_items:
            nxt_chars = len(queue[0][1]) + len(queue[0][2])
            if chars + nxt_chars > _CHUNK_MAX_CHARS:
                break
            chunk.append(queue.popleft())
            chars += nxt_chars
        return chunk

    def _drain(self, worker: _Worker, results: dict[int, tuple[float, str]]) -> None:
        """Read every message the worker has sent so far."""
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if message[0] == "ready":
                    worker.ready = True
                    self.start_failures = 0
                    continue
                key, reward, status = message
                if worker.inflight and worker.inflight[0][0] == key:
                    worker.inflight.popleft()
                results[key] = (reward, status)
                worker.item_started_at = time.monotonic()
        except (EOFError, OSError):
            pass  # the worker died; the caller sees it through is_alive()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()  # one batch at a time: callers in several threads share the workers


def shutdown_pool() -> None:
    """Stop the worker processes (registered atexit; the next ``verify_batch`` starts new ones)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.shutdown()
            _POOL = None


atexit.register(shutdown_pool)


def verify_batch(
    completions: Sequence[str],
    golds: Sequence[str],
    modes: Sequence[str] | None = None,
    timeout_s: float = 5.0,
    processes: int | None = None,
) -> list[VerifyResult]:
    """Check many completions: ``verify`` (mode ``math``) or ``verify_choice`` (mode ``choice``) per item.

    Safe from any thread. Each math item that needs Math-Verify runs in a worker process under a
    wall-clock limit of ``timeout_s`` seconds; an item over it gets status ``timeout``. Cheap verdicts
    (no box, equal strings or numbers, choice labels) are made here without any IPC, and identical
    (answer, gold) pairs are checked once. ``processes`` defaults to the number of usable CPUs.
    """
    global _POOL
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
    if modes is None:
        modes = ["math"] * len(completions)
    elif len(modes) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(modes)} modes")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    workers = _usable_cpus() if processes is None else processes
    if workers < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")

    out: list[VerifyResult | None] = [None] * len(completions)
    slow: dict[tuple[str, str], list[int]] = {}  # (answer, gold) -> item indices
    for i, (completion, gold, mode) in enumerate(zip(completions, golds, modes)):
        if mode == "choice":
            out[i] = verify_choice(completion, gold)
        elif mode == "math":
            answer = extract_boxed(completion)
            quick = _quick_math(answer, gold)
            if quick is not None:
                out[i] = quick
            else:
                assert answer is not None  # _quick_math answers every missing answer
                slow.setdefault((answer, gold), []).append(i)
        else:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r} at index {i}")

    if slow:
        keyed = list(slow.items())
        items = [(k, answer, gold) for k, ((answer, gold), _) in enumerate(keyed)]
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = _Pool()
            verdicts = _POOL.run(items, float(timeout_s), workers)
        for k, ((answer, _gold), indices) in enumerate(keyed):
            reward, status = verdicts[k]
            for i in indices:
                out[i] = VerifyResult(reward, answer, status)
    return out  # type: ignore[return-value]
