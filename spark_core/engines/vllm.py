"""The `vllm` engine: sampling with vLLM in its own Python environment, through a worker subprocess.

The main process never imports vLLM (its pins clash with Prefect's). On the first ``generate`` call the
engine starts :mod:`spark_core.engines.vllm_worker` by FILE PATH with the vLLM environment's interpreter
(``sampling.vllm_python``, built by ``infra/envs/vllm/setup.sh``); the worker loads the checkpoint once
and answers one job per ``generate`` call, exchanging Parquet files in a scratch folder. ``close()``
ends the worker, which releases all of its GPU memory: call it between pipeline phases (before the
trainer needs the GPU).

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
        }
        wire.llm_kwargs(self.engine_params)  # fail here, not in the subprocess, on bad values
        self.env = env
        self.job_timeout_s = job_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._jobs = 0

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

    # ------------------------------------------------------------------------------ generate

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt; result[i][j] is sample j of prompt i."""
        if not prompts:
            return []
        if self._proc is not None and not self.running:
            raise self._died(self._proc.returncode)
        if self._proc is None:
            self._start()
        assert self._proc is not None and self._proc.stdin is not None and self._scratch is not None
        self._jobs += 1
        base = Path(self._scratch.name) / f"job-{self._jobs:05d}"
        request = base.with_suffix(".request.parquet")
        output = base.with_suffix(".response.parquet")
        status_path = base.with_suffix(".status.json")
        table = pa.table({"prompt_index": list(range(len(prompts))), "prompt": list(prompts)}, schema=wire.REQUEST_SCHEMA)
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
