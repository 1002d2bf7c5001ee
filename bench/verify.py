"""Benchmark: ``verify_batch`` (process pool, timeouts on) vs a plain Math-Verify loop.

Builds synthetic rollouts shaped like a SPARK policy phase (questions x K rollouts; right and wrong
answers in several equivalent notations, some without a boxed answer, a few adversarial ones), times

* baseline: one process, ``math_verify.verify(math_verify.parse(f"${gold}$"), math_verify.parse(completion))``
  per item with Math-Verify's default signal-based timeouts (what a user would write; main thread only);
* ``spark_core.verify.verify_batch(..., timeout_s=5)``: the project's checker,

on the same data in the same run, reports how often their rewards disagree (and why), and prints a
Markdown table. Usage: ``python bench/verify.py [--n 10000] [--processes N] [--adversarial 4]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

import math_verify

from spark_core import verify_pool as verify_mod
from spark_core.verify import normalize_answer
from spark_core.verify_pool import shutdown_pool, verify_batch

FILLER = [
    "First we write down what is given.",
    "Let $x$ be the unknown quantity, so the condition reads $2x + {a} = {b}$.",
    "Multiplying both sides by {a} gives ${a} \\cdot {b} = {c}$.",
    "We check the small cases $n = 1, 2, 3$ to see the pattern.",
    "Subtracting, we get ${c} - {a} = {d}$, which is consistent.",
    "By the Pythagorean theorem, $a^2 + b^2 = c^2$ with $a = {a}$.",
    "Hence the sum of the first {a} terms is $\\frac{{{a}({a}+1)}}{{2}}$.",
    "Wait, let me double-check the arithmetic: {b} + {c} = {e}.",
]


@dataclass(frozen=True)
class Question:
    gold: str
    right: tuple[str, ...]  # notations of the right answer that a model might box
    wrong: tuple[str, ...]  # a few plausible wrong answers (models repeat their mistakes)


def _integer_question(rng: random.Random) -> Question:
    v = rng.choice([rng.randint(2, 99), rng.randint(100, 999), rng.randint(1000, 99999)])
    right = [str(v), f"{v}.0", f"+{v}", f"\\text{{{v}}}", f"{v}."]
    if v >= 1000:
        right.append(f"{v:,}")
    wrong = (str(v + 1), str(v - 1), str(2 * v), f"{v / 10:g}")
    return Question(str(v), tuple(right), wrong)


def _fraction_question(rng: random.Random) -> Question:
    den = rng.choice([2, 3, 4, 5, 6, 8, 12])
    num = rng.choice([k for k in range(1, 3 * den) if Fraction(k, den).denominator == den])
    right = [f"\\frac{{{num}}}{{{den}}}", f"{num}/{den}", f"\\dfrac{{{num}}}{{{den}}}"]
    if den in (2, 4, 5, 8):
        right.append(f"{num / den:g}")
    wrong = (f"\\frac{{{den}}}{{{num}}}", f"\\frac{{{num + 1}}}{{{den}}}", f"{num}")
    return Question(f"\\frac{{{num}}}{{{den}}}", tuple(right), wrong)


def _latex_question(rng: random.Random) -> Question:
    k = rng.choice([2, 3, 5, 6, 7])
    m = rng.randint(2, 5)
    kind = rng.randrange(3)
    if kind == 0:  # surds
        return Question(
            f"{m}\\sqrt{{{k}}}",
            (f"{m}\\sqrt{{{k}}}", f"\\sqrt{{{m * m * k}}}", f"{m} \\sqrt {k}"),
            (f"{m}\\sqrt{{{k + 1}}}", f"\\sqrt{{{m * k}}}", f"{m * k}"),
        )
    if kind == 1:  # multiples of pi
        return Question(
            f"\\frac{{{m}\\pi}}{{{k}}}",
            (f"\\frac{{{m}\\pi}}{{{k}}}", f"\\frac{{{m}}}{{{k}}}\\pi", f"{m}\\pi/{k}"),
            (f"\\frac{{{k}\\pi}}{{{m}}}", f"{m}\\pi", f"\\frac{{\\pi}}{{{k}}}"),
        )
    return Question(  # polynomials
        f"x^2+{m}x+{k}",
        (f"x^2+{m}x+{k}", f"{k}+{m}x+x^2", f"x^{{2}} + {m} x + {k}"),
        (f"x^2+{k}x+{m}", f"x^2-{m}x+{k}", f"(x+{m})^2"),
    )


def _reasoning(rng: random.Random) -> str:
    nums = {key: rng.randint(2, 400) for key in "abcde"}
    return " ".join(rng.choice(FILLER).format(**nums) for _ in range(rng.randint(3, 9)))


def make_rollouts(n: int, adversarial: int, seed: int = 0, k: int = 8) -> tuple[list[str], list[str]]:
    """``n`` (completion, gold) pairs: n // k questions with k rollouts each, plus adversarial items."""
    rng = random.Random(seed)
    completions: list[str] = []
    golds: list[str] = []
    makers = [_integer_question] * 5 + [_fraction_question] * 3 + [_latex_question] * 2
    while len(completions) < n - adversarial:
        q = rng.choice(makers)(rng)
        p_right = rng.random()  # question difficulty: mixed, all-right and all-wrong groups all occur
        for _ in range(min(k, n - adversarial - len(completions))):
            text = _reasoning(rng)
            roll = rng.random()
            if roll < 0.05:
                text += f" So the result should be around {rng.randint(1, 500)}."  # no boxed answer
            else:
                answer = rng.choice(q.right if rng.random() < p_right else q.wrong)
                text += f" Therefore, the final answer is $\\boxed{{{answer}}}$."
            completions.append(text)
            golds.append(q.gold)
    attacks = [
        ("\\boxed{9^{9^{9^{9}}}}", "3"),
        ("\\boxed{" + "1+" * 600_000 + "1}", "3"),  # 1.2 MB expression
        ("Let me think. " * 80_000 + "\\boxed{7}", "7"),  # 1.1 MB text, easy answer at the end
        ("\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "1"),  # deep nesting
    ]
    for i in range(adversarial):
        completions.append(attacks[i % len(attacks)][0])
        golds.append(attacks[i % len(attacks)][1])
    return completions, golds


def baseline(completions: list[str], golds: list[str]) -> list[float]:
    """The loop a user would write around Math-Verify (default timeouts, so main thread only)."""
    return [
        float(math_verify.verify(math_verify.parse(f"${g}$"), math_verify.parse(c)))
        for c, g in zip(completions, golds)
    ]


def _workers_cpu_s() -> dict[int, float]:
    """CPU seconds used so far by each live pool worker (Linux /proc; empty elsewhere)."""
    pool = verify_mod._POOL
    out: dict[int, float] = {}
    for pid in pool.pids() if pool is not None else []:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of rollouts (default 10000)")
    parser.add_argument("--processes", type=int, default=None, help="verify_batch workers (default: CPUs)")
    parser.add_argument("--adversarial", type=int, default=4, help="adversarial items among the n")
    parser.add_argument("--timeout", type=float, default=5.0, help="verify_batch timeout_s per item")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # Math-Verify logs every timeout with the whole (megabyte) input; keep the report readable.
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    completions, golds = make_rollouts(args.n, args.adversarial, args.seed)
    n = len(completions)
    print(f"{n} rollouts ({args.adversarial} adversarial), {len(os.sched_getaffinity(0))} usable CPUs, "
          f"load average {os.getloadavg()[0]:.1f} before the run")

    workers = args.processes or len(os.sched_getaffinity(0))
    t0 = time.perf_counter()
    # One distinct slow item per worker starts them all (a persistent pool pays this once per process).
    verify_batch([f"\\boxed{{y+{k}}}" for k in range(workers)], [f"{k}+y" for k in range(workers)],
                 processes=workers)
    startup_s = time.perf_counter() - t0

    cpu_before = _workers_cpu_s()
    t0, p0 = time.perf_counter(), time.process_time()
    ours = verify_batch(completions, golds, timeout_s=args.timeout, processes=workers)
    ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - p0
    ours_cpu += sum(cpu - cpu_before.get(pid, 0.0) for pid, cpu in _workers_cpu_s().items())
    shutdown_pool()

    t0, p0 = time.perf_counter(), time.process_time()
    base = baseline(completions, golds)
    base_s, base_cpu = time.perf_counter() - t0, time.process_time() - p0

    statuses = Counter(r.status for r in ours)
    why: Counter[str] = Counter()
    examples = []
    for i, (r, b) in enumerate(zip(ours, base)):
        if r.reward == b:
            continue
        if i >= n - args.adversarial:
            why["adversarial"] += 1
        elif r.answer is None:
            why["no boxed answer (Math-Verify scores another number in the text)"] += 1
        elif r.reward and normalize_answer(r.answer) == normalize_answer(golds[i]):
            why["accepted by the normalised-string fallback (e.g. a trailing '.')"] += 1
        else:
            why["other"] += 1
            if len(examples) < 5:
                examples.append((r.answer, golds[i], r.reward, b))

    print("| checker | items | wall s | items/s | speed-up | CPU s (all processes) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| Math-Verify loop (1 process) | {n} | {base_s:.2f} | {n / base_s:.0f} | 1.00x | {base_cpu:.2f} |")
    print(f"| verify_batch ({workers} workers, timeout {args.timeout:g} s) | {n} | {ours_s:.2f} | "
          f"{n / ours_s:.0f} | {base_s / ours_s:.2f}x | {ours_cpu:.2f} |")
    print(f"| verify_batch incl. worker start-up ({startup_s:.2f} s) | {n} | {ours_s + startup_s:.2f} | "
          f"{n / (ours_s + startup_s):.0f} | {base_s / (ours_s + startup_s):.2f}x | |")
    print()
    print(f"load average after the run: {os.getloadavg()[0]:.1f} (other work on the machine slows both; "
          "CPU seconds of workers killed for timeouts are not counted)")
    print(f"mean reward: verify_batch {sum(r.reward for r in ours) / n:.4f}, "
          f"baseline {sum(base) / n:.4f}; verify_batch statuses: {dict(statuses)}")
    print(f"reward disagreements: {sum(why.values())} of {n}" + "".join(f"; {v} {k}" for k, v in why.items()))
    for answer, gold, ours_r, base_r in examples:
        print(f"  e.g. boxed {answer!r} vs gold {gold!r}: verify_batch {ours_r}, baseline {base_r}")


if __name__ == "__main__":
    main()
