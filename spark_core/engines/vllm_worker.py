"""The vLLM side of the `vllm` engine: a standalone worker run inside the separate vLLM environment.

vLLM cannot share an environment with Prefect (their fastapi pins clash) and its GPU memory must be
released between pipeline phases, so the main process never imports vLLM. It starts this file as a
subprocess with the vLLM environment's interpreter (``sampling.vllm_python``), by file path, so that
nothing else of ``spark_core`` is imported. This module therefore imports ONLY the standard library,
``pyarrow`` and (lazily) ``vllm`` and vLLM's own dependency ``safetensors`` (weight updates).

Protocol (all files live in a scratch folder the caller owns):

* ``python vllm_worker.py --engine-params E.json`` loads the model once (``vllm.LLM``) and then reads
  one JSON job per line on stdin: ``{"request": R.parquet, "sampling": {...}, "output": O.parquet,
  "status": S.json}``. The request Parquet has ``prompt_index`` (int64) and ``prompt`` (string); the
  response Parquet has ``prompt_index, sample_idx, text, token_ids, finish_reason``. After each job the
  worker writes ``S.json`` (``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``), always after the
  output file, both atomically. End of stdin ends the worker and frees the GPU.
* Control jobs (the lifecycle of ``engines.base``: one worker serves a whole iteration) carry an ``op``:
  ``{"op": "update_weights", "weights": W.safetensors, "status": S.json}`` loads the trainer's new
  weights in place (``LLM.collective_rpc`` runs :func:`load_weights_in_worker` in every vLLM worker,
  which hands the tensors to the model's own ``load_weights``; then the prefix cache is reset, since
  cached KV belongs to the old weights); ``{"op": "sleep", "level": 2}`` / ``{"op": "wake_up", "tags":
  [...]}`` call ``LLM.sleep`` / ``LLM.wake_up`` (needs ``enable_sleep_mode``): the GPU is free while the
  trainer runs.
* ``python vllm_worker.py --probe`` prints one JSON line (vLLM version, CUDA device count) and exits
  with the same codes as below; ``infra/envs/vllm/setup.sh`` uses it to check a fresh environment.

Exit codes the caller turns into clear errors: 10 = ``vllm`` not importable, 11 = CUDA required but no
device visible, 12 = bad arguments or engine parameters, anything else = a crash (stderr has the trace).
stdout and stderr are free for vLLM's own logs; results never travel through them.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
import traceback
from typing import Any

# Run by file path, Python puts this folder first on sys.path, where the sibling module `vllm.py` (the
# caller-side engine) would shadow the real `vllm` package. Drop the folder before anything imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

EXIT_NO_VLLM = 10
EXIT_NO_CUDA = 11
EXIT_BAD_INPUT = 12

REQUEST_SCHEMA = pa.schema([("prompt_index", pa.int64()), ("prompt", pa.string())])
# Vision-language requests add this column: each prompt's encoded images (PNG bytes), in placeholder order.
IMAGES_FIELD = pa.field("images", pa.list_(pa.binary()))
RESPONSE_SCHEMA = pa.schema(
    [
        ("prompt_index", pa.int64()),
        ("sample_idx", pa.int32()),
        ("text", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("finish_reason", pa.string()),
    ]
)

# vLLM seeds must fit a signed 64-bit integer; we keep them in 31 bits so every backend accepts them.
_SEED_MOD = 2**31 - 1
_ENGINE_KEYS = {
    "model": str,
    "tensor_parallel_size": int,
    "gpu_memory_utilization": float,
    "seed": int,
    "dtype": str,
    "trust_remote_code": bool,
    "max_model_len": (int, type(None)),
    "lora_path": (str, type(None)),
    "max_lora_rank": (int, type(None)),
    "require_cuda": bool,
    "limit_mm_per_prompt": (dict, type(None)),
    "enable_sleep_mode": bool,
}
_SAMPLING_KEYS = {
    "n": int,
    "temperature": (float, int),
    "top_p": (float, int),
    "max_tokens": int,
    "seed": int,
    "stop": list,
}


class BadInput(ValueError):
    """Malformed engine parameters, sampling parameters or request table."""


def _check_keys(params: dict[str, Any], spec: dict[str, Any], what: str, required: tuple[str, ...]) -> None:
    unknown = sorted(set(params) - set(spec))
    if unknown:
        raise BadInput(f"{what}: unknown key(s) {unknown}")
    for key in required:
        if key not in params:
            raise BadInput(f"{what}: missing key {key!r}")
    for key, value in params.items():
        if not isinstance(value, spec[key]) or (isinstance(value, bool) and spec[key] is not bool):
            raise BadInput(f"{what}: {key}={value!r} has the wrong type")


# ------------------------------------------------------------------ mapping onto vLLM's parameters


def llm_kwargs(engine: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM(...)`` for our engine parameters (validated)."""
    _check_keys(engine, _ENGINE_KEYS, "engine params", ("model",))
    kwargs: dict[str, Any] = {
        "model": engine["model"],
        "tokenizer": engine["model"],  # the checkpoint folder carries its own tokenizer
        "tensor_parallel_size": engine.get("tensor_parallel_size", 1),
        "gpu_memory_utilization": engine.get("gpu_memory_utilization", 0.9),
        "seed": engine.get("seed", 0),
        "dtype": engine.get("dtype", "auto"),
        "trust_remote_code": engine.get("trust_remote_code", False),
    }
    if kwargs["tensor_parallel_size"] < 1:
        raise BadInput("engine params: tensor_parallel_size must be >= 1")
    if not 0 < kwargs["gpu_memory_utilization"] <= 1:
        raise BadInput("engine params: gpu_memory_utilization must be in (0, 1]")
    if engine.get("max_model_len") is not None:
        kwargs["max_model_len"] = engine["max_model_len"]
    if engine.get("limit_mm_per_prompt"):
        # images per prompt vLLM makes room for (vision-language checkpoints)
        kwargs["limit_mm_per_prompt"] = dict(engine["limit_mm_per_prompt"])
    if engine.get("enable_sleep_mode"):
        kwargs["enable_sleep_mode"] = True
    if engine.get("lora_path"):
        # base + adapter checkpoints: vLLM applies the adapter per request (LoRARequest).
        kwargs["enable_lora"] = True
        if engine.get("max_lora_rank"):
            kwargs["max_lora_rank"] = engine["max_lora_rank"]
    return kwargs


def prompt_seed(seed: int, prompt_index: int) -> int:
    """Per-prompt seed: vLLM seeds each request separately, so two identical prompts with one shared
    seed would get identical samples; mixing in the prompt index keeps them independent."""
    return (seed * 1_000_003 + prompt_index) % _SEED_MOD


def sampling_kwargs(sampling: dict[str, Any], prompt_index: int) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams(...)`` for one prompt (validated)."""
    _check_keys(sampling, _SAMPLING_KEYS, "sampling params", ("n", "max_tokens"))
    if sampling["n"] < 1 or sampling["max_tokens"] < 1:
        raise BadInput("sampling params: n and max_tokens must be >= 1")
    stop = sampling.get("stop", [])
    if not all(isinstance(s, str) and s for s in stop):
        raise BadInput("sampling params: stop must be a list of non-empty strings")
    return {
        "n": sampling["n"],
        "temperature": float(sampling.get("temperature", 1.0)),
        "top_p": float(sampling.get("top_p", 1.0)),
        "max_tokens": sampling["max_tokens"],
        "seed": prompt_seed(int(sampling.get("seed", 0)), prompt_index),
        "stop": list(stop),
    }


# ------------------------------------------------------------------------------ Parquet exchange


def write_table_atomic(table: pa.Table, path: str) -> None:
    tmp = f"{path}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_json_atomic(payload: dict[str, Any], path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh)
    os.replace(tmp, path)


def read_request(path: str) -> tuple[list[int], list[str]]:
    """Prompt indices and prompts of a request Parquet file."""
    table = pq.read_table(path)
    missing = [c for c in REQUEST_SCHEMA.names if c not in table.column_names]
    if missing:
        raise BadInput(f"request {path}: missing column(s) {missing}; has {table.column_names}")
    indices = [int(i) for i in table.column("prompt_index").to_pylist()]
    prompts = table.column("prompt").to_pylist()
    if any(p is None for p in prompts):
        raise BadInput(f"request {path}: null prompt")
    if len(set(indices)) != len(indices):
        raise BadInput(f"request {path}: duplicate prompt_index values")
    return indices, prompts


def read_images(path: str) -> list[list[bytes]] | None:
    """Each prompt's image bytes when the request carries an ``images`` column, else None."""
    table = pq.read_table(path)
    if IMAGES_FIELD.name not in table.column_names:
        return None
    return [list(x or []) for x in table.column(IMAGES_FIELD.name).to_pylist()]


def request_prompts(prompts: list[str], images: list[list[bytes]] | None) -> list[Any]:
    """vLLM prompts: the text itself, or for a prompt with images the documented multimodal form
    ``{"prompt": text, "multi_modal_data": {"image": [PIL images]}}`` (one image per placeholder)."""
    if images is None:
        return list(prompts)
    import io

    from PIL import Image  # a dependency of vLLM itself

    out: list[Any] = []
    for text, blobs in zip(prompts, images):
        if not blobs:
            out.append(text)
            continue
        pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
        out.append({"prompt": text, "multi_modal_data": {"image": pictures}})
    return out


def response_table(indices: list[int], outputs: list[Any]) -> pa.Table:
    """Flatten vLLM ``RequestOutput`` objects (one per prompt, in request order) into the response table."""
    if len(outputs) != len(indices):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(indices)} prompts")
    cols: dict[str, list[Any]] = {name: [] for name in RESPONSE_SCHEMA.names}
    for prompt_index, request_output in zip(indices, outputs):
        for sample_idx, completion in enumerate(request_output.outputs):
            cols["prompt_index"].append(prompt_index)
            cols["sample_idx"].append(sample_idx)
            cols["text"].append(completion.text)
            cols["token_ids"].append([int(t) for t in completion.token_ids])
            # None means "still running", which a finished offline generate never returns; keep a value.
            cols["finish_reason"].append(completion.finish_reason or "stop")
    return pa.table(cols, schema=RESPONSE_SCHEMA)


# ------------------------------------------------------------------------------------ device check


def cuda_device_count() -> int:
    """CUDA devices visible to this process, via the driver API (stdlib ctypes; no torch import).

    Honours CUDA_VISIBLE_DEVICES like every CUDA program. 0 when there is no driver library."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    if lib.cuInit(0) != 0:
        return 0
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


def _import_vllm() -> Any:
    try:
        import vllm  # noqa: PLC0415 - only inside the vLLM environment
    except Exception as err:  # ImportError, or a broken install raising anything at import time
        print(
            f"vllm is not importable by {sys.executable}: {type(err).__name__}: {err}\n"
            "Build the vLLM environment with infra/envs/vllm/setup.sh and point sampling.vllm_python at "
            "its interpreter.",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_NO_VLLM) from None
    return vllm


def _require_cuda(tensor_parallel_size: int) -> None:
    devices = cuda_device_count()
    if devices == 0:
        print(
            "no CUDA device is visible to the vLLM worker (no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides "
            "every GPU); vLLM's CUDA build cannot run here. Use sampling.engine=hf on a CPU machine.",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_NO_CUDA)
    if devices < tensor_parallel_size:
        print(
            f"sampling.tensor_parallel_size={tensor_parallel_size} but only {devices} CUDA device(s) are visible",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_NO_CUDA)


# ----------------------------------------------------------------------------------------- serving


def run_job(llm: Any, vllm: Any, lora_request: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Generate for one request file and write the response file; returns the status payload."""
    start = time.perf_counter()
    indices, prompts = read_request(job["request"])
    images = read_images(job["request"])
    if images is not None and len(images) != len(prompts):
        raise BadInput(f"request {job['request']}: {len(images)} image lists for {len(prompts)} prompts")
    prompts = request_prompts(prompts, images)
    sampling = job["sampling"]
    per_prompt = [vllm.SamplingParams(**sampling_kwargs(sampling, i)) for i in indices]
    outputs = llm.generate(prompts, per_prompt, use_tqdm=False, lora_request=lora_request) if prompts else []
    table = response_table(indices, outputs)
    write_table_atomic(table, job["output"])
    tokens = sum(len(ids) for ids in table.column("token_ids").to_pylist())
    return {"ok": True, "rows": table.num_rows, "generated_tokens": tokens, "seconds": time.perf_counter() - start}


def load_weights_in_worker(worker: Any, path: str) -> int:
    """Run INSIDE each vLLM worker by ``LLM.collective_rpc`` (which passes the worker as the first
    argument): load the safetensors file at `path` into the served model in place; return the tensor count.
    The model's ``load_weights`` takes (name, tensor) pairs under the HF checkpoint's names and does the
    sharding and fusing (qkv, gate/up) itself, as when it loaded the checkpoint folder."""
    from safetensors.torch import load_file  # noqa: PLC0415 - vLLM's environment has it

    tensors = load_file(path)
    worker.model_runner.model.load_weights(weights=list(tensors.items()))
    return len(tensors)


def run_control(llm: Any, job: dict[str, Any]) -> dict[str, Any]:
    """A lifecycle job: update_weights | sleep | wake_up; returns the status payload."""
    start = time.perf_counter()
    op = job["op"]
    if op == "update_weights":
        loaded = llm.collective_rpc(load_weights_in_worker, args=(job["weights"],))
        if callable(getattr(llm, "reset_prefix_cache", None)):
            llm.reset_prefix_cache()
        out: dict[str, Any] = {"tensors": loaded}
    elif op == "sleep":
        llm.sleep(level=int(job.get("level", 1)))
        out = {}
    elif op == "wake_up":
        llm.wake_up(tags=job.get("tags"))
        out = {}
    else:
        raise BadInput(f"unknown op {op!r}")
    return {"ok": True, "op": op, "seconds": time.perf_counter() - start, **out}


def serve(engine_params_path: str) -> int:
    """Load the model once, then answer jobs read from stdin until it closes."""
    try:
        with open(engine_params_path, encoding="utf-8") as fh:
            engine = json.load(fh)
        kwargs = llm_kwargs(engine)
    except (OSError, ValueError) as err:
        print(f"bad engine parameters {engine_params_path}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    vllm = _import_vllm()
    if engine.get("require_cuda", True):
        _require_cuda(kwargs["tensor_parallel_size"])
    llm = vllm.LLM(**kwargs)
    lora_request = None
    if engine.get("lora_path"):
        from vllm.lora.request import LoRARequest  # noqa: PLC0415

        lora_request = LoRARequest("spark-adapter", 1, engine["lora_path"])
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            status = run_control(llm, job) if "op" in job else run_job(llm, vllm, lora_request, job)
        except BadInput as err:
            status = {"ok": False, "error": f"bad input: {err}"}
        except Exception:  # report any generation failure to the caller; the worker stays usable
            status = {"ok": False, "error": traceback.format_exc()}
        write_json_atomic(status, job["status"])
    return 0


def probe() -> int:
    """Print what this environment offers (used to check a freshly built vLLM environment)."""
    vllm = _import_vllm()
    info = {"python": sys.executable, "vllm": getattr(vllm, "__version__", "unknown"), "cuda_devices": cuda_device_count()}
    print(json.dumps(info))
    return 0 if info["cuda_devices"] > 0 else EXIT_NO_CUDA


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--engine-params", help="JSON file of engine parameters; then jobs are read from stdin")
    mode.add_argument("--probe", action="store_true", help="print vLLM version and CUDA device count, then exit")
    try:
        args = parser.parse_args(argv)
    except SystemExit as err:
        return EXIT_BAD_INPUT if err.code else 0
    return probe() if args.probe else serve(args.engine_params)


if __name__ == "__main__":
    sys.exit(main())
