"""A stand-in engine for tests: canned completions chosen by matching the prompt text.

Not a model. It lets the reflection and evaluation logic be tested exactly: every prompt the code
under test sends must match a rule, and every call is recorded for inspection.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

from spark_core.engines.base import Completion, SamplingParams

# A reply is fixed text, or a function of (sampling params, sample index) for sampled calls.
Reply = Union[str, Callable[[SamplingParams, int], str]]


def chat_fmt(messages: list[dict[str, str]]) -> str:
    """Trivial chat formatter: role tags and contents (no tokenizer needed)."""
    return "\n".join(f"<{m['role']}>{m['content']}" for m in messages) + "\n<assistant>"


class ScriptedEngine:
    """Replies with the first rule whose key occurs in the prompt; an unmatched prompt is an error.

    ``calls`` keeps (prompts, params) of every generate call.
    """

    def __init__(self, rules: Sequence[tuple[str, Reply]]) -> None:
        self.rules = list(rules)
        self.calls: list[tuple[list[str], SamplingParams]] = []

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        self.calls.append((list(prompts), params))
        return [[Completion(self._reply(p, params, j), [], "stop") for j in range(params.n)] for p in prompts]

    def _reply(self, prompt: str, params: SamplingParams, j: int) -> str:
        for key, reply in self.rules:
            if key in prompt:
                return reply(params, j) if callable(reply) else reply
        raise AssertionError(f"ScriptedEngine: no rule matches prompt:\n{prompt}")

    @property
    def prompts(self) -> list[str]:
        """Every prompt sent, in order."""
        return [p for batch, _ in self.calls for p in batch]

    def close(self) -> None:
        pass
