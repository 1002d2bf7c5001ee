"""Column contracts of every table the pipeline writes (one place per fact).

Each stage's Parquet parts carry at least these columns, in this order; extra columns may follow.
Tests and readers import these lists instead of repeating names; which stage carries which schema is
``spark_core.layout.TABLES``.
"""

from __future__ import annotations

import pyarrow as pa

# Vision-language runs only: the question's image references (``<sha256>.<ext>`` under the run's
# ``images/``, spark_core.layout.image_uri), one list per row, after a table's own columns. Text runs
# write no such column.
IMAGES = pa.field("images", pa.list_(pa.string()))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` reduced to ``schema``'s columns (cast), keeping an ``images`` column when it has one."""
    if IMAGES.name in table.column_names and IMAGES.name not in schema.names:
        schema = schema.append(IMAGES)
    return table.select(schema.names).cast(schema)


def with_images(schema: pa.Schema, rows: list[dict]) -> pa.Schema:
    """``schema`` plus the ``images`` column when any row carries images (text rows: unchanged)."""
    return schema.append(IMAGES) if any(r.get(IMAGES.name) for r in rows) else schema


# Policy-phase rollouts (`samples`) and the same rows after verification (`verified`).
SAMPLES = pa.schema(
    [
        ("question_id", pa.string()),
        ("sample_idx", pa.int32()),
        ("prompt", pa.string()),  # the exact text fed to the model (chat template applied)
        ("question", pa.string()),  # the raw question, for judgment/reflection prompts
        ("completion", pa.string()),
        ("completion_ids", pa.list_(pa.int32())),
        ("label", pa.string()),  # ground-truth final answer
    ]
)
VERIFIED = pa.schema(
    list(SAMPLES)
    + [
        ("answer", pa.string()),  # extracted final answer (null when none)
        ("reward", pa.float32()),
        ("verify_status", pa.string()),  # ok | no_answer | timeout | error
    ]
)

# Judgment and reflection items built from one iteration's verified groups (`reward_items`), and the
# FIFO pool carried between iterations (`reward_pool`, same columns).
REWARD_ITEMS = pa.schema(
    [
        ("item_id", pa.string()),
        ("kind", pa.string()),  # pointwise | pairwise | reflection
        ("source_question_id", pa.string()),
        ("source_sample_idx", pa.list_(pa.int32())),
        ("prompt", pa.string()),  # chat-formatted prompt for the reward phase
        ("label", pa.string()),  # Yes/No/A/B for judgments, the gold answer for reflection
        ("context_mode", pa.string()),  # answer | cot | both (judgment); cot | answer (reflection)
        ("template_id", pa.string()),
        ("label_style", pa.string()),  # yes_no | a_b | letter | math
        ("iteration", pa.int32()),  # iteration that built the item
    ]
)

# Reward-phase rollouts (`reward_samples`) and their verification (`reward_verified`): one row per
# sample of a popped pool item; `question_id` = item_id so GRPO groups work unchanged.
REWARD_SAMPLES = pa.schema(
    [
        ("question_id", pa.string()),
        ("sample_idx", pa.int32()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("completion_ids", pa.list_(pa.int32())),
        ("label", pa.string()),
        ("kind", pa.string()),
    ]
)
REWARD_VERIFIED = pa.schema(
    list(REWARD_SAMPLES)
    + [
        ("answer", pa.string()),
        ("reward", pa.float32()),
        ("verify_status", pa.string()),
    ]
)

# One row per optimizer step (`train/phase=policy`, `train/phase=reward`).
TRAIN = pa.schema(
    [
        ("step", pa.int64()),  # global optimizer step, counted over both phases
        ("phase", pa.string()),  # policy | reward
        ("loss", pa.float64()),
        ("pg_loss", pa.float64()),
        ("kl", pa.float64()),
        ("grad_norm", pa.float64()),
        ("lr", pa.float64()),
        ("clip_frac", pa.float64()),
        ("mean_reward", pa.float64()),
        ("num_sequences", pa.int64()),
        ("num_tokens", pa.int64()),
    ]
)

# Per-item evaluation rows (`eval/benchmark={name}`).
EVAL = pa.schema(
    [
        ("item_id", pa.string()),
        ("question", pa.string()),
        ("gold", pa.string()),
        ("prediction", pa.string()),  # a0: greedy answer before reflection
        ("correct", pa.bool_()),
        ("judged", pa.string()),  # the model's own Yes/No verdict on a0 (null if unparsed)
        ("judgment_correct", pa.bool_()),
        ("final_prediction", pa.string()),  # answer after self-reflection
        ("final_correct", pa.bool_()),
        ("reflection_rounds", pa.int32()),
        ("reflection_trace", pa.string()),  # JSON list of {round, completion, answer, judgment_completion, verdict}
    ]
)
