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


class _Model:
    """What a vLLM worker's ``model_runner.model`` offers the weight-update path: ``load_weights``."""

    def __init__(self) -> None:
        self.version = "loaded-from-folder"

    def load_weights(self, weights: Any) -> set[str]:
        pairs = list(weights)
        # a digest of the tensors' values: generations below change with the weights they were made with
        digest = sum(float(t.double().sum()) for _, t in pairs)
        self.version = f"{len(pairs)}:{digest:.6f}"
        _record("load_weights", {"names": sorted(n for n, _ in pairs), "version": self.version})
        return {n for n, _ in pairs}


class _Worker:
    def __init__(self) -> None:
        self.model_runner = type("ModelRunner", (), {})()
        self.model_runner.model = _Model()


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        self.kwargs = {"model": model, **kwargs}
        self._worker = _Worker()  # one worker: tensor_parallel_size 1 on a CPU
        self.sleeping = False
        _record("LLM", self.kwargs)

    def collective_rpc(self, method: Any, timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        """vLLM runs `method` on every worker; a callable gets the worker as its first argument."""
        if not callable(method):
            raise NotImplementedError(f"stand-in: only callables, got {method!r}")
        return [method(self._worker, *args, **(kwargs or {}))]

    def reset_prefix_cache(self) -> bool:
        _record("reset_prefix_cache", {})
        return True

    def sleep(self, level: int = 1) -> None:
        if not self.kwargs.get("enable_sleep_mode"):
            raise RuntimeError("stand-in: sleep mode is not enabled (vLLM asserts the same)")
        self.sleeping = True
        _record("sleep", {"level": level})

    def wake_up(self, tags: list[str] | None = None) -> None:
        if tags is None or "kv_cache" in tags:
            self.sleeping = False
        _record("wake_up", {"tags": tags})

    def generate(self, prompts: list[Any], sampling_params: Any, use_tqdm: bool = True, lora_request: Any = None) -> list[RequestOutput]:
        per_prompt = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        # vLLM's PromptType: a string, or {"prompt": ..., "multi_modal_data": {"image": [PIL images]}};
        # the stand-in records each image's mode and size (and draws text from them too)
        texts, media = [], []
        for p in prompts:
            if isinstance(p, dict):
                unknown = set(p) - {"prompt", "multi_modal_data"}
                assert not unknown, f"stand-in: unknown prompt keys {unknown}"
                images = p.get("multi_modal_data", {}).get("image", [])
                texts.append(p["prompt"])
                media.append([[img.mode, list(img.size)] for img in images])
            else:
                texts.append(p)
                media.append(None)
        _record(
            "generate",
            {"prompts": texts, "images": media, "sampling": [asdict(p) for p in per_prompt],
             "lora_request": None if lora_request is None else asdict(lora_request)},
        )
        if self.sleeping:
            raise RuntimeError("stand-in: generate while asleep (call wake_up first)")
        out = []
        for prompt, seen, sp in zip(texts, media, per_prompt):
            prompt = prompt + (json.dumps(seen) if seen else "")
            if os.environ.get("FAKE_VLLM_EXIT_ON") and os.environ["FAKE_VLLM_EXIT_ON"] in prompt:
                print("fake vllm: simulated CUDA out of memory", file=sys.stderr, flush=True)
                os._exit(3)
            if os.environ.get("FAKE_VLLM_RAISE_ON") and os.environ["FAKE_VLLM_RAISE_ON"] in prompt:
                raise RuntimeError("fake vllm: simulated generation error")
            samples = []
            for j in range(sp.n):
                rng = random.Random(f"{sp.seed}|{j}|{prompt}|{self._worker.model_runner.model.version}")
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
