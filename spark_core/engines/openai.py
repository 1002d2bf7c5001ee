"""The `openai` engine: sampling from a separately running OpenAI-compatible server.

Any server with ``POST {base_url}/completions`` works (vLLM serve, SGLang, llama.cpp's server). Prompts are
sent already formatted (chat template applied), as raw completions, never through the chat endpoint --
except prompts with images (vision-language models): the completions endpoint takes no images, so such
a prompt (ChatML, as Qwen2-VL / Qwen2.5-VL templates write it) is split back into its turns and sent to
``POST {base_url}/chat/completions`` with each image placeholder as an ``image_url`` content part holding
a base64 ``data:`` URL (capped at ``images.MAX_PIXELS``); the server's template renders the same text.

* **n samples.** One request asks for ``n`` choices with a per-prompt ``seed``. A server that returns
  fewer (llama.cpp ignores ``n > 1``) gets the missing samples as separate ``n=1`` requests with derived
  seeds; once seen, the engine sends single requests straight away.
* **Token ids** (the trainer needs the sampled ids). In order: the choice's ``token_ids`` (vLLM answers
  ``return_token_ids: true``, sent with every request; other servers ignore the field); with
  ``token_ids="logprobs"``, ``logprobs`` + ``return_tokens_as_token_ids`` (older vLLM: tokens come back as
  ``token_id:N``); otherwise the text is re-tokenized locally with the checkpoint's tokenizer, plus the
  EOS id when the server says the sample ended on EOS (``finish_reason == "stop"`` and no stop string
  could have fired). Re-tokenizing may pick a different (canonical) split than the one sampled; the
  trainer then scores slightly different ids for the same text. Prefer a server that returns ids.
* **Retries.** Connection errors, timeouts, 408/409/429 and 5xx are retried with exponential backoff
  (``Retry-After`` honoured); other 4xx fail at once with the server's message.
* **New weights each iteration.** ``reload(checkpoint)`` runs ``sampling.openai_reload_command`` (a shell
  hook, ``{checkpoint}`` replaced by the quoted local path: e.g. restart the server on that folder) and
  waits until ``GET {base_url}/models`` answers; ``use_lora_adapter`` loads an adapter folder through
  vLLM's runtime LoRA endpoints (server started with ``--enable-lora`` and
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) and samples from it by name. The server must be able to read
  the path it is given (same machine or a shared filesystem).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from .base import Completion, SamplingParams

log = logging.getLogger(__name__)

_SEED_MOD = 2**31 - 1
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
TokenIdsMode = Literal["auto", "logprobs", "tokenizer"]


class OpenAIEngineError(RuntimeError):
    """The server failed or answered something unusable; the message names the request and the reason."""


def prompt_seed(seed: int, prompt_index: int) -> int:
    """Per-prompt seed (same rule as the vLLM worker's): identical prompts still sample independently."""
    return (seed * 1_000_003 + prompt_index) % _SEED_MOD


def sample_seed(seed: int, prompt_index: int, sample_idx: int) -> int:
    """Seed of sample j when samples are requested one at a time (sample 0 = the prompt's own seed)."""
    return (prompt_seed(seed, prompt_index) + 104_729 * sample_idx) % _SEED_MOD


class OpenAIEngine:
    """Implements ``engines.base.Engine`` against an OpenAI-compatible ``/v1/completions`` server."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        tokenizer: Any = None,
        timeout_s: float = 600.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_concurrency: int = 8,
        token_ids: TokenIdsMode = "auto",
        reload_command: str | None = None,
        ready_timeout_s: float = 600.0,
        api_key: str | None = None,
    ) -> None:
        if not base_url:
            raise OpenAIEngineError("sampling.engine is 'openai' but sampling.openai_base_url is not set")
        if token_ids not in ("auto", "logprobs", "tokenizer"):
            raise ValueError(f"token_ids must be auto, logprobs or tokenizer, got {token_ids!r}")
        self.base_url = base_url.rstrip("/")
        self._model = model
        self.tokenizer = tokenizer
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_concurrency = max(1, max_concurrency)
        self.token_ids_mode = token_ids
        self.reload_command = reload_command
        self.ready_timeout_s = ready_timeout_s
        # the key is read from the environment by default and never logged
        self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.server_ignores_n = False
        self._adapter_name: str | None = None

    # ----------------------------------------------------------------------------------- HTTP

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, expect_json: bool = True
    ) -> Any:
        """One call with retries; returns the decoded JSON (or the raw text when ``expect_json`` is off)."""
        url = f"{self.base_url}{path}"
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            delay = min(self.backoff_s * 2**attempt, 30.0)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read().decode()
                return json.loads(raw) if expect_json else raw
            except urllib.error.HTTPError as err:
                text = err.read().decode(errors="replace")[:500]
                if err.code not in _RETRY_STATUS:
                    raise OpenAIEngineError(f"{method} {url} failed with HTTP {err.code}: {text}") from None
                last = f"HTTP {err.code}: {text}"
                retry_after = err.headers.get("Retry-After") if err.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    delay = min(float(retry_after), 60.0)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            except json.JSONDecodeError as err:
                raise OpenAIEngineError(f"{method} {url} returned invalid JSON: {err}") from None
            if attempt < self.max_retries:
                log.warning("%s %s: %s; retry %d/%d in %.1fs", method, url, last, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise OpenAIEngineError(f"{method} {url} failed after {self.max_retries + 1} attempts: {last}")

    @property
    def model(self) -> str:
        """The model name sent with each request (the first one the server lists when not configured)."""
        if self._model is None:
            listing = self._request("GET", "/models")
            names = [m.get("id") for m in listing.get("data", []) if m.get("id")]
            if not names:
                raise OpenAIEngineError(f"{self.base_url}/models lists no model; set sampling.openai_model")
            self._model = names[0]
        return self._model

    # ------------------------------------------------------------------------------- generate

    def generate(self, prompts: list[str], params: SamplingParams,
                 images: list[list[bytes]] | None = None) -> list[list[Completion]]:
        """``params.n`` completions per prompt; result[i][j] is sample j of prompt i. ``images[i]``: prompt
        i's image bytes; such prompts go to the chat endpoint with image content parts."""
        if params.n < 1:
            raise ValueError(f"n must be >= 1, got {params.n}")
        if not prompts:
            return []
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
        model = self.model
        jobs: list[tuple[int, Any]] = list(enumerate(prompts))
        if images is not None and any(images):
            jobs = [(i, chat_messages(p, imgs) if imgs else p) for (i, p), imgs in zip(jobs, images)]
        if self.max_concurrency == 1 or len(jobs) == 1:
            return [self._sample_prompt(model, i, p, params) for i, p in jobs]
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(lambda job: self._sample_prompt(model, job[0], job[1], params), jobs))

    def _body(self, model: str, prompt: Any, params: SamplingParams, n: int, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            **({"prompt": prompt} if isinstance(prompt, str) else {"messages": prompt}),
            "n": n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            "seed": seed,
            "stream": False,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if self.token_ids_mode != "tokenizer":
            body["return_token_ids"] = True  # vLLM >= 0.10.2; ignored by servers that do not know it
        if self.token_ids_mode == "logprobs":
            body["logprobs"] = 1
            body["return_tokens_as_token_ids"] = True
        return body

    def _sample_prompt(self, model: str, index: int, prompt: Any, params: SamplingParams) -> list[Completion]:
        choices: list[dict[str, Any]] = []
        path = "/completions" if isinstance(prompt, str) else "/chat/completions"
        if not self.server_ignores_n or params.n == 1:
            resp = self._request("POST", path, self._body(model, prompt, params, params.n, prompt_seed(params.seed, index)))
            choices = sorted(resp.get("choices", []), key=lambda c: c.get("index", 0))[: params.n]
            if len(choices) < params.n:
                if not self.server_ignores_n:
                    log.info("server returned %d of %d choices: requesting samples one at a time", len(choices), params.n)
                self.server_ignores_n = True
        for j in range(len(choices), params.n):
            resp = self._request("POST", path, self._body(model, prompt, params, 1, sample_seed(params.seed, index, j)))
            got = resp.get("choices", [])
            if not got:
                raise OpenAIEngineError(f"{self.base_url}{path} returned no choice for prompt {index}")
            choices.append(got[0])
        return [self._completion(c, params) for c in choices]

    def _completion(self, choice: dict[str, Any], params: SamplingParams) -> Completion:
        text = choice.get("text") or (choice.get("message") or {}).get("content") or ""
        reason = choice.get("finish_reason") or "stop"
        return Completion(text=text, token_ids=self._token_ids(choice, text, reason, params), finish_reason=reason)

    def _token_ids(self, choice: dict[str, Any], text: str, reason: str, params: SamplingParams) -> list[int]:
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            return [int(t) for t in ids]
        logprobs = choice.get("logprobs") or {}
        # completions: logprobs.tokens; chat completions: logprobs.content[].token
        tokens = logprobs.get("tokens") or [c.get("token") for c in logprobs.get("content") or []]
        if tokens and all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
            return [int(t.split(":", 1)[1]) for t in tokens]
        if self.tokenizer is None:
            raise OpenAIEngineError(
                "the server returned no token ids and no tokenizer was given to re-tokenize the text; "
                "pass the checkpoint's tokenizer (the factory does) or use a server that returns token ids"
            )
        out = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        # vLLM reports stop_reason (None = EOS, else the stop string); without it, only a request without
        # stop strings proves that a "stop" finish was the EOS token.
        ended_on_eos = reason == "stop" and (
            choice["stop_reason"] is None if "stop_reason" in choice else not params.stop
        )
        if ended_on_eos and eos is not None:
            out.append(int(eos))
        return out

    def close(self) -> None:
        """Nothing to release: the server runs on its own."""

    # ------------------------------------------------------------------------- new weights

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Poll ``GET /models`` until the server answers (after a restart)."""
        deadline = time.monotonic() + (timeout_s or self.ready_timeout_s)
        last = ""
        while time.monotonic() < deadline:
            req = urllib.request.Request(f"{self.base_url}/models", method="GET")
            if self._api_key:
                req.add_header("Authorization", f"Bearer {self._api_key}")
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as err:
                last = str(getattr(err, "reason", err))
            time.sleep(0.5)
        raise OpenAIEngineError(f"{self.base_url} did not become ready within {timeout_s or self.ready_timeout_s:.0f}s ({last})")

    def reload(self, checkpoint_dir: str | os.PathLike[str]) -> None:
        """Point the server at a new checkpoint with ``reload_command``, then wait until it answers."""
        if not self.reload_command:
            raise OpenAIEngineError("no sampling.openai_reload_command is configured")
        path = Path(checkpoint_dir).resolve()
        command = self.reload_command.replace("{checkpoint}", shlex.quote(str(path)))
        log.info("reloading the OpenAI-compatible server: %s", command)
        proc = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=self.ready_timeout_s)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            raise OpenAIEngineError(f"sampling.openai_reload_command exited with {proc.returncode}:\n{tail}")
        self.wait_ready()

    def use_lora_adapter(self, adapter_dir: str | os.PathLike[str], name: str) -> None:
        """Load an adapter with vLLM's runtime endpoint, sample from it by ``name``, unload the previous one."""
        previous = self._adapter_name
        # vLLM answers these endpoints with plain text, not JSON
        body = {"lora_name": name, "lora_path": str(Path(adapter_dir).resolve())}
        self._request("POST", "/load_lora_adapter", body, expect_json=False)
        self._model = name
        self._adapter_name = name
        if previous and previous != name:
            try:
                self._request("POST", "/unload_lora_adapter", {"lora_name": previous}, expect_json=False)
            except OpenAIEngineError as err:  # a stale adapter only costs server memory
                log.warning("could not unload LoRA adapter %s: %s", previous, err)


_TURN_RE = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n?", re.S)
_GENERATION_OPENER = "<|im_start|>assistant\n"


def chat_messages(prompt: str, images: list[bytes]) -> list[dict[str, Any]]:
    """The turns of a formatted ChatML prompt as chat messages, each image placeholder replaced by an
    ``image_url`` part (base64 PNG data URL), in order; the trailing assistant opener is dropped (the
    server's template adds it back). Anything else than whole turns is refused: it could not round-trip."""
    from ..images import data_url
    from ..vision import IMAGE_PLACEHOLDER

    if not prompt.endswith(_GENERATION_OPENER):
        raise OpenAIEngineError(
            "a prompt with images must be a ChatML prompt ending with the assistant opener (the Qwen2-VL / "
            "Qwen2.5-VL chat template): the openai engine sends it through /chat/completions")
    body = prompt[: -len(_GENERATION_OPENER)]
    turns = list(_TURN_RE.finditer(body))
    if "".join(m.group(0) for m in turns) != body:
        raise OpenAIEngineError("a prompt with images is not made of whole ChatML turns; cannot send it as chat messages")
    if sum(m.group(2).count(IMAGE_PLACEHOLDER) for m in turns) != len(images):
        raise OpenAIEngineError(f"the prompt's image placeholders do not match its {len(images)} image(s)")
    pending = list(images)
    messages: list[dict[str, Any]] = []
    for m in turns:
        pieces = m.group(2).split(IMAGE_PLACEHOLDER)
        if len(pieces) == 1:
            messages.append({"role": m.group(1), "content": pieces[0]})
            continue
        parts: list[dict[str, Any]] = []
        for k, text in enumerate(pieces):
            if k:
                parts.append({"type": "image_url", "image_url": {"url": data_url(pending.pop(0))}})
            if text:
                parts.append({"type": "text", "text": text})
        messages.append({"role": m.group(1), "content": parts})
    return messages
