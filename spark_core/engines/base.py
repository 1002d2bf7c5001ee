"""The engine contract: who turns prompts into sampled completions.

Engines get prompts that are already formatted (chat template applied) and return text plus token ids;
the trainer recomputes log-probs itself, so nothing else is needed from an engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings for one generate call (mapped 1:1 onto each backend's own parameters)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str = "stop"  # stop | length


@runtime_checkable
class Engine(Protocol):
    """Generate `params.n` completions for each prompt: result[i][j] is sample j of prompt i.

    Deterministic for a given seed, prompt list and weights (as far as the backend allows)."""

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]: ...

    def close(self) -> None: ...
