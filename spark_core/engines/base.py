"""The engine contract: who turns prompts into sampled completions.

Engines get prompts that are already formatted (chat template applied) and return text plus token ids;
the trainer recomputes log-probs itself, so nothing else is needed from an engine.

Lifecycle within an iteration (the workspace, ``spark_core.stages.lifecycle``, drives it): an engine is
started once, on the weights the iteration starts from, and serves every sampling phase of every RL step.
Between phases the trainer updates the weights; then

* ``sleep()`` (optional) before training: give the accelerator's memory back (weights offloaded or
  dropped, cache freed) while the trainer needs it; ``wake_up()`` before the next generate;
* ``update_weights(state_dict)`` (optional) after training: load the trainer's new weights in place, no
  restart; an engine without it is stopped and started again on a local folder of the new weights;
* ``close()`` at the end (the next iteration's workspace starts a fresh one).

An engine sampling from the live in-process model (hf) needs none of the optional methods: the trainer
updates the very tensors it samples with.
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


def supports_weight_update(engine: object) -> bool:
    """Whether an engine loads new weights in place (``update_weights``) instead of being restarted."""
    probe = getattr(engine, "supports_weight_update", None)
    return bool(probe()) if callable(probe) else False


def sleep(engine: object) -> None:
    """Free the accelerator while the trainer runs, where the engine can (a no-op otherwise)."""
    if callable(fn := getattr(engine, "sleep", None)):
        fn()


def wake_up(engine: object) -> None:
    if callable(fn := getattr(engine, "wake_up", None)):
        fn()
