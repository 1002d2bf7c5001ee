"""The vision-language pieces on CPU: the tiny Qwen2.5-VL, image checks, the visual task, image parts in
prompts (judgment, reflection, every self-reflection round) and multimodal log-probs in the trainer."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from spark_core import images as img_mod
from spark_core.chat import formatter, question_messages
from spark_core.config import DataConfig, RewardDataConfig, TinyModelConfig, TrainConfig
from spark_core.data import DataError, make_visual_arithmetic, read_questions
from spark_core.engines.base import Completion
from spark_core.models import build_tiny, tiny_folder_name
from spark_core.reflection import self_reflect_batch
from spark_core.reward_data import build_reward_items
from spark_core.trainer import Trainer
from spark_core.vision import IMAGE_PAD, VisionInputs
from spark_core.vision_config import TinyVisionConfig


def _png(size=(40, 30), colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory: pytest.TempPathFactory):
    cfg = TinyModelConfig(vision=TinyVisionConfig())
    model, tok = build_tiny(cfg, tmp_path_factory.mktemp("vl-models"))
    return cfg, model, tok


# ------------------------------------------------------------------------------------------ model


def test_tiny_vl_is_a_small_cached_qwen25_vl_with_its_processor(tiny_vl, tmp_path: Path) -> None:
    cfg, model, tok = tiny_vl
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert tok.image_processor is not None and tok.convert_tokens_to_ids(IMAGE_PAD) == model.config.image_token_id
    assert tiny_folder_name(cfg).startswith("tiny-vl-")
    # the text tiny model keeps the folder name it had before `vision` existed
    assert tiny_folder_name(TinyModelConfig()) == "tiny-263ba30c3904"
    again, _ = build_tiny(cfg, tmp_path)  # a fresh cache: built again from the seed
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# ------------------------------------------------------------------------------------------ data


def test_visual_arithmetic_is_seeded_and_renders_the_expression() -> None:
    small = {"n_train": 20, "n_test": 8}
    data = DataConfig(source="visual_arithmetic", arithmetic=small)
    a, b = make_visual_arithmetic(data, "test"), make_visual_arithmetic(data, "test")
    assert [q.images for q in a] == [q.images for q in b]
    assert a[0].question == data.visual.question and len(a[0].images) == 1
    with Image.open(io.BytesIO(a[0].images[0])) as im:
        assert im.size == (data.visual.width, data.visual.height)
    noisy = make_visual_arithmetic(DataConfig(source="visual_arithmetic", arithmetic=small, visual={"noise": 200}), "test")
    assert noisy[0].answer == a[0].answer and noisy[0].images != a[0].images


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_image_column_reads_paths_and_names_bad_images(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    Image.new("1", (8000, 7000)).save(tmp_path / "huge.png")  # 56 M pixels, a small file
    rows = [{"q": "What colour?", "a": "red", "img": "ok.png"},
            {"q": "What colour?", "a": "red", "img": "empty.png"},
            {"q": "What colour?", "a": "red", "img": "junk.png"},
            {"q": "What colour?", "a": "red", "img": "huge.png"},
            {"q": "What colour?", "a": "red", "img": "missing.png"}]
    path = _jsonl(tmp_path / "vqa.jsonl", rows)
    kw = dict(question_column="q", answer_column="a", image_column="img")
    with pytest.raises(DataError, match=r"line 2, row 1: image is empty \(0 bytes\)"):
        read_questions("file", path, **kw)
    questions, skipped = read_questions("file", path, on_bad_row="skip", **kw)
    assert skipped == 4 and len(questions) == 1 and questions[0].images == ((tmp_path / "ok.png").read_bytes(),)
    for row, why in ((2, "not a readable image"), (3, "8000x7000 pixels"), (4, "image file not found")):
        with pytest.raises(DataError, match=why):
            read_questions("file", _jsonl(tmp_path / f"one{row}.jsonl", [rows[row]]), **kw)


def test_parquet_image_bytes_and_hf_image_dicts(tmp_path: Path) -> None:
    red, blue = _png(colour=(255, 0, 0)), _png(colour=(0, 0, 255))
    path = tmp_path / "set.parquet"
    pd.DataFrame({"query": ["Which?", "Which?"], "answer": ["1", "2"],
                  "image": [{"bytes": red, "path": None}, {"bytes": blue, "path": None}]}).to_parquet(path)
    questions, _ = read_questions("file", str(path), question_column="query", image_column="image",
                                  reject_duplicates=True)
    assert [q.images for q in questions] == [(red,), (blue,)]  # same text, other image: no duplicate


def test_store_keeps_each_image_once_content_addressed(tmp_path: Path) -> None:
    from spark_core.store import Store

    store = Store(str(tmp_path / "store"))
    png = _png()
    refs = img_mod.put_images(store, "r1", [png, png])
    assert refs[0] == refs[1] and refs[0].endswith(".png")
    assert img_mod.get_image(store, "r1", refs[0]) == png
    assert len(list((tmp_path / "store" / "runs" / "r1" / "images").iterdir())) == 1


def test_model_image_caps_pixels() -> None:
    big = _png(size=(2000, 1000))
    shown = img_mod.model_image(big, max_pixels=img_mod.MAX_PIXELS)
    assert shown.size[0] * shown.size[1] <= img_mod.MAX_PIXELS and abs(shown.size[0] / shown.size[1] - 2) < 0.01


# ------------------------------------------------------------------------------------------ prompts


def _verified(ref: str) -> pd.DataFrame:
    rows = []
    for k, (answer, reward) in enumerate([("3", 1.0), ("4", 0.0), ("3", 1.0), ("5", 0.0)]):
        rows.append({"question_id": "q1", "sample_idx": k, "question": "What is shown?",
                     "completion": f"It is \\boxed{{{answer}}}.", "label": "3", "answer": answer,
                     "reward": reward, "verify_status": "ok", "images": [ref]})
    return pd.DataFrame(rows)


def test_judgment_and_reflection_items_carry_their_questions_image(tiny_vl) -> None:
    _, _, tok = tiny_vl
    ref = "ab" * 32 + ".png"
    items = build_reward_items(_verified(ref), RewardDataConfig(), formatter(tok), iteration=1, seed=0).to_pylist()
    assert {it["kind"] for it in items} >= {"reflection"} and len(items) >= 2
    for it in items:
        assert it["images"] == [ref]
        assert it["prompt"].count(IMAGE_PAD) == 1
        assert it["prompt"].index(IMAGE_PAD) < it["prompt"].index("What is shown?")  # image before the question


class _Scripted:
    """Answers wrongly, judges No: every question goes through every reflection round."""

    def __init__(self) -> None:
        self.calls: list = []

    def generate(self, prompts, params, images=None):
        self.calls.append((list(prompts), images))
        return [[Completion("No. \\boxed{No}" if "correct" in p else "So \\boxed{7}", [1])] for p in prompts]

    def close(self) -> None: ...


def test_self_reflection_shows_the_image_in_every_round(tiny_vl) -> None:
    _, _, tok = tiny_vl
    engine = _Scripted()
    data = DataConfig()
    png = _png()
    traces = self_reflect_batch(engine, formatter(tok), ["What is shown?", "Which colour?"],
                                question_messages=lambda q: question_messages(data, q),
                                max_rounds=2, images=[(png,), (png,)])
    assert all(t.n_revisions == 2 for t in traces)
    assert len(engine.calls) == 5  # a0, then judge + revise twice
    for prompts, images in engine.calls:
        assert images == [[png], [png]]
        assert all(p.count(IMAGE_PAD) == 1 for p in prompts)


# ------------------------------------------------------------------------------------------ trainer


def _rows(tok, pngs: list[bytes | None]) -> tuple[pd.DataFrame, dict[str, bytes]]:
    store: dict[str, bytes] = {}
    rows = []
    for k, png in enumerate(pngs):
        refs = []
        if png is not None:
            refs = [img_mod.image_ref(png)]
            store[refs[0]] = png
        messages = question_messages(DataConfig(), f"Question {k}?", len(refs))
        prompt = formatter(tok)(messages)
        for j in range(2):
            completion = tok(f" answer {k} {j} \\boxed{{{k + j}}}", add_special_tokens=False).input_ids
            rows.append({"question_id": f"q{k}", "prompt": prompt, "completion_ids": completion,
                         "reward": float(j), "images": refs})
    return pd.DataFrame(rows), store


def test_multimodal_batch_logprobs_equal_one_sample_at_a_time(tiny_vl) -> None:
    _, model, tok = tiny_vl
    pngs = [_png((56, 56), (255, 0, 0)), _png((112, 28), (0, 255, 0)), None, _png((84, 56), (0, 0, 255))]
    rows, blobs = _rows(tok, pngs)

    def scores(micro: int) -> list[torch.Tensor]:
        trainer = Trainer(model, tok, TrainConfig(micro_batch_size=micro, kl_coef=0), "cpu", total_steps=4)
        trainer.vision = VisionInputs(tok, tok.image_processor, blobs.__getitem__)
        seqs = trainer._prepare(rows)
        assert sum(s.vision is not None for s in seqs) == 6  # the text-only question has none
        return trainer._score(model, seqs)

    batched, single = scores(8), scores(1)
    for a, b in zip(batched, single):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    # the image matters: another image gives other log-probs for the same tokens
    other, _ = _rows(tok, [_png((56, 56), (0, 0, 0))] + pngs[1:])
    trainer = Trainer(model, tok, TrainConfig(micro_batch_size=8, kl_coef=0), "cpu", total_steps=4)
    trainer.vision = VisionInputs(tok, tok.image_processor, {**blobs, img_mod.image_ref(_png((56, 56), (0, 0, 0))): _png((56, 56), (0, 0, 0))}.__getitem__)
    changed = trainer._score(model, trainer._prepare(other))
    assert not torch.allclose(changed[0], batched[0], atol=1e-6)


def test_reference_scores_of_image_prompts_equal_a_full_forward(tiny_vl, monkeypatch) -> None:
    """Text prompts shared by K completions are scored once per prompt for the KL reference
    (prefix_scoring); prompts with images must keep the full forward that passes their vision inputs."""
    import copy

    from spark_core import prefix_scoring

    monkeypatch.setattr(prefix_scoring, "MIN_SAVED_FLOPS", {"cpu": 0.0, "cuda": 0.0})  # as for a large model

    _, model, tok = tiny_vl
    rows, blobs = _rows(tok, [_png((56, 56), (255, 0, 0)), _png((112, 28), (0, 255, 0))])  # 2 samples each

    def reference(once: bool) -> list[torch.Tensor]:
        ref = copy.deepcopy(model)  # the trainer freezes its reference: never the shared fixture's model
        trainer = Trainer(copy.deepcopy(model), tok, TrainConfig(micro_batch_size=8, kl_coef=0.01), "cpu",
                          total_steps=4, ref_model=ref)
        trainer.score_prompts_once = once
        trainer.vision = VisionInputs(tok, tok.image_processor, blobs.__getitem__)
        return trainer._score(ref, trainer._prepare(rows))

    for a, b in zip(reference(True), reference(False)):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)


def test_multimodal_training_step_updates_the_vision_tower(tiny_vl) -> None:
    import copy

    _, model, tok = tiny_vl
    model = copy.deepcopy(model)
    rows, blobs = _rows(tok, [_png((56, 56), (255, 0, 0)), _png((112, 28), (0, 255, 0))])
    ref = copy.deepcopy(model)
    trainer = Trainer(model, tok, TrainConfig(lr=1e-2, micro_batch_size=2, kl_coef=0.01), "cpu", total_steps=4,
                      ref_model=ref)
    trainer.vision = VisionInputs(tok, tok.image_processor, blobs.__getitem__)
    before = copy.deepcopy(model.model.visual.state_dict())
    out = trainer.train_phase(rows, "policy")
    assert out[0]["num_tokens"] == sum(len(c) for c in rows["completion_ids"])  # completion tokens only
    after = model.model.visual.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # gradients reached the vision tower


def test_rows_with_images_need_vision_inputs(tiny_vl) -> None:
    _, model, tok = tiny_vl
    rows, _ = _rows(tok, [_png()])
    with pytest.raises(ValueError, match="rows carry images"):
        Trainer(model, tok, TrainConfig(kl_coef=0), "cpu", total_steps=4)._prepare(rows)


def test_spark_show_dumps_one_image(tmp_path: Path, tiny_cfg) -> None:
    from typer.testing import CliRunner

    from spark_cli.main import app
    from spark_core.store import Store

    store = Store(str(tmp_path / "store"))
    store.write_run("r1", tiny_cfg)
    png = _png()
    (ref,) = img_mod.put_images(store, "r1", [png])
    target = tmp_path / "shown.png"
    result = CliRunner().invoke(app, ["show", f"{store.uri}/runs/r1", "--image", ref, "--out", str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_bytes() == png
    missing = CliRunner().invoke(app, ["show", f"{store.uri}/runs/r1", "--image", "0" * 64 + ".png"])
    assert missing.exit_code != 0 and "not in the store" in missing.output


def test_lora_on_the_vision_language_model_trains_adapters_with_images(tiny_vl, tmp_path: Path) -> None:
    import copy

    from spark_core.config import LoraConfig
    from spark_core.lora import AdapterDisabledReference, apply_lora, export_for_engine
    from spark_core.models import load_tokenizer

    _, model, tok = tiny_vl
    peft = apply_lora(copy.deepcopy(model), LoraConfig(rank=4, alpha=8))
    rows, blobs = _rows(tok, [_png((56, 56), (255, 0, 0)), _png((112, 28), (0, 255, 0))])
    trainer = Trainer(peft, tok, TrainConfig(lr=1e-2, micro_batch_size=2, kl_coef=0.01), "cpu", total_steps=4,
                      ref_model=AdapterDisabledReference(peft))
    trainer.vision = VisionInputs(tok, tok.image_processor, blobs.__getitem__)
    frozen = {k: v.clone() for k, v in peft.state_dict().items() if ".lora_" not in k}
    adapters = {k: v.clone() for k, v in peft.state_dict().items() if "lora_B" in k}
    trainer.train_phase(rows, "policy")
    trainer.train_phase(rows, "policy")  # second step: lora_B left zero, now the KL term sees a difference
    state = peft.state_dict()
    assert all(torch.equal(frozen[k], state[k]) for k in frozen)  # base (vision tower included) frozen
    assert any(not torch.equal(adapters[k], state[k]) for k in adapters)
    folder = export_for_engine(peft, tok, tmp_path / "ckpt", "merged")
    assert load_tokenizer(folder).image_processor is not None


def test_vl_preference_set_shows_the_image_to_the_judge(tiny_vl, tmp_path: Path) -> None:
    from spark_core.benchmarks import load_preference_set
    from spark_core.config import BenchmarkConfig
    from spark_core.evaluation import evaluate_preference

    _, _, tok = tiny_vl
    png = _png()
    path = tmp_path / "vlrb.parquet"
    pd.DataFrame({"query": ["How many dots?"], "chosen": ["Three. \\boxed{3}"], "rejected": ["Two. \\boxed{2}"],
                  "image": [{"bytes": png, "path": None}]}).to_parquet(path)
    bcfg = BenchmarkConfig(name="vlrb", source="preference", path=str(path), question_column="query",
                           image_column="image")
    pairs = load_preference_set(bcfg)
    assert pairs[0].images == (png,)
    engine = _Scripted()
    table, summary = evaluate_preference(engine, formatter(tok), pairs, max_new_tokens=8)
    assert summary["n"] == 1
    ((prompts, images),) = engine.calls
    assert images == [[png], [png]] and all(p.count(IMAGE_PAD) == 1 for p in prompts)  # both orders


def test_text_config_hash_ignores_the_unused_vision_fields() -> None:
    from spark_core.config import load_config

    text = load_config(preset="tiny")
    assert load_config(preset="tiny", overrides={"data": {"visual": {"noise": 5}}}).config_hash() == text.config_hash()
    assert load_config(preset="tiny", overrides={"data": {"image_column": "img"}}).config_hash() != text.config_hash()
    vl = load_config(preset="tiny-vl")
    assert load_config(preset="tiny-vl", overrides={"data": {"visual": {"noise": 5}}}).config_hash() != vl.config_hash()


def test_row_images_accepts_decoded_pil_images_and_lists() -> None:
    pil = Image.new("RGB", (10, 12), (4, 5, 6))
    (data,) = img_mod.row_images(pil)
    with Image.open(io.BytesIO(data)) as back:
        assert back.size == (10, 12) and back.format == "PNG"
    two = img_mod.row_images([_png(), {"bytes": _png(colour=(0, 0, 0)), "path": None}])
    assert len(two) == 2
    with pytest.raises(img_mod.ImageError, match="image 1: image is empty"):
        img_mod.row_images([_png(), b""])


def test_mathvista_style_benchmark_by_local_path_with_column_mapping(tmp_path: Path) -> None:
    from spark_core.benchmarks import load_benchmark
    from spark_core.config import BenchmarkConfig, load_config
    from spark_core.evaluation import evaluate_benchmark

    png = _png()
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "1.png").write_bytes(png)
    path = tmp_path / "testmini.jsonl"
    _jsonl(path, [{"pid": "1", "query": "How many bars?", "answer": "3", "image": "imgs/1.png"}])
    cfg = load_config(preset="tiny-vl")
    bcfg = BenchmarkConfig(name="mathvista", source="file", path=str(path), question_column="query",
                           image_column="image")
    (q,) = load_benchmark(bcfg, cfg)
    assert q.images == (png,)
    engine = _Scripted()
    table, summary = evaluate_benchmark(engine, lambda m: json.dumps(m), [q],
                                        question_messages=lambda text: question_messages(cfg.data, text),
                                        eval_cfg=cfg.eval, max_new_tokens=8)
    assert table.column("images").to_pylist() == [[img_mod.image_ref(png)]]
    assert {"accuracy", "accuracy_reflect"} <= set(summary)
    assert all(images == [[png]] for _, images in engine.calls)  # first answer and every round


def test_gradient_checkpointing_gives_the_same_multimodal_update(tiny_vl) -> None:
    """The 7B preset trains with gradient checkpointing: with images it must not change the step."""
    import copy

    _, model, tok = tiny_vl
    rows, blobs = _rows(tok, [_png((56, 56), (255, 0, 0)), _png((112, 28), (0, 255, 0))])
    results = []
    for checkpointing in (False, True):
        m = copy.deepcopy(model)
        trainer = Trainer(m, tok, TrainConfig(lr=1e-2, micro_batch_size=2, kl_coef=0,
                                              gradient_checkpointing=checkpointing), "cpu", total_steps=4)
        trainer.vision = VisionInputs(tok, tok.image_processor, blobs.__getitem__)
        assert bool(getattr(m, "is_activation_checkpointing", getattr(m, "is_gradient_checkpointing", False))) is checkpointing
        trainer.train_phase(rows, "policy")
        results.append(m.state_dict())
    plain, checkpointed = results
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)
