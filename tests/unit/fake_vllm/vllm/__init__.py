"""STAND-IN for the ``vllm`` package, used only by the CPU unit tests (see ../README.md). NOT vLLM.

It mirrors the names and call shapes of vLLM's offline API that ``spark_core/engines/vllm_worker.py``
uses, records every ``LLM(...)`` / ``SamplingParams(...)`` / ``generate(...)`` call to the JSON-lines file
named by ``$FAKE_VLLM_RECORD``, and returns deterministic pseudo-random text. Two switches drive the
error-path tests: ``$FAKE_VLLM_RAISE_ON`` (generate raises when a prompt contains it) and
``$FAKE_VLLM_EXIT_ON`` (the process dies with code 3 after printing to stderr).
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

__version__ = "0.0.0+stand-in"
IS_STAND_IN = True


def _record(kind: str, payload: dict[str, Any]) -> None:
    path = os.environ.get("FAKE_VLLM_RECORD")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"kind": kind, **payload}) + "\n")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class RequestOutput:
    prompt: str
    outputs: list[CompletionOutput]


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        self.kwargs = {"model": model, **kwargs}
        _record("LLM", self.kwargs)

    def generate(self, prompts: list[str], sampling_params: Any, use_tqdm: bool = True, lora_request: Any = None) -> list[RequestOutput]:
        per_prompt = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        _record(
            "generate",
            {"prompts": prompts, "sampling": [asdict(p) for p in per_prompt],
             "lora_request": None if lora_request is None else asdict(lora_request)},
        )
        out = []
        for prompt, sp in zip(prompts, per_prompt):
            if os.environ.get("FAKE_VLLM_EXIT_ON") and os.environ["FAKE_VLLM_EXIT_ON"] in prompt:
                print("fake vllm: simulated CUDA out of memory", file=sys.stderr, flush=True)
                os._exit(3)
            if os.environ.get("FAKE_VLLM_RAISE_ON") and os.environ["FAKE_VLLM_RAISE_ON"] in prompt:
                raise RuntimeError("fake vllm: simulated generation error")
            samples = []
            for j in range(sp.n):
                rng = random.Random(f"{sp.seed}|{j}|{prompt}")
                text = " ".join(str(rng.randint(0, 99)) for _ in range(8)) + " END"
                reason = "length"
                for s in sp.stop:
                    if s in text:
                        text, reason = text[: text.index(s)], "stop"
                        break
                if reason == "length" and len(text) <= sp.max_tokens:
                    reason = "stop"
                text = text[: sp.max_tokens]
                samples.append(CompletionOutput(j, text, list(text.encode()), reason))
            out.append(RequestOutput(prompt, samples))
        return out
