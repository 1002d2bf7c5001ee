"""The store layout, in one place: where every output of a run lives, what it is called, how it is
partitioned, and which columns its table carries. Everything that names a path asks this module.

Under the store root::

    runs/{run_id}/run.json                     resolved config, created_at, code version, config hash
    runs/{run_id}/LATEST                       last completed iteration (an int as text)
    runs/{run_id}/_LOCK.json                   lease of the process currently running the run
    runs/{run_id}/iter=NNNN/{stage}/part-00000.parquet + _SUCCESS.json
    runs/{run_id}/iter=NNNN/train/phase={policy|reward}/...
    runs/{run_id}/iter=NNNN/{stage}/rl_step=SS/...  with steps_per_iteration > 1: one partition per RL step
    runs/{run_id}/iter=NNNN/checkpoint/        save_pretrained files + trainer_state/ + _SUCCESS.json
    runs/{run_id}/iter=NNNN/eval/benchmark={name}/...
    runs/{run_id}/iter=NNNN/report/metrics.png   plot of the run's metrics up to this iteration
    runs/{run_id}/iter=NNNN/report/record.json   this iteration's summary and stages, as published
    runs/{run_id}/images/{sha256}.{ext}        question images, once each (vision-language runs)

Stage names may be nested (``train/phase=policy``): the part after ``=`` is a hive partition, so
``runs/{id}/iter=*/{stage}/*.parquet`` reads as one dataset with an ``iter`` column (and ``phase`` /
``benchmark`` for the partitioned stages). Names starting with ``_`` (manifests, temporary folders) are
skipped by pyarrow/DuckDB hive readers.

RL steps: an iteration holds ``steps_per_iteration`` RL steps and ONE checkpoint (its end). With one step
the per-step stages are exactly the names above; with several, every per-step stage gets a last hive
folder ``rl_step=SS`` (``samples/rl_step=02``, ``train/phase=policy/rl_step=02``), each committed on its
own, and ``Store.read_table`` of the unpartitioned name (``iter=0001/samples``) reads all steps as one
table with an ``rl_step`` column. Checkpoints, evaluation and the report stay per iteration.
"""

from __future__ import annotations

import re

import pyarrow as pa

from . import schemas

RUNS = "runs"
RUN_RECORD = "run.json"
LATEST = "LATEST"
SUCCESS = "_SUCCESS.json"  # a stage exists once this manifest does
TMP_PREFIX = "_tmp-"
LOCK_NAME = "_LOCK.json"

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ITER_RE = re.compile(r"^iter=(\d{4,})$")
STAGE_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=-]*$")
# STORE[/runs/RUN[/iter=NNNN[/STAGE]]], as the command line accepts addresses
ADDRESS_RE = re.compile(r"^(?P<root>.*?)/runs/(?P<run>[^/]+)(?:/iter=(?P<iter>\d+)(?:/(?P<stage>.+?))?)?/*$")

PHASES = ("policy", "reward")


def iter_name(iteration: int) -> str:
    return f"iter={int(iteration):04d}"


def train_stage(phase: str) -> str:
    """Stage name of a training phase's metrics table (`train/phase=policy`)."""
    return f"train/phase={phase}"


def eval_stage(benchmark: str) -> str:
    """Stage name of one benchmark's evaluation table (`eval/benchmark=arithmetic`)."""
    return f"eval/benchmark={benchmark}"


# Stage names (folders under iter=NNNN/), in the order an iteration writes them.
SAMPLES = "samples"
VERIFIED = "verified"
REWARD_ITEMS = "reward_items"
REWARD_POOL = "reward_pool"
TRAIN_POLICY = train_stage("policy")
POLICY_CHECKPOINT = "policy_checkpoint"
REWARD_SAMPLES = "reward_samples"
REWARD_VERIFIED = "reward_verified"
TRAIN_REWARD = train_stage("reward")
CHECKPOINT = "checkpoint"
TRAINER_STATE_DIR = "trainer_state"  # inside a checkpoint folder
# Weights after step SS of an iteration (SS < steps_per_iteration), only with store.intermediate_checkpoints.
STEP_CHECKPOINT = "step_checkpoint"
# The hive key of an RL step inside an iteration. Not `step`: the TRAIN table's `step` column (the optimizer
# step) would clash with a partition column of that name in every hive reader.
STEP = "rl_step"
STEP_RE = re.compile(r"^rl_step=(\d{2,})$")
# Stages written once per RL step (partitioned by step when an iteration holds several).
PER_STEP = (SAMPLES, VERIFIED, REWARD_ITEMS, REWARD_POOL, TRAIN_POLICY, POLICY_CHECKPOINT, REWARD_SAMPLES,
            REWARD_VERIFIED, TRAIN_REWARD, STEP_CHECKPOINT)


def step_name(step: int) -> str:
    return f"{STEP}={int(step):02d}"


def step_stage(stage: str, step: int, steps: int) -> str:
    """The stage name of RL step `step` (1-based) of an iteration of `steps` steps: `stage` itself when the
    iteration has one step (the layout of runs without steps), else `stage/rl_step=SS`."""
    if not 1 <= step <= steps:
        raise ValueError(f"step {step} is outside 1..{steps}")
    return stage if steps == 1 else f"{stage}/{step_name(step)}"
REPORT_PLOT = "report/metrics.png"  # a plain object under iter=NNNN/, not a stage
# The iteration's summary and stage row counts as its publish saw them (JSON, not a stage): later
# publishes read it instead of every earlier iteration's manifests.
REPORT_RECORD = "report/record.json"
IMAGES = "images"  # a run's content-addressed question images (runs/{id}/images/), not a stage
IMAGE_REF_RE = re.compile(r"^[0-9a-f]{64}\.[a-z]{2,5}$")

# Columns per table stage, keyed by the stage's first path part (train and eval are partitioned).
TABLES: dict[str, pa.Schema] = {
    SAMPLES: schemas.SAMPLES,
    VERIFIED: schemas.VERIFIED,
    REWARD_ITEMS: schemas.REWARD_ITEMS,
    REWARD_POOL: schemas.REWARD_ITEMS,
    REWARD_SAMPLES: schemas.REWARD_SAMPLES,
    REWARD_VERIFIED: schemas.REWARD_VERIFIED,
    "train": schemas.TRAIN,
    "eval": schemas.EVAL,
}


def image_uri(run_uri: str, ref: str) -> str:
    """Where a run keeps the image named ``ref`` (``<sha256>.<ext>``, see ``spark_core.images``)."""
    if not IMAGE_REF_RE.match(ref):
        raise ValueError(f"not an image reference: {ref!r} (expected <sha256 hex>.<ext>)")
    return f"{run_uri.rstrip('/')}/{IMAGES}/{ref}"


def schema_for(stage: str) -> pa.Schema | None:
    """The columns a table stage carries at least; None for checkpoints."""
    return TABLES.get(stage.strip("/").split("/")[0])


def stage_parts(stage: str) -> list[str] | None:
    """The folder names of a stage (`train/phase=policy` -> two), or None when the name is not valid."""
    parts = stage.strip("/").split("/")
    if not parts or any(not STAGE_PART_RE.match(p) or p.startswith(TMP_PREFIX) for p in parts):
        return None
    return parts


def hive_partitions(uri: str) -> dict[str, str]:
    """The `key=value` folders of a path: `.../iter=0001/train/phase=policy` -> {iter: 0001, phase: policy}.

    A table written under such a folder does not carry a column of the same name (the folder supplies it:
    a file holding it too makes pyarrow and pandas fail with "Unable to merge: Field phase has incompatible
    types"); `Store.read_table` adds it back, so the column contract per stage (`TABLES`) holds for readers."""
    out = {}
    for part in uri.rstrip("/").split("/"):
        key, eq, value = part.partition("=")
        if eq and key and value and not part.startswith(("_", ".")):
            out[key] = value
    return out


def stage_glob(run_uri: str, stage: str, steps: int = 1) -> str:
    """The Parquet parts of one stage in every iteration (and RL step) of a run, for hive-partitioned readers."""
    per_step = f"/{STEP}=*" if steps > 1 and stage.strip("/") in PER_STEP else ""
    return f"{run_uri.rstrip('/')}/iter=*/{stage.strip('/')}{per_step}/*.parquet"


def duckdb_recipe(run_uri: str, stage: str, steps: int = 1) -> str:
    """Python that prints one stage of every iteration of a run as one DuckDB table, offline: for s3:// it
    registers an fsspec S3 filesystem (credentials and endpoint from the AWS_* variables), because DuckDB's
    httpfs extension is a download. For artifacts and docs; the unit and integration tests run it."""
    types = f"'iter': 'INTEGER', '{STEP}': 'INTEGER'" if steps > 1 else "'iter': 'INTEGER'"
    sql = (f"SELECT * FROM read_parquet('{stage_glob(run_uri, stage, steps)}', hive_partitioning=true, "
           f"hive_types={{{types}}})")
    lines = ["import duckdb", "con = duckdb.connect()"]
    if run_uri.startswith("s3://"):
        lines = ["import os, duckdb, fsspec", "con = duckdb.connect()",
                 'con.register_filesystem(fsspec.filesystem("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL")))']
    lines.append(f'print(con.sql("""{sql}""").df())')
    return "\n".join(lines)


def split_address(uri: str) -> tuple[str, str | None, int | None, str | None]:
    """`STORE[/runs/RUN[/iter=NNNN[/STAGE]]]` -> (store root, run id, iteration, stage)."""
    m = ADDRESS_RE.match(uri.rstrip("/"))
    if not m:
        return uri, None, None, None
    return m["root"] or "/", m["run"], int(m["iter"]) if m["iter"] is not None else None, m["stage"]
