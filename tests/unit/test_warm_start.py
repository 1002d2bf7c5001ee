"""The warm-started tiny model: its supervised corpus (formats taught, judge verdicts random, no test
question), the determinism of its cache, and a 2-iteration run of the tiny preset with the REAL model
(no scripted engine) that reaches the reward phase."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spark_core import stages as S
from spark_core.config import SparkConfig
from spark_core.data import make_arithmetic
from spark_core.models import load_model_and_tokenizer, load_tokenizer, tiny_folder
from spark_core.store import Store
from spark_core.verify import extract_boxed
from spark_core.warm_start import corpus_digest, warm_start_corpus, warm_start_folder, warm_start_folder_name


@pytest.fixture(autouse=True)
def one_thread() -> object:
    """These models are tiny: on a shared 2-core machine one thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _small(tiny_cfg: SparkConfig, cache: Path, **warm: object) -> SparkConfig:
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.model.cache_dir = str(cache)
    cfg.model.warm_start = cfg.model.warm_start.model_copy(update={"steps": 3, "examples": 60, **warm})
    return cfg


def test_corpus_teaches_formats_with_random_verdicts(tiny_cfg: SparkConfig) -> None:
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.model.warm_start = cfg.model.warm_start.model_copy(update={"examples": 2000})
    tok = load_tokenizer(tiny_folder(cfg.model.tiny, cfg.model.cache_dir))
    corpus = warm_start_corpus(cfg, tok)
    assert corpus == warm_start_corpus(cfg, tok)  # deterministic
    kinds = {ex.kind for ex in corpus}
    assert kinds == {"solver", "pointwise", "pairwise", "reflection"}
    # Every reply ends in a boxed answer or verdict; prompts are chat-formatted like the pipeline's.
    assert all(extract_boxed(ex.reply) for ex in corpus)
    assert all(ex.prompt.endswith("<|im_start|>assistant\n") for ex in corpus)
    # No held-out test question is taught.
    test_questions = {q.question for q in make_arithmetic(cfg.data.arithmetic, "test")}
    solver = [ex for ex in corpus if ex.kind == "solver"]
    assert not any(q in ex.prompt for ex in solver for q in test_questions)
    # Some solver replies are wrong (mixed groups), most are right.
    wrong = [ex for ex in solver if _solver_wrong(ex.prompt, ex.reply)]
    assert 0.1 < len(wrong) / len(solver) < 0.4
    # Pointwise Yes/No verdicts carry no information about correctness: the Yes-share is about one
    # half on right and on wrong shown answers alike.
    yes = {True: [], False: []}
    for ex in corpus:
        if ex.kind == "pointwise" and extract_boxed(ex.reply) in ("Yes", "No"):
            yes[_shown_right(ex.prompt)].append(extract_boxed(ex.reply) == "Yes")
    for flags in yes.values():
        assert len(flags) > 40 and 0.3 < sum(flags) / len(flags) < 0.7


def _expr_value(prompt: str) -> int:
    expr = prompt.split("What is ")[-1].split("?")[0]
    return int(eval(expr, {"__builtins__": {}}))  # noqa: S307 - digits and + only


def _solver_wrong(prompt: str, reply: str) -> bool:
    return int(extract_boxed(reply)) != _expr_value(prompt)


def _shown_right(prompt: str) -> bool:
    shown = prompt.split("Final answer: ")[-1].split()[0] if "Final answer: " in prompt else extract_boxed(prompt)
    return int(shown) == _expr_value(prompt)


def test_warm_start_cache_is_deterministic(tiny_cfg: SparkConfig, tmp_path: Path) -> None:
    a = warm_start_folder(_small(tiny_cfg, tmp_path / "a"))
    b = warm_start_folder(_small(tiny_cfg, tmp_path / "b"))  # a separate cache: built from scratch again
    assert a.name == b.name
    wa = load_model_and_tokenizer(_small(tiny_cfg, tmp_path / "a").model, path=a, device="cpu")[0].state_dict()
    wb = load_model_and_tokenizer(_small(tiny_cfg, tmp_path / "b").model, path=b, device="cpu")[0].state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # Trained: the weights moved away from the random tiny model's.
    base = load_model_and_tokenizer(tiny_cfg.model.model_copy(update={"warm_start": None}),
                                    path=tiny_folder(tiny_cfg.model.tiny, tmp_path / "a"), device="cpu")[0]
    assert not torch.equal(base.state_dict()["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])
    meta = json.loads((a / "warm_start.json").read_text())
    assert meta["steps"] == 3 and meta["corpus"]

    # Cached: a second call reuses the folder.
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert warm_start_folder(_small(tiny_cfg, tmp_path / "a")) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp
    # Anything that changes the corpus (here: the solver's instruction) names another folder.
    other = _small(tiny_cfg, tmp_path / "a")
    other.data.instruction = "Box the answer: \\boxed{}."
    tok = load_tokenizer(a)
    assert corpus_digest(warm_start_corpus(other, tok)) != meta["corpus"]
    assert warm_start_folder_name(other, warm_start_corpus(other, tok)) != a.name


def test_warm_start_needs_the_run_config(tiny_cfg: SparkConfig) -> None:
    with pytest.raises(ValueError, match="load_initial_model"):
        load_model_and_tokenizer(tiny_cfg.model, device="cpu")


def test_tiny_preset_reaches_the_reward_phase_with_the_real_model(
    tiny_cfg: SparkConfig, tmp_path: Path
) -> None:
    """Two iterations of the tiny preset, stage by stage, sampling with the warm-started model itself."""
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.store.uri = str(tmp_path / "store")
    cfg.eval.benchmarks[0].limit = 4
    store, run = Store(cfg.store.uri), "warm"
    ws = S.Workspace()
    S.init_run(cfg, store, run, ws)
    S.evaluate(cfg, store, run, 0, "arithmetic", ws)
    S.finish_iteration(cfg, store, run, 0)
    reward_phases = 0
    for it in (1, 2):
        S.sample_policy(cfg, store, run, it, ws)
        verified = S.verify_policy(cfg, store, run, it)
        S.build_reward_data(cfg, store, run, it, ws)
        trained = S.train_policy(cfg, store, run, it, ws)
        if trained["reward_phase"]:
            reward_phases += 1
            S.sample_reward(cfg, store, run, it, ws)
            S.verify_reward(cfg, store, run, it)
            S.train_reward(cfg, store, run, it, ws)
        S.evaluate(cfg, store, run, it, "arithmetic", ws)
        S.finish_iteration(cfg, store, run, it)
        # The warm-started solver boxes many of its answers (the random tiny model almost never does).
        assert verified["metrics"]["status"].get("ok", 0) >= 0.25 * verified["rows"]
    assert reward_phases >= 1
    stages = {s for it in (1, 2) for s in store.list_stages(run, it)}
    assert {"reward_samples", "reward_verified", "train/phase=reward"} <= stages
    first = next(it for it in (1, 2) if "reward_verified" in store.list_stages(run, it))
    rv = store.read_table(store.stage_uri(run, first, "reward_verified")).to_pandas()
    # The warm start taught the formats: some reward-phase replies end in a boxed verdict or answer
    # (scored by exact match; no format reward). The tiny preset's 120-step pass is kept short for the
    # tests, so at temperature 1 many replies still miss it.
    assert len(rv) == cfg.reward_data.reward_batch_size * cfg.reward_n
    assert (rv["verify_status"] != "no_answer").any()
    ws.close()
