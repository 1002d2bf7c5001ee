"""The transformers engine on the tiny model: shapes, exact token ids, determinism, greedy equality."""

from __future__ import annotations

import pytest
import torch

from spark_core.engines.base import Engine, SamplingParams
from spark_core.engines.hf import HFEngine

QUESTIONS = ["What is 1 + 2?", "What is 31 + 405? Put the answer in \\boxed{}.", "Is (A) correct? Yes or No."]


@pytest.fixture
def engine(tiny_model_and_tokenizer: tuple) -> HFEngine:
    model, tok = tiny_model_and_tokenizer
    # A freshly initialised model (std 0.02) is almost uniform and greedily repeats one token; larger
    # random weights make its outputs varied, so equality checks below compare non-trivial sequences.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return HFEngine(model, tok, batch_size=4)


def _prompts(engine: HFEngine) -> list[str]:
    tok = engine.tokenizer
    return [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]


def _raw_greedy(engine: HFEngine, prompt: str, max_new_tokens: int) -> list[int]:
    """Unbatched, unpadded `model.generate`, cut after the first stop token like the engine does."""
    enc = engine.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    out = engine.model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=engine.stop_token_ids,
        pad_token_id=engine.pad_token_id,
    )
    ids = out[0, enc.input_ids.shape[1] :].tolist()
    for k, tok in enumerate(ids):
        if tok in engine.stop_token_ids:
            return ids[: k + 1]
    return ids


def test_engine_satisfies_the_protocol(engine: HFEngine) -> None:
    assert isinstance(engine, Engine)
    engine.close()


def test_shapes_ids_and_text(engine: HFEngine) -> None:
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=1)
    result = engine.generate(_prompts(engine), params)  # 9 sequences in 3 batches of <= 4
    assert [len(row) for row in result] == [3, 3, 3]
    stops = set(engine.stop_token_ids)
    for row in result:
        for c in row:
            assert 1 <= len(c.token_ids) <= 10
            assert not any(t in stops for t in c.token_ids[:-1])  # no padding or stop inside
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in stops
            else:
                assert c.finish_reason == "length" and len(c.token_ids) == 10
            assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_stop_token_is_kept_in_ids_but_not_text(engine: HFEngine) -> None:
    # Force <|im_end|> to win every step: the model must stop at once, and that id is part of the output.
    eos = engine.tokenizer.eos_token_id
    bias = torch.zeros(len(engine.tokenizer))
    bias[eos] = 1e4
    hook = engine.model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        [[greedy]] = engine.generate(_prompts(engine)[:1], SamplingParams(n=1, temperature=0.0, max_new_tokens=5))
        [[sampled]] = engine.generate(_prompts(engine)[:1], SamplingParams(n=1, temperature=1.0, max_new_tokens=5))
    finally:
        hook.remove()
    for c in (greedy, sampled):
        assert c.token_ids == [eos] and c.text == "" and c.finish_reason == "stop"


def test_same_seed_same_samples_and_caller_rng_untouched(engine: HFEngine) -> None:
    prompts = _prompts(engine)
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = engine.generate(prompts, params)
    assert torch.equal(torch.get_rng_state(), before)
    assert engine.generate(prompts, params) == first
    other = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=6))
    assert other != first
    # Samples of one prompt differ from each other (they are not n copies of one draw).
    assert len({tuple(c.token_ids) for c in first[1]}) > 1


def test_greedy_equals_raw_generate_and_ignores_batching(engine: HFEngine) -> None:
    prompts = _prompts(engine)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=12)
    batched = engine.generate(prompts, params)  # left-padded batches mixing prompts of different lengths
    for prompt, row in zip(prompts, batched):
        expected = _raw_greedy(engine, prompt, 12)
        assert len(set(expected)) > 1  # a non-trivial sequence
        assert [c.token_ids for c in row] == [expected, expected]


def test_model_mode_is_restored(engine: HFEngine) -> None:
    engine.model.train()
    engine.generate(_prompts(engine)[:1], SamplingParams(n=1, max_new_tokens=2))
    assert engine.model.training


def test_stop_strings_cut_after_the_completing_token(engine: HFEngine) -> None:
    prompt = _prompts(engine)[0]
    base = SamplingParams(n=1, temperature=1.0, max_new_tokens=16, seed=11)
    [[free]] = engine.generate([prompt], base)
    tok = engine.tokenizer
    # Pick a purely alphabetic token from the middle of the free sample as the stop string.
    k = next(
        i for i in range(2, len(free.token_ids)) if tok.decode(free.token_ids[i : i + 1]).strip().isalpha()
    )
    stop = tok.decode(free.token_ids[k : k + 1]).strip()
    expected_len = next(
        j for j in range(1, len(free.token_ids) + 1) if stop in tok.decode(free.token_ids[:j], skip_special_tokens=True)
    )
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=16, seed=11, stop=(stop,))
    [[cut]] = engine.generate([prompt], params)
    assert cut.token_ids == free.token_ids[:expected_len]
    assert cut.finish_reason == "stop" and stop in cut.text


def test_prompts_prefilled_once_sample_what_full_prefills_sample(engine: HFEngine, monkeypatch) -> None:
    """A batch repeating prompts (n samples each, prompts of different lengths left-padded together) is
    prefilled once per distinct prompt, and greedy and sampled outputs equal those of plain `generate`;
    the tiny model saves too little compute for the default threshold and keeps plain `generate`."""
    import spark_core.prefix_scoring as prefix_scoring

    prompts = _prompts(engine)
    forwards: list[tuple[int, int]] = []  # (rows, tokens) of every model forward
    engine.model.register_forward_hook(lambda m, a, kw, o: forwards.append(tuple(kw["input_ids"].shape)),
                                       with_kwargs=True)
    engine.batch_size = 9  # all 3 x 3 rows in one batch
    ids = engine.tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left",
                           return_tensors="pt")
    assert engine._shared_prefill(ids.input_ids.repeat_interleave(3, 0), ids.attention_mask.repeat_interleave(3, 0)) is None
    monkeypatch.setattr(prefix_scoring, "MIN_SAVED_FLOPS", {"cpu": 0.0, "cuda": 0.0})
    for params in (SamplingParams(n=3, temperature=0.0, max_new_tokens=10),
                   SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=7)):
        got = {}
        for once in (True, False):
            engine.prefill_prompts_once = once
            forwards.clear()
            got[once] = [[c.token_ids for c in row] for row in engine.generate(prompts, params)]
            first = forwards[0]
            # prefilled once: 3 distinct rows of the prompt but its last token, then 9 rows of one token
            assert first == ((3, ids.input_ids.shape[1] - 1) if once else (9, ids.input_ids.shape[1]))
            if once:
                assert forwards[1] == (9, 1)
        assert got[True] == got[False]
        assert len({tuple(t) for row in got[True] for t in row}) > 1  # non-trivial outputs
