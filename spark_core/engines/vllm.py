"""The `vllm` engine: sampling with vLLM in its own Python environment, through a worker subprocess.

The main process never imports vLLM (its pins clash with Prefect's). On the first ``generate`` call the
engine starts :mod:`spark_core.engines.vllm_worker` by FILE PATH with the vLLM environment's interpreter
(``sampling.vllm_python``, built by ``infra/envs/vllm/setup.sh``); the worker loads the checkpoint once
and answers one job per ``generate`` call, exchanging Parquet files in a scratch folder. ``close()``
ends the worker, which releases all of its GPU memory.

Lifecycle (``engines.base``): with ``enable_sleep_mode`` one worker serves a whole iteration: ``sleep()``
frees the GPU while the trainer runs (vLLM sleep level 2: weights and KV cache discarded, since new
weights follow), ``update_weights(state_dict)`` wakes the weight memory only, sends the trainer's new
weights (one safetensors file in the scratch folder) and the worker loads them in place; the next
generate wakes the KV cache (vLLM's documented order for RLHF weight updates, lowest peak memory). Without it, ``update_weights`` still loads in place, but the worker holds its GPU memory
while the trainer runs (the caller restarts it instead where the GPU is shared). Adapter (LoRA)
checkpoints are not updated in place: the caller restarts the worker on the new adapter.

Every failure says what to do: interpreter not found, ``vllm`` not importable in it, no CUDA device,
or a worker crash (with the tail of its log).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import vllm_worker as wire
from .base import Completion, SamplingParams

log = logging.getLogger(__name__)

WORKER_FILE = Path(wire.__file__).resolve()
_TAIL_LINES = 40


class VLLMEngineError(RuntimeError):
    """The vLLM environment or worker failed; the message says why and what to do."""


def resolve_python(python: str | os.PathLike[str] | None) -> str:
    """Absolute path of the vLLM environment's interpreter, or a clear error."""
    if not python:
        raise VLLMEngineError(
            "sampling.engine is 'vllm' but sampling.vllm_python is not set: build the vLLM environment with "
            "infra/envs/vllm/setup.sh and set sampling.vllm_python to its interpreter "
            "(e.g. infra/envs/vllm/.venv/bin/python)"
        )
    text = os.fspath(python)
    found = shutil.which(text) if os.sep not in text else (text if os.path.exists(text) else None)
    if found is None or not os.access(found, os.X_OK):
        raise VLLMEngineError(
            f"sampling.vllm_python={text!r}: interpreter not found or not executable; build the vLLM environment "
            "with infra/envs/vllm/setup.sh (or fix the path)"
        )
    return os.path.abspath(found)


def _tail(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no worker log)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(worker log is empty)"


def sampling_payload(params: SamplingParams) -> dict[str, Any]:
    """Our SamplingParams as the worker's JSON sampling parameters (names follow vLLM's)."""
    return {
        "n": params.n,
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "max_tokens": params.max_new_tokens,
        "seed": int(params.seed),
        "stop": list(params.stop),
    }


def _encoded(images: list[list[bytes]]) -> list[list[bytes]]:
    """Each image as the model is shown it (RGB, within MAX_PIXELS), PNG-encoded for the worker."""
    import io

    from ..images import model_image

    out = []
    for blobs in images:
        row = []
        for data in blobs:
            buf = io.BytesIO()
            model_image(data).save(buf, format="PNG")
            row.append(buf.getvalue())
        out.append(row)
    return out


class VLLMEngine:
    """Generate with vLLM in a separate environment (implements ``engines.base.Engine``).

    ``checkpoint_dir`` is a LOCAL folder (the caller downloads the iteration's checkpoint from the store
    once). With ``lora_path`` the folder holds base weights and vLLM applies that adapter per request.
    ``require_cuda=False`` is for vLLM's CPU build (and for the stand-in used by the unit tests).
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str],
        python: str | os.PathLike[str] | None,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        dtype: str = "auto",
        seed: int = 0,
        require_cuda: bool = True,
        lora_path: str | os.PathLike[str] | None = None,
        max_lora_rank: int | None = None,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        env: dict[str, str] | None = None,
        job_timeout_s: float | None = None,
        limit_mm_per_prompt: dict[str, int] | None = None,
        enable_sleep_mode: bool = False,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir).resolve()
        if not (self.checkpoint_dir / "config.json").exists():
            raise VLLMEngineError(
                f"{self.checkpoint_dir} is not a local model folder (no config.json); download the checkpoint "
                "from the store first"
            )
        self.python = resolve_python(python)
        self.engine_params: dict[str, Any] = {
            "model": str(self.checkpoint_dir),
            "tensor_parallel_size": int(tensor_parallel_size),
            "gpu_memory_utilization": float(gpu_memory_utilization),
            "seed": int(seed),
            "dtype": dtype,
            "trust_remote_code": bool(trust_remote_code),
            "max_model_len": max_model_len,
            "lora_path": str(Path(lora_path).resolve()) if lora_path else None,
            "max_lora_rank": max_lora_rank,
            "require_cuda": bool(require_cuda),
            "limit_mm_per_prompt": limit_mm_per_prompt,
            "enable_sleep_mode": bool(enable_sleep_mode),
        }
        wire.llm_kwargs(self.engine_params)  # fail here, not in the subprocess, on bad values
        self.env = env
        self.job_timeout_s = job_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._jobs = 0
        self._pending_weights: dict[str, Any] | None = None  # new weights for a worker not started yet
        self._asleep: str | None = None  # "all" (weights and KV cache discarded) | "kv_cache" | None
        self.weight_updates = 0

    # ------------------------------------------------------------------------------- process

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        return Path(self._scratch.name) / "worker.log" if self._scratch else None

    def _start(self) -> None:
        self._scratch = tempfile.TemporaryDirectory(prefix="spark-vllm-")
        scratch = Path(self._scratch.name)
        params_path = scratch / "engine.json"
        params_path.write_text(json.dumps(self.engine_params))
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # vLLM V1 serializes a callable passed to LLM.collective_rpc (update_weights) only when allowed.
        env.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        self._log_fh = open(scratch / "worker.log", "wb")  # noqa: SIM115 - lives as long as the worker
        cmd = [self.python, str(WORKER_FILE), "--engine-params", str(params_path)]
        log.info("starting vLLM worker: %s", " ".join(cmd))
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._log_fh, stderr=subprocess.STDOUT, env=env)

    def _died(self, rc: int) -> VLLMEngineError:
        tail = _tail(self.log_path) if self.log_path else ""
        if rc == wire.EXIT_NO_VLLM:
            why = f"vllm is not importable by {self.python} (build the environment with infra/envs/vllm/setup.sh)"
        elif rc == wire.EXIT_NO_CUDA:
            why = "no (or too few) CUDA devices visible to the vLLM worker; use sampling.engine=hf without a GPU"
        elif rc == wire.EXIT_BAD_INPUT:
            why = "the worker rejected its engine parameters"
        else:
            why = f"the vLLM worker exited with code {rc}"
        self._cleanup()
        return VLLMEngineError(f"{why}\n--- worker log (last {_TAIL_LINES} lines) ---\n{tail}")

    def _cleanup(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
        self._proc = None
        self._asleep = None

    def close(self) -> None:
        """End the worker (closing its stdin lets it exit cleanly) and free its GPU memory."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.stdin and not proc.stdin.closed:
                proc.stdin.close()
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except BrokenPipeError:
            proc.wait()
        self._cleanup()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close() must not leave a GPU-holding process behind
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
        except Exception:
            pass

    # ----------------------------------------------------------------------------- lifecycle

    def supports_weight_update(self) -> bool:
        return not self.engine_params["lora_path"]

    def update_weights(self, state_dict: dict[str, Any]) -> None:
        """Load new weights (HF names -> tensors, as the trainer's model holds them) into the served model
        in place; a worker not started yet gets them right after it loads the checkpoint folder."""
        if not self.supports_weight_update():
            raise VLLMEngineError("adapter (LoRA) checkpoints are not updated in place: restart the engine")
        if self._proc is None:
            self._pending_weights = state_dict
            return
        if self._asleep == "all":
            self._control({"op": "wake_up", "tags": ["weights"]})  # room for the weights only
            self._asleep = "kv_cache"
        self._send_weights(state_dict)

    def _send_weights(self, state_dict: dict[str, Any]) -> None:
        from safetensors.torch import save_file  # noqa: PLC0415

        assert self._scratch is not None
        path = Path(self._scratch.name) / f"weights-{self._jobs + 1:05d}.safetensors"
        tensors, seen = {}, set()
        for name, value in state_dict.items():
            t = value.detach().to("cpu").contiguous()
            # safetensors refuses tensors sharing memory (tied embeddings): such a one gets its own copy
            tensors[name] = t.clone() if t.data_ptr() in seen else t
            seen.add(t.data_ptr())
        save_file(tensors, str(path))
        try:
            self._control({"op": "update_weights", "weights": str(path)})
        finally:
            path.unlink(missing_ok=True)
        self.weight_updates += 1

    def sleep(self) -> None:
        """Free the GPU while the trainer runs (weights and KV cache discarded: ``update_weights`` must
        follow before the next generate); a no-op without sleep mode or before the worker started."""
        if self.engine_params["enable_sleep_mode"] and self.running and self._asleep is None:
            self._control({"op": "sleep", "level": 2})
            self._asleep = "all"

    def wake_up(self) -> None:
        """Make the engine ready to generate (called by ``generate``)."""
        if self._asleep == "all":
            raise VLLMEngineError("the vLLM worker slept with its weights discarded: send update_weights first")
        if self._asleep == "kv_cache" and self.running:
            self._control({"op": "wake_up", "tags": ["kv_cache"]})
        self._asleep = None

    def _control(self, job: dict[str, Any]) -> dict[str, Any]:
        """Send one lifecycle job to the running worker and wait for its status."""
        if not self.running:
            raise self._died(self._proc.returncode if self._proc is not None else -1)
        assert self._proc is not None and self._proc.stdin is not None and self._scratch is not None
        self._jobs += 1
        status_path = Path(self._scratch.name) / f"job-{self._jobs:05d}.status.json"
        try:
            self._proc.stdin.write((json.dumps({**job, "status": str(status_path)}) + "\n").encode())
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise self._died(self._proc.wait()) from None
        status = self._wait(status_path)
        status_path.unlink(missing_ok=True)
        if not status.get("ok"):
            raise VLLMEngineError(f"vLLM {job['op']} failed in the worker:\n{status.get('error', status)}")
        log.info("vLLM %s in %.1fs", job["op"], status.get("seconds", 0.0))
        return status

    # ------------------------------------------------------------------------------ generate

    def generate(self, prompts: list[str], params: SamplingParams,
                 images: list[list[bytes]] | None = None) -> list[list[Completion]]:
        """``params.n`` completions per prompt; result[i][j] is sample j of prompt i. ``images[i]``: prompt
        i's image bytes (vision-language checkpoints), sent as PNG capped at ``images.MAX_PIXELS``."""
        if not prompts:
            return []
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
        if self._proc is not None and not self.running:
            raise self._died(self._proc.returncode)
        if self._proc is None:
            self._start()
            if self._pending_weights is not None:
                pending, self._pending_weights = self._pending_weights, None
                self._send_weights(pending)
        self.wake_up()
        assert self._proc is not None and self._proc.stdin is not None and self._scratch is not None
        self._jobs += 1
        base = Path(self._scratch.name) / f"job-{self._jobs:05d}"
        request = base.with_suffix(".request.parquet")
        output = base.with_suffix(".response.parquet")
        status_path = base.with_suffix(".status.json")
        table = pa.table({"prompt_index": list(range(len(prompts))), "prompt": list(prompts)}, schema=wire.REQUEST_SCHEMA)
        if images is not None and any(images):
            table = table.append_column(wire.IMAGES_FIELD, pa.array(_encoded(images), wire.IMAGES_FIELD.type))
        pq.write_table(table, request)
        job = {"request": str(request), "sampling": sampling_payload(params), "output": str(output), "status": str(status_path)}
        try:
            self._proc.stdin.write((json.dumps(job) + "\n").encode())
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise self._died(self._proc.wait()) from None
        status = self._wait(status_path)
        if not status.get("ok"):
            raise VLLMEngineError(f"vLLM generation failed in the worker:\n{status.get('error', status)}")
        result = self._read_response(output, len(prompts), params.n)
        for path in (request, output, status_path):
            path.unlink(missing_ok=True)
        log.info("vLLM: %d prompts x %d samples, %s tokens in %.1fs", len(prompts), params.n,
                 status.get("generated_tokens"), status.get("seconds", 0.0))
        return result

    def _wait(self, status_path: Path) -> dict[str, Any]:
        """Wait for the job's status file while watching the worker (model loading can take minutes)."""
        assert self._proc is not None
        start = time.monotonic()
        delay = 0.01
        while not status_path.exists():
            rc = self._proc.poll()
            if rc is not None:
                raise self._died(rc)
            if self.job_timeout_s is not None and time.monotonic() - start > self.job_timeout_s:
                self._proc.kill()
                self._proc.wait()
                tail = _tail(self.log_path) if self.log_path else ""
                self._cleanup()
                raise VLLMEngineError(
                    f"the vLLM job ran past {self.job_timeout_s:.0f}s; the worker was killed\n"
                    f"--- worker log (last {_TAIL_LINES} lines) ---\n{tail}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        return json.loads(status_path.read_text())

    @staticmethod
    def _read_response(path: Path, num_prompts: int, n: int) -> list[list[Completion]]:
        table = pq.read_table(path)
        missing = [c for c in wire.RESPONSE_SCHEMA.names if c not in table.column_names]
        if missing:
            raise VLLMEngineError(f"worker response {path} lacks column(s) {missing}")
        out: list[list[Completion | None]] = [[None] * n for _ in range(num_prompts)]
        rows = table.to_pydict()
        for p, j, text, ids, reason in zip(
            rows["prompt_index"], rows["sample_idx"], rows["text"], rows["token_ids"], rows["finish_reason"]
        ):
            if not (0 <= p < num_prompts and 0 <= j < n):
                raise VLLMEngineError(f"worker response has unexpected row prompt_index={p}, sample_idx={j}")
            out[p][j] = Completion(text=text, token_ids=[int(t) for t in ids], finish_reason=reason)
        for p, samples in enumerate(out):
            if any(c is None for c in samples):
                got = sum(c is not None for c in samples)
                raise VLLMEngineError(f"worker returned {got} of {n} samples for prompt {p}")
        return out  # type: ignore[return-value]
