"""The engine lifecycle inside an iteration of several RL steps (engines.base), with the REAL vllm engine
and worker subprocess on the CPU, where the ``vllm`` package is the recording stand-in of
tests/unit/fake_vllm (NOT vLLM: it says nothing about real vLLM's memory or sampling).

* ``sampling.vllm_sleep_mode``: ONE worker for the whole iteration; it sleeps before every update and
  receives the trainer's weights in place (``collective_rpc`` -> ``model.load_weights``), all of them,
  under the model's own names; the last update's weights are the iteration's checkpoint.
* without it: the worker stops before each update and the next phase starts a new one on a local
  folder of the live weights (not the object store, which holds one checkpoint per iteration).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spark_core import stages as S
from spark_core.config import SparkConfig
from spark_core.store import Store

FAKE = Path(__file__).parent / "fake_vllm"
RUN = "life"


def _cfg(tiny_cfg: SparkConfig, store_dir: Path, keep: bool) -> SparkConfig:
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.store.uri = str(store_dir)
    cfg.iterations, cfg.steps_per_iteration = 1, 2
    cfg.eval.every = 0
    cfg.sampling.engine, cfg.sampling.vllm_python, cfg.sampling.vllm_sleep_mode = "vllm", sys.executable, keep
    return cfg


def _run(cfg: SparkConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Store, list[dict]]:
    from flows.iteration import run_iteration, start_run
    from flows.steps import Steps

    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("PYTHONPATH", str(FAKE))  # the worker subprocess imports the stand-in as `vllm`
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    ws = S.workspace()
    ws.close()
    try:
        start_run(cfg, cfg.store.uri, RUN, lambda: None, Steps.direct())
        run_iteration(cfg, cfg.store.uri, RUN, 1, lambda: None, Steps.direct())
    finally:
        ws.close()  # stops the worker
    return Store(cfg.store.uri), [json.loads(line) for line in record.read_text().splitlines()]


def _updates(store: Store) -> int:
    return sum(1 for stage in store.list_stages(RUN, 1) if stage.startswith("train/"))


def test_one_vllm_worker_serves_the_iteration_and_takes_weights_in_place(
        tiny_cfg: SparkConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tiny_cfg, tmp_path / "store", keep=True)
    store, rec = _run(cfg, monkeypatch, tmp_path)
    kinds = [r["kind"] for r in rec]
    assert kinds.count("LLM") == 1  # one worker process for both steps, all phases
    updates = _updates(store)
    assert updates >= 2 and kinds.count("sleep") == kinds.count("load_weights") == updates
    assert all(kinds[i + 2] == "load_weights" for i, k in enumerate(kinds) if k == "sleep")  # sleep, wake, load
    final = load_file(str(Path(store.stage_uri(RUN, 1, "checkpoint")) / "model.safetensors"))
    loads = [r for r in rec if r["kind"] == "load_weights"]
    assert set(loads[-1]["names"]) >= set(final)  # every weight the checkpoint holds, under its own name
    # the digest the stand-in computed of the last weights it received is the final checkpoint's
    digest = sum(float(t.double().sum()) for t in final.values())
    tensors, value = loads[-1]["version"].split(":")
    assert float(value) == pytest.approx(digest + _tied_extra(final, loads[-1]["names"]), rel=1e-9)
    assert not [s for s in store.list_stages(RUN, 1) if "checkpoint" in s and s != "checkpoint"]


def _tied_extra(final: dict[str, torch.Tensor], names: list[str]) -> float:
    """A state dict lists a tied lm_head that the safetensors file leaves out."""
    if "lm_head.weight" in names and "lm_head.weight" not in final:
        return float(final["model.embed_tokens.weight"].double().sum())
    return 0.0


def test_without_sleep_mode_the_worker_restarts_on_a_local_folder_of_the_live_weights(
        tiny_cfg: SparkConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tiny_cfg, tmp_path / "store", keep=False)
    store, rec = _run(cfg, monkeypatch, tmp_path)
    starts = [r["model"] for r in rec if r["kind"] == "LLM"]
    samplings = sum(1 for s in store.list_stages(RUN, 1) if s.split("/")[0] in ("samples", "reward_samples"))
    assert len(starts) == samplings  # one worker per sampling phase
    assert starts[0] == store.stage_uri(RUN, 0, "checkpoint")
    assert all(Path(m).name.startswith("spark-live-") for m in starts[1:])  # spilled live weights, not the store
    assert "load_weights" not in [r["kind"] for r in rec]
