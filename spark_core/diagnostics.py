"""Reward-phase diagnostics: did the reward phase carry any training signal? (pure functions)

GRPO learns only from groups whose K samples got different rewards; a reward phase whose every group
is all-right or all-wrong has advantage 0 everywhere, and the "SPARK" run is then RLVR plus KL noise.
:func:`reward_phase_diagnostics` says so from the verified reward-phase samples (columns ``question_id``
= item id, ``kind``, ``label``, ``completion``, ``reward``, and ``answer`` for reflections):

===============================  ===================================================================
``parse_rate_by_kind``           per kind, share of samples whose verdict (pointwise/pairwise: a label
                                 of the item's style in the last ``\\boxed{}``) or answer (reflection:
                                 an extracted final answer) could be read
``verdict_parse_rate``           the same over all judgment samples (None without any)
``verdict_wrong_rate``           share of judgment samples with a readable but wrong verdict: an
                                 unparsed verdict is counted apart, not as a wrong one
``zero_advantage_share``         share of item groups whose K rewards are all equal (advantage 0)
``zero_advantage_by_kind``       the same per kind
``yes_share``                    among readable pointwise verdicts, the share naming the positive label
                                 (Yes, or A in the A/B style): 1.0 is an always-Yes judge
``pairwise_a_share``             among readable pairwise verdicts, the share naming (A)
``no_signal``                    True when every group had zero advantage (nothing to learn from)
===============================  ===================================================================
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from .reflection import parse_verdict

_STYLE_LABELS = {"Yes": ("Yes", "No"), "No": ("Yes", "No"), "A": ("A", "B"), "B": ("A", "B")}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # None or NaN


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def reward_phase_diagnostics(rows: pd.DataFrame) -> dict[str, Any]:
    """Diagnostics of one reward phase's verified samples (see the module docstring)."""
    empty: dict[str, Any] = {
        "parse_rate_by_kind": {}, "verdict_parse_rate": None, "verdict_wrong_rate": None,
        "zero_advantage_share": None, "zero_advantage_by_kind": {}, "yes_share": None,
        "pairwise_a_share": None, "no_signal": False,
    }
    if rows is None or len(rows) == 0:
        return empty
    parsed: dict[str, list[bool]] = {}
    judged: list[bool] = []
    wrong: list[bool] = []
    yes: list[bool] = []
    first: list[bool] = []
    for kind, label, completion, answer, reward in zip(
        rows["kind"], rows["label"], rows["completion"],
        rows["answer"] if "answer" in rows else [None] * len(rows), rows["reward"],
    ):
        if kind == "reflection":
            parsed.setdefault(kind, []).append(not _missing(answer) and str(answer).strip() != "")
            continue
        labels = ("A", "B") if kind == "pairwise" else _STYLE_LABELS.get(str(label), ("Yes", "No"))
        verdict = parse_verdict(completion, labels)
        ok = verdict is not None
        parsed.setdefault(str(kind), []).append(ok)
        judged.append(ok)
        if ok:
            wrong.append(float(reward) < 0.5)
            if kind == "pairwise":
                first.append(verdict == "A")
            else:
                yes.append(verdict == labels[0])
    per = rows.groupby("question_id").agg(kind=("kind", "first"), lo=("reward", "min"), hi=("reward", "max"))
    flat = (per["hi"] - per["lo"]).abs() < 1e-9
    return {
        "parse_rate_by_kind": {k: _share(v) for k, v in sorted(parsed.items())},
        "verdict_parse_rate": _share(judged),
        "verdict_wrong_rate": sum(wrong) / len(judged) if judged else None,
        "zero_advantage_share": float(flat.mean()),
        "zero_advantage_by_kind": {str(k): float(v) for k, v in flat.groupby(per["kind"]).mean().items()},
        "yes_share": _share(yes),
        "pairwise_a_share": _share(first),
        "no_signal": bool(flat.all()),
    }


def no_signal_warning(iteration: int, diag: dict[str, Any]) -> str | None:
    """The warning to log (and flag) when a reward phase carried no signal, else None."""
    if not diag.get("no_signal"):
        return None
    return (
        f"iteration {iteration}: the reward phase carried NO training signal: every item group got equal "
        f"rewards (advantage 0); verdict parse rate {_fmt(diag.get('verdict_parse_rate'))}, judge Yes-share "
        f"{_fmt(diag.get('yes_share'))}. This iteration is RLVR plus KL noise: check the judgment budget "
        "(reward_data.judge_max_new_tokens), the demonstrations (reward_data.demonstrations) and the samples "
        "in reward_verified"
    )


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}"
