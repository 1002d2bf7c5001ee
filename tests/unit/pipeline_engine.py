"""A deterministic sampler for pipeline tests: right and wrong answers in every group.

The tiny random model never writes a ``\\boxed{}`` answer, so with it every group is all-wrong, no
judgment item is built and the reward phase never runs. This engine stands in for sampling only (the
real tiny model still trains on its token ids): for each sample it picks, from a seeded hash of
(seed, prompt, sample index), a right or a wrong boxed answer to arithmetic questions, Yes/No for
pointwise Yes/No judgments and A/B for letter judgments.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from spark_core.engines.base import Completion, SamplingParams

_QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")


class ArithmeticEngine:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.calls = 0

    def _menu(self, prompt: str) -> list[str]:
        if "\\boxed{A}" in prompt or "(A)" in prompt:
            return ["A", "B"]
        if "Yes" in prompt:
            return ["Yes", "No"]
        found = _QUESTION.findall(prompt)
        right = sum(int(x) for x in found[-1]) if found else 0
        return [str(right), str(right + 1)]

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        self.calls += 1
        out = []
        for prompt in prompts:
            menu = self._menu(prompt)
            samples = []
            for j in range(params.n):
                digest = hashlib.sha256(f"{params.seed}|{j}|{prompt}".encode()).digest()
                text = f"The answer is \\boxed{{{menu[digest[0] % len(menu)]}}}."
                ids = list(self.tokenizer(text, add_special_tokens=False).input_ids)
                ids.append(int(self.tokenizer.eos_token_id))
                samples.append(Completion(text, ids, "stop"))
            out.append(samples)
        return out

    def close(self) -> None:
        pass
