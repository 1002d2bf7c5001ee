"""The `vllm` engine on a CPU machine: wire format, parameter mapping and error paths.

vLLM itself cannot run here (no GPU; its CUDA wheel is not installed). The worker subprocess is the real
``spark_core/engines/vllm_worker.py``; only the ``vllm`` package it imports is replaced by the stand-in in
``tests/unit/fake_vllm`` (put on the worker's PYTHONPATH), which records the calls it receives.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spark_core.config import load_config
from spark_core.engines import vllm_worker as wire
from spark_core.engines.base import SamplingParams
from spark_core.engines.vllm import VLLMEngine, VLLMEngineError, sampling_payload

FAKE = Path(__file__).parent / "fake_vllm"


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture
def fake_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(FAKE)
    env["FAKE_VLLM_RECORD"] = str(tmp_path / "record.jsonl")
    return env


def records(env: dict[str, str]) -> list[dict]:
    path = Path(env["FAKE_VLLM_RECORD"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------------- pure mapping


def test_sampling_config_maps_onto_vllm_parameters() -> None:
    params = SamplingParams(n=8, temperature=0.7, top_p=0.9, max_new_tokens=768, seed=5, stop=("</s>",))
    payload = sampling_payload(params)
    assert payload == {"n": 8, "temperature": 0.7, "top_p": 0.9, "max_tokens": 768, "seed": 5, "stop": ["</s>"]}
    kw = wire.sampling_kwargs(payload, prompt_index=3)
    assert kw == {"n": 8, "temperature": 0.7, "top_p": 0.9, "max_tokens": 768,
                  "seed": wire.prompt_seed(5, 3), "stop": ["</s>"]}
    # each prompt gets its own seed (vLLM seeds per request) and seeds stay in 31 bits
    seeds = {wire.prompt_seed(5, i) for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**31 for s in seeds)
    assert wire.prompt_seed(6, 0) != wire.prompt_seed(5, 0)


def test_engine_parameters_map_onto_llm_kwargs() -> None:
    kw = wire.llm_kwargs({"model": "/m", "tensor_parallel_size": 4, "gpu_memory_utilization": 0.6,
                          "seed": 42, "dtype": "bfloat16", "require_cuda": True})
    assert kw == {"model": "/m", "tokenizer": "/m", "tensor_parallel_size": 4, "gpu_memory_utilization": 0.6,
                  "seed": 42, "dtype": "bfloat16", "trust_remote_code": False}
    lora = wire.llm_kwargs({"model": "/m", "lora_path": "/m/adapter", "max_lora_rank": 16})
    assert lora["enable_lora"] is True and lora["max_lora_rank"] == 16


@pytest.mark.parametrize(
    "engine, match",
    [
        ({"model": "/m", "tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"model": "/m", "gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"model": "/m", "tensor_parallel_size": True}, "wrong type"),
        ({"model": "/m", "bogus": 1}, "unknown key"),
        ({"tensor_parallel_size": 1}, "missing key 'model'"),
    ],
)
def test_bad_engine_parameters_are_rejected(engine: dict, match: str) -> None:
    with pytest.raises(wire.BadInput, match=match):
        wire.llm_kwargs(engine)


def test_bad_sampling_parameters_are_rejected() -> None:
    with pytest.raises(wire.BadInput, match="stop"):
        wire.sampling_kwargs({"n": 1, "max_tokens": 4, "stop": [""]}, 0)
    with pytest.raises(wire.BadInput, match=">= 1"):
        wire.sampling_kwargs({"n": 0, "max_tokens": 4}, 0)


def test_factory_maps_the_config(checkpoint: Path) -> None:
    from spark_core.engines.factory import vllm_engine_from_config

    cfg = load_config(preset="tiny", overrides={"sampling": {
        "engine": "vllm", "vllm_python": sys.executable, "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.5}, "model": {"dtype": "bfloat16"}, "seed": 9})
    engine = vllm_engine_from_config(cfg, checkpoint)
    assert engine.engine_params["tensor_parallel_size"] == 2
    assert engine.engine_params["gpu_memory_utilization"] == 0.5
    assert engine.engine_params["dtype"] == "bfloat16" and engine.engine_params["seed"] == 9
    assert engine.engine_params["require_cuda"] is False  # the tiny preset runs on the CPU
    assert not engine.running  # nothing starts before the first generate


# ------------------------------------------------------------------- worker subprocess, stand-in vllm


def test_worker_wire_format(tmp_path: Path, checkpoint: Path, fake_env: dict[str, str]) -> None:
    """Drive the worker directly: request Parquet in, response Parquet + status JSON out."""
    (tmp_path / "engine.json").write_text(json.dumps({"model": str(checkpoint), "require_cuda": False, "seed": 1}))
    pq.write_table(pa.table({"prompt_index": [0, 1], "prompt": ["a", "b"]}, schema=wire.REQUEST_SCHEMA),
                   tmp_path / "req.parquet")
    job = {"request": str(tmp_path / "req.parquet"), "output": str(tmp_path / "out.parquet"),
           "status": str(tmp_path / "status.json"),
           "sampling": {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 12, "seed": 4, "stop": []}}
    proc = subprocess.run([sys.executable, wire.__file__, "--engine-params", str(tmp_path / "engine.json")],
                          input=json.dumps(job) + "\n", text=True, env=fake_env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["ok"] and status["rows"] == 6
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema == wire.RESPONSE_SCHEMA
    rows = table.to_pylist()
    assert [(r["prompt_index"], r["sample_idx"]) for r in rows] == [(p, j) for p in (0, 1) for j in range(3)]
    assert all(len(r["text"]) <= 12 and r["token_ids"] == list(r["text"].encode()) for r in rows)
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}


def test_engine_generates_through_the_worker(checkpoint: Path, fake_env: dict[str, str]) -> None:
    params = SamplingParams(n=2, temperature=0.8, top_p=0.95, max_new_tokens=50, seed=7, stop=("END",))
    with VLLMEngine(checkpoint, sys.executable, tensor_parallel_size=1, gpu_memory_utilization=0.3,
                    dtype="float32", seed=11, require_cuda=False, env=fake_env) as engine:
        out = engine.generate(["p0", "p1", "p2"], params)
        again = engine.generate(["p0", "p1", "p2"], params)
        assert engine.running
        pid = engine._proc.pid  # noqa: SLF001 - checking that the worker is reused, not restarted
        engine.generate(["x"], SamplingParams(n=1, max_new_tokens=5, seed=1))
        assert engine._proc.pid == pid  # noqa: SLF001
    assert not engine.running
    assert [len(s) for s in out] == [2, 2, 2]
    assert [[c.text for c in s] for s in out] == [[c.text for c in s] for s in again]  # seeded
    assert out[0][0].text != out[0][1].text  # n samples differ
    assert all(c.finish_reason == "stop" and not c.text.endswith("END") for s in out for c in s)

    rec = records(fake_env)
    llm_calls = [r for r in rec if r["kind"] == "LLM"]
    assert len(llm_calls) == 1  # the model is loaded once per engine, not per call
    assert llm_calls[0] == {"kind": "LLM", "model": str(checkpoint), "tokenizer": str(checkpoint),
                            "tensor_parallel_size": 1, "gpu_memory_utilization": 0.3, "seed": 11,
                            "dtype": "float32", "trust_remote_code": False}
    first = [r for r in rec if r["kind"] == "generate"][0]
    assert first["prompts"] == ["p0", "p1", "p2"] and first["lora_request"] is None
    assert first["sampling"][2] == {"n": 2, "temperature": 0.8, "top_p": 0.95, "max_tokens": 50,
                                    "seed": wire.prompt_seed(7, 2), "stop": ["END"]}


def test_adapter_checkpoint_passes_a_lora_request(checkpoint: Path, fake_env: dict[str, str]) -> None:
    adapter = checkpoint / "adapter"
    adapter.mkdir()
    with VLLMEngine(checkpoint, sys.executable, require_cuda=False, lora_path=adapter, max_lora_rank=8,
                    env=fake_env) as engine:
        engine.generate(["q"], SamplingParams(n=1, max_new_tokens=4))
    rec = records(fake_env)
    assert rec[0]["enable_lora"] is True and rec[0]["max_lora_rank"] == 8
    assert rec[1]["lora_request"]["lora_path"] == str(adapter)


def test_empty_prompt_list_starts_nothing(checkpoint: Path, fake_env: dict[str, str]) -> None:
    engine = VLLMEngine(checkpoint, sys.executable, require_cuda=False, env=fake_env)
    assert engine.generate([], SamplingParams()) == []
    assert not engine.running and records(fake_env) == []


# ------------------------------------------------------------------------------------ error paths


def test_missing_interpreter_is_a_clear_error(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(VLLMEngineError, match="interpreter not found.*setup.sh"):
        VLLMEngine(checkpoint, tmp_path / "no-such-env" / "bin" / "python")
    with pytest.raises(VLLMEngineError, match="vllm_python is not set"):
        VLLMEngine(checkpoint, None)


def test_checkpoint_must_be_a_local_model_folder(tmp_path: Path) -> None:
    with pytest.raises(VLLMEngineError, match="no config.json"):
        VLLMEngine(tmp_path, sys.executable)


def test_vllm_not_importable_is_a_clear_error(checkpoint: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # this venv has no vllm
    engine = VLLMEngine(checkpoint, sys.executable, require_cuda=False, env=env)
    with pytest.raises(VLLMEngineError, match="vllm is not importable") as err:
        engine.generate(["q"], SamplingParams())
    assert "ModuleNotFoundError" in str(err.value)  # the worker's own message is in the log tail
    assert not engine.running


@pytest.mark.skipif(wire.cuda_device_count() > 0, reason="a CUDA device is present")
def test_missing_cuda_is_a_clear_error(checkpoint: Path, fake_env: dict[str, str]) -> None:
    engine = VLLMEngine(checkpoint, sys.executable, require_cuda=True, env=fake_env)
    with pytest.raises(VLLMEngineError, match="CUDA"):
        engine.generate(["q"], SamplingParams())
    assert records(fake_env) == []  # the model was never constructed


def test_worker_crash_reports_its_stderr_tail(checkpoint: Path, fake_env: dict[str, str]) -> None:
    fake_env["FAKE_VLLM_EXIT_ON"] = "boom"
    engine = VLLMEngine(checkpoint, sys.executable, require_cuda=False, env=fake_env)
    with pytest.raises(VLLMEngineError, match="exited with code 3") as err:
        engine.generate(["fine", "boom"], SamplingParams())
    assert "simulated CUDA out of memory" in str(err.value)
    assert not engine.running


def test_generation_error_is_reported_and_the_worker_survives(checkpoint: Path, fake_env: dict[str, str]) -> None:
    fake_env["FAKE_VLLM_RAISE_ON"] = "bad"
    with VLLMEngine(checkpoint, sys.executable, require_cuda=False, env=fake_env) as engine:
        with pytest.raises(VLLMEngineError, match="simulated generation error"):
            engine.generate(["bad prompt"], SamplingParams())
        assert engine.running
        assert len(engine.generate(["good"], SamplingParams(n=2))[0]) == 2


def test_worker_rejects_bad_arguments() -> None:
    proc = subprocess.run([sys.executable, wire.__file__], capture_output=True, text=True, timeout=60)
    assert proc.returncode == wire.EXIT_BAD_INPUT


def test_worker_imports_only_stdlib_pyarrow_and_vllm() -> None:
    """The worker runs in an environment without spark_core's dependencies: check its import statements
    (safetensors, for weight updates, is a dependency of vLLM itself)."""
    tree = ast.parse(Path(wire.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports would pull in the spark_core package"
            imported.add((node.module or "").split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "__future__"}
    # PIL decodes the images of vision-language requests (Pillow is a dependency of vLLM itself);
    # safetensors carries the trainer's weights to the worker (a dependency of vLLM too)
    assert third_party == {"pyarrow", "vllm", "PIL", "safetensors"}, third_party


def test_job_timeout_kills_the_worker(checkpoint: Path, fake_env: dict[str, str], tmp_path: Path) -> None:
    # a "python" that never answers: the engine must give up after job_timeout_s
    stuck = tmp_path / "stuck-python"
    stuck.write_text("#!/bin/sh\necho loading forever\nexec sleep 60\n")
    stuck.chmod(0o755)
    engine = VLLMEngine(checkpoint, stuck, require_cuda=False, env=fake_env, job_timeout_s=1.0)
    with pytest.raises(VLLMEngineError, match="ran past 1s") as err:
        engine.generate(["q"], SamplingParams())
    assert "loading forever" in str(err.value) and not engine.running


def test_images_travel_as_multi_modal_data(checkpoint: Path, fake_env: dict[str, str]) -> None:
    """Prompts with images reach ``LLM.generate`` as ``{"prompt", "multi_modal_data": {"image": [...]}}``,
    capped at images.MAX_PIXELS; prompts without images stay plain strings; the LLM reserves image slots."""
    import io

    from PIL import Image

    from spark_core.images import MAX_PIXELS

    def png(size: tuple[int, int]) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", size, (9, 9, 9)).save(buf, format="PNG")
        return buf.getvalue()

    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    prompts = [f"{placeholder}what?", "text only", f"{placeholder}{placeholder}compare"]
    images = [[png((40, 20))], [], [png((2048, 1024)), png((30, 30))]]
    with VLLMEngine(checkpoint, sys.executable, require_cuda=False, env=fake_env,
                    limit_mm_per_prompt={"image": 4}) as engine:
        out = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=20, seed=3), images=images)
        plain = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=20, seed=3))
    assert [len(s) for s in out] == [2, 2, 2]
    rec = records(fake_env)
    assert [r for r in rec if r["kind"] == "LLM"][0]["limit_mm_per_prompt"] == {"image": 4}
    mm, text = [r for r in rec if r["kind"] == "generate"]
    assert mm["prompts"] == prompts and text["images"] == [None, None, None]
    assert mm["images"][0] == [["RGB", [40, 20]]] and mm["images"][1] is None
    (mode, (w, h)), second = mm["images"][2]
    assert mode == "RGB" and w * h <= MAX_PIXELS and second == ["RGB", [30, 30]]
    assert out[0][0].text != plain[0][0].text  # the stand-in's text depends on the images it got


def test_factory_reserves_image_slots_for_vision_checkpoints(checkpoint: Path) -> None:
    from spark_core.engines.factory import _image_limit

    assert _image_limit(checkpoint) is None
    (checkpoint / "config.json").write_text(json.dumps({"vision_config": {}}))
    assert _image_limit(checkpoint) == {"image": 4}


# ------------------------------------------------------------ lifecycle: one worker per iteration


def test_one_worker_serves_an_iteration_and_takes_new_weights_in_place(checkpoint: Path,
                                                                       fake_env: dict[str, str]) -> None:
    """The protocol of engines.base on the real worker: start once, sleep while the trainer runs, load the
    trainer's weights in place (collective_rpc -> model.load_weights), wake, sample with the new weights."""
    import torch

    params = SamplingParams(n=2, max_new_tokens=40, seed=3)
    with VLLMEngine(checkpoint, sys.executable, require_cuda=False, env=fake_env, enable_sleep_mode=True) as engine:
        assert engine.supports_weight_update()
        before = engine.generate(["p"], params)
        pid = engine._proc.pid  # noqa: SLF001 - the same worker throughout
        for step in (1, 2):  # two training phases
            engine.sleep()
            engine.update_weights({"model.embed_tokens.weight": torch.full((3, 2), float(step)),
                                   "lm_head.weight": torch.zeros(3, 2)})
            after = engine.generate(["p"], params)
            assert after != before  # sampled by the new weights
            before = after
        assert engine._proc.pid == pid and engine.weight_updates == 2  # noqa: SLF001
    rec = records(fake_env)
    kinds = [r["kind"] + (f":{r['tags'][0]}" if r["kind"] == "wake_up" else "") for r in rec]
    assert kinds == ["LLM", "generate"] + ["sleep", "wake_up:weights", "load_weights", "reset_prefix_cache",
                                           "wake_up:kv_cache", "generate"] * 2
    assert rec[0]["enable_sleep_mode"] is True and rec[2]["level"] == 2
    loads = [r for r in rec if r["kind"] == "load_weights"]
    assert loads[0]["names"] == ["lm_head.weight", "model.embed_tokens.weight"]
    assert loads[0]["version"] != loads[1]["version"]


def test_weights_sent_before_the_worker_starts_are_loaded_first(checkpoint: Path, fake_env: dict[str, str]) -> None:
    import torch

    engine = VLLMEngine(checkpoint, sys.executable, require_cuda=False, env=fake_env)
    engine.update_weights({"w": torch.ones(2)})
    engine.sleep()  # no sleep mode, no worker: nothing to do
    assert not engine.running
    try:
        engine.generate(["p"], SamplingParams(n=1, max_new_tokens=8))
    finally:
        engine.close()
    assert [r["kind"] for r in records(fake_env)] == ["LLM", "load_weights", "reset_prefix_cache", "generate"]


def test_adapter_engines_are_restarted_not_updated(checkpoint: Path, fake_env: dict[str, str]) -> None:
    from spark_core.engines.base import supports_weight_update

    adapter = checkpoint / "adapter"
    adapter.mkdir()
    engine = VLLMEngine(checkpoint, sys.executable, require_cuda=False, lora_path=adapter, env=fake_env)
    assert not supports_weight_update(engine)
    with pytest.raises(VLLMEngineError, match="restart"):
        engine.update_weights({})
    assert supports_weight_update(VLLMEngine(checkpoint, sys.executable, require_cuda=False, env=fake_env))
    assert not supports_weight_update(object())  # engines without the optional method (hf, openai)


def test_an_engine_that_slept_needs_its_new_weights_before_it_samples(checkpoint: Path,
                                                                       fake_env: dict[str, str]) -> None:
    with VLLMEngine(checkpoint, sys.executable, require_cuda=False, env=fake_env, enable_sleep_mode=True) as engine:
        engine.generate(["p"], SamplingParams(n=1, max_new_tokens=4))
        engine.sleep()
        with pytest.raises(VLLMEngineError, match="update_weights first"):
            engine.generate(["p"], SamplingParams(n=1, max_new_tokens=4))
