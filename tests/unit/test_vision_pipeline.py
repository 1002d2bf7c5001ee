"""A tiny-vl iteration end to end on CPU (run_iteration with Steps.direct()): the question images reach
the policy sampling, the judgment/reflection items, the reward sampling, both training phases and the
evaluation (every reflection round), are stored once per question, and the checkpoint reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spark_core import layout, multimodal_batch, stages
from spark_core.config import load_config
from spark_core.store import Store


class _Recording:
    """The real engine, recording how many images came with each prompt of each call."""

    def __init__(self, inner, calls: list) -> None:
        self.inner, self.calls = inner, calls

    def generate(self, prompts, params, images=None):
        self.calls.append([len(x) for x in images] if images else [0] * len(prompts))
        return self.inner.generate(prompts, params, images=images)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def vl_run(tmp_path_factory: pytest.TempPathFactory):
    from flows.iteration import run_iteration, start_run
    from flows.steps import Steps
    from spark_core.engines.factory import make_engine

    root = tmp_path_factory.mktemp("vl")
    cfg = load_config(preset="tiny-vl", overrides={
        "store": {"uri": str(root / "store")}, "model": {"cache_dir": str(root / "models")}, "iterations": 1,
        # a small pool so the first iteration already pops a reward batch
        "reward_data": {"reward_batch_size": 2, "max_judgment_items": 1, "max_reflection_items": 1},
        "eval": {"benchmarks": [{"name": "visual_arithmetic", "source": "visual_arithmetic", "limit": 3}],
                 "pairwise": False},
    })
    calls: list = []
    trained_with_images: list = []
    ws = stages.workspace()
    ws.close()
    ws.engine_factory = lambda c, w: _Recording(make_engine(c, w.get_model(c), w.get_tokenizer(c), w.folder), calls)
    original = multimodal_batch.multimodal_inputs

    def spy(seqs, device):
        out = original(seqs, device)
        trained_with_images.append(out is not None and "pixel_values" in out)
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(multimodal_batch, "multimodal_inputs", spy)
    import spark_core.batching as batching

    mp.setattr(batching, "multimodal_inputs", spy)
    store = Store(cfg.store.uri)
    steps = Steps.direct()
    try:
        start_run(cfg, store.uri, "vl", lambda: None, steps)
        run_iteration(cfg, store.uri, "vl", 1, lambda: None, steps)
    finally:
        mp.undo()
        ws.engine_factory = None
        ws.close()
    return cfg, store, calls, trained_with_images


def _table(store: Store, stage: str):
    return store.read_table(store.stage_uri("vl", 1, stage)).to_pylist()


def test_images_are_referenced_and_stored_once(vl_run) -> None:
    cfg, store, _, _ = vl_run
    samples = _table(store, layout.SAMPLES)
    refs = {r["question_id"]: tuple(r["images"]) for r in samples}
    assert len(refs) == cfg.sampling.questions_per_iteration and all(len(v) == 1 for v in refs.values())
    for ref in {r for v in refs.values() for r in v}:
        assert layout.IMAGE_REF_RE.match(ref)
    image_dir = Path(cfg.store.uri) / "runs" / "vl" / "images"
    stored = sorted(p.name for p in image_dir.iterdir())
    eval_rows = store.read_table(store.stage_uri("vl", 1, layout.eval_stage("visual_arithmetic"))).to_pylist()
    expected = {r for v in refs.values() for r in v} | {r for row in eval_rows for r in row["images"]}
    assert set(stored) == expected  # one object per distinct image, none per rollout
    # samples, verified rows, reward items, pool, reward samples carry the references, not the bytes
    verified = _table(store, layout.VERIFIED)
    assert all(tuple(r["images"]) == refs[r["question_id"]] for r in verified)
    items = _table(store, layout.REWARD_ITEMS)
    assert items, "the run built no judgment/reflection items"
    for item in items:
        assert tuple(item["images"]) == refs[item["source_question_id"]]
    reward_samples = _table(store, layout.REWARD_SAMPLES)
    assert reward_samples and all(r["images"] for r in reward_samples)
    assert all(len(r["images"]) == 1 for r in eval_rows)
    part = next((Path(cfg.store.uri) / "runs" / "vl" / "iter=0001" / "samples").glob("*.parquet"))
    assert pq.read_schema(part).field("images").type.value_type == "string"


def test_judgment_and_reflection_prompts_carry_the_image(vl_run) -> None:
    _, store, _, _ = vl_run
    for item in _table(store, layout.REWARD_ITEMS):
        assert item["prompt"].count("<|image_pad|>") == len(item["images"]) == 1
        assert item["prompt"].count("<|vision_start|>") == 1


def test_images_reach_every_generate_call_and_both_training_phases(vl_run) -> None:
    _, store, calls, trained = vl_run
    # every generate call of the run (baseline eval, policy sampling, reward sampling, eval rounds) had
    # one image per prompt
    assert calls and all(counts and all(c == 1 for c in counts) for counts in calls)
    assert store.manifest(store.stage_uri("vl", 1, layout.TRAIN_REWARD))["rows"] >= 1
    assert trained and all(trained)  # every training forward of both phases saw pixel values
    trace = json.loads(store.read_table(store.stage_uri("vl", 1, layout.eval_stage("visual_arithmetic")))
                       .column("reflection_trace").to_pylist()[0])
    assert trace and trace[0]["completion"] is not None


def test_checkpoint_reloads_with_transformers(vl_run) -> None:
    from transformers import AutoModelForImageTextToText

    from spark_core.models import load_tokenizer

    _, store, _, _ = vl_run
    folder = store.download_checkpoint(store.stage_uri("vl", 1, layout.CHECKPOINT))
    model = AutoModelForImageTextToText.from_pretrained(str(folder))
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert load_tokenizer(folder).image_processor is not None
