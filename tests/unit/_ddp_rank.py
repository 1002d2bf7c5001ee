"""One rank of the 2-process CPU (gloo) training test in test_distributed.py (not collected by pytest).

Each rank joins the process group, wraps the tiny model with ``distributed.prepare_for_training`` (DDP),
trains its share of the GRPO groups with the real ``Trainer`` and rank 0 saves the resulting weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch

from spark_core import distributed
from spark_core.config import TinyModelConfig, TrainConfig
from spark_core.models import build_tiny
from spark_core.trainer import Trainer

TRAIN = TrainConfig(lr=1e-2, warmup_ratio=0.0, kl_coef=0.0, micro_batch_size=2)
COMPLETION_LEN = 3  # equal lengths: every rank holds the same token count (see the test's docstring)


def make_rows(vocab_size: int) -> pd.DataFrame:
    """Four GRPO groups of two samples with mixed rewards and fixed-length completions."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for q in range(4):
        for j in range(2):
            ids = torch.randint(5, vocab_size, (COMPLETION_LEN,), generator=gen).tolist()
            rows.append({"question_id": f"q{q}", "sample_idx": j, "prompt": f"What is {q} + {j}?",
                         "completion_ids": ids, "reward": float((q + j) % 2)})
    return pd.DataFrame(rows)


def local_rows(rows: pd.DataFrame, ctx: distributed.DistContext) -> pd.DataFrame:
    """Whole GRPO groups per rank, so each rank computes its groups' advantages itself."""
    groups = distributed.shard(sorted(rows["question_id"].unique()), ctx)
    return rows[rows["question_id"].isin(groups)].reset_index(drop=True)


def main(out: str) -> None:
    ctx = distributed.init_distributed()
    model, tok = build_tiny(TinyModelConfig())
    wrapped, _ = distributed.prepare_for_training(model)
    trainer = Trainer(wrapped, tok, TRAIN, ctx.device, total_steps=4)
    rows = local_rows(make_rows(len(tok)), ctx)
    out_rows = trainer.train_phase(rows, "policy")
    tokens = distributed.all_reduce_sum({"num_tokens": out_rows[0]["num_tokens"]})["num_tokens"]
    state = distributed.full_state_dict(wrapped)
    if ctx.is_main:
        torch.save({"state": state, "world_size": ctx.world_size, "backend": ctx.backend,
                    "local_sequences": len(rows), "global_tokens": tokens}, Path(out) / "rank0.pt")
    distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
