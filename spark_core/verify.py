"""Rule-based rewards: is the last ``\\boxed{}`` answer of a completion right?

Two checks, as in SPARK (no format reward):

* ``verify`` (math): the last boxed answer is compared with the gold answer by HF Math-Verify,
  with a normalised-string / exact-number fallback (``8.0`` = ``8``, ``1,000`` = ``1000``).
* ``verify_choice`` (judgment items): the last boxed answer, normalised (``\\text{Yes}``, ``(A)``,
  ``**B**`` ...), must equal the label ``Yes``, ``No``, ``A`` or ``B``.

These are the pure rules. ``verify`` runs in the calling process without any timeout: Math-Verify's own
timeouts use ``signal.alarm``, which raises (or silently scores 0) outside the main thread, and Prefect
runs tasks in threads. For many or untrusted completions use ``spark_core.verify_pool.verify_batch``,
which applies these rules in a pool of worker processes with a wall-clock limit per item.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any

__all__ = [
    "STATUSES",
    "CHOICE_LABELS",
    "VerifyResult",
    "extract_boxed",
    "normalize_answer",
    "verify",
    "verify_choice",
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
# `\box{` is accepted too: the SPARK reference code's judgment prompts ask for it.
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


def quick_math(answer: str | None, gold: str) -> VerifyResult | None:
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


def math_reward(answer: str, gold: str) -> float:
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
        math_reward(answer, gold)


def verify(completion: str, gold: str) -> VerifyResult:
    """Is the last boxed answer of ``completion`` mathematically equal to ``gold``?

    Runs in this process with **no time limit**, from any thread. Model output and any other untrusted
    input goes through :func:`spark_core.verify_pool.verify_batch` instead: a crafted answer can keep the
    symbolic parser busy for minutes (or for ever), and only ``verify_batch`` bounds each item's
    wall-clock time (``timeout_s``) by running it in a worker process that is killed when it overruns.
    """
    answer = extract_boxed(completion)
    quick = quick_math(answer, gold)
    if quick is not None:
        return quick
    assert answer is not None  # _quick_math answers every None
    try:
        return VerifyResult(math_reward(answer, gold), answer, "ok")
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
