"""Every stage folder, and every stage across a whole run, reads as one table with pandas, pyarrow.dataset,
HF `datasets` and DuckDB: the README's recipes, on a local store. A partitioned stage (`train/phase=...`)
does not store its partition column (the folder supplies it); `Store.read_table` adds it back."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import datasets
import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from spark_core import schemas
from spark_core.layout import SUCCESS, TRAIN_POLICY, TRAIN_REWARD, VERIFIED, duckdb_recipe, hive_partitions
from spark_core.store import Store, StoreError

RUN = "r"


def train_rows(phase: str, steps: list[int]) -> pa.Table:
    cols = {f.name: pa.array([None] * len(steps), f.type) for f in schemas.TRAIN}
    cols["step"] = pa.array(steps, pa.int64())
    cols["phase"] = pa.array([phase] * len(steps))
    cols["loss"] = pa.array([0.5] * len(steps), pa.float64())
    return pa.table(cols, schema=schemas.TRAIN)


def verified_rows(n: int, reward: float) -> pa.Table:
    cols = {f.name: pa.array([None] * n, f.type) for f in schemas.VERIFIED}
    cols["question_id"] = pa.array([f"q{i}" for i in range(n)], schemas.VERIFIED.field("question_id").type)
    cols["reward"] = pa.array([reward] * n, schemas.VERIFIED.field("reward").type)
    return pa.table(cols, schema=schemas.VERIFIED)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    st = Store(str(tmp_path))
    for it in (1, 2):
        st.write_table(st.stage_uri(RUN, it, TRAIN_POLICY), train_rows("policy", [10 * it, 10 * it + 1]))
        st.write_table(st.stage_uri(RUN, it, TRAIN_REWARD), train_rows("reward", [10 * it + 2]))
        st.write_table(st.stage_uri(RUN, it, VERIFIED), verified_rows(3, float(it - 1)))
    return st


def test_partition_column_comes_from_the_folder_and_is_added_back(store: Store) -> None:
    uri = store.stage_uri(RUN, 1, TRAIN_POLICY)
    [part] = store.manifest(uri)["files"]
    assert "phase" not in pq.read_schema(f"{uri}/{part}").names  # the file does not repeat the folder
    manifest = json.loads(Path(uri, SUCCESS).read_text())
    assert manifest["columns"] == schemas.TRAIN.names  # the contract is unchanged
    table = store.read_table(uri)
    assert table.schema == schemas.TRAIN and table.column("phase").to_pylist() == ["policy", "policy"]
    assert store.read_table(uri, columns=["phase", "step"]).to_pydict() == {
        "phase": ["policy", "policy"], "step": [10, 11]}
    across = store.read_stage_across_iterations(RUN, TRAIN_REWARD)
    assert across.column("phase").to_pylist() == ["reward", "reward"]
    assert hive_partitions(uri) == {"iter": "0001", "phase": "policy"}


def test_a_column_that_contradicts_its_folder_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match=r"column 'phase' holds \['reward'\] but the folder says phase=policy"):
        store.write_table(store.stage_uri(RUN, 3, TRAIN_POLICY), train_rows("reward", [1]))


def test_pandas_reads_a_stage_folder_and_a_stage_across_the_run(store: Store) -> None:
    run = store.run_uri(RUN)
    folder = pd.read_parquet(f"{run}/iter=0001/train")  # both phases of one iteration
    assert sorted(folder["phase"].astype(str)) == ["policy", "policy", "reward"]
    files = sorted(glob.glob(f"{run}/iter=*/train/*/*.parquet"))
    whole = pd.read_parquet(files)
    assert len(whole) == 6 and sorted(whole["step"]) == [10, 11, 12, 20, 21, 22]
    assert set(whole["phase"].astype(str)) == {"policy", "reward"} and set(whole["iter"]) == {1, 2}
    verified = pd.read_parquet(sorted(glob.glob(f"{run}/iter=*/verified/*.parquet")))
    assert verified.groupby("iter")["reward"].mean().to_dict() == {1: 0.0, 2: 1.0}


def test_pyarrow_dataset_reads_a_stage_across_the_run(store: Store) -> None:
    run = store.run_uri(RUN)
    files = sorted(glob.glob(f"{run}/iter=*/train/*/*.parquet"))
    table = ds.dataset(files, format="parquet", partitioning="hive", partition_base_dir=run).to_table()
    assert table.num_rows == 6 and set(table.column("phase").to_pylist()) == {"policy", "reward"}
    assert sorted(set(table.column("iter").to_pylist())) == [1, 2]
    folder = ds.dataset(f"{run}/iter=0002/train", format="parquet", partitioning="hive").to_table()
    assert folder.num_rows == 3 and "phase" in folder.column_names


def test_hf_datasets_reads_a_stage_across_the_run(store: Store) -> None:
    run = store.run_uri(RUN)
    files = sorted(glob.glob(f"{run}/iter=*/train/*/*.parquet"))
    rows = datasets.load_dataset("parquet", data_files=files, split="train")  # rows only: no folder columns
    assert rows.num_rows == 6
    with_folders = datasets.Dataset(
        ds.dataset(files, format="parquet", partitioning="hive", partition_base_dir=run).to_table()
    )
    assert with_folders.num_rows == 6 and {"iter", "phase"} <= set(with_folders.column_names)
    assert sorted(set(with_folders["phase"])) == ["policy", "reward"]


def test_duckdb_reads_a_stage_across_the_run(store: Store) -> None:
    run = store.run_uri(RUN)
    rows = duckdb.sql(
        f"select iter, phase, step from read_parquet('{run}/*/train/*/*.parquet', hive_partitioning=true, "
        "hive_types={'iter': 'INTEGER'}) order by step"
    ).fetchall()
    assert rows == [(1, "policy", 10), (1, "policy", 11), (1, "reward", 12),
                    (2, "policy", 20), (2, "policy", 21), (2, "reward", 22)]
    means = duckdb.sql(
        f"select iter, avg(reward) from read_parquet('{run}/*/verified/*.parquet', hive_partitioning=true, "
        "hive_types={'iter': 'INTEGER'}) group by 1 order by 1"
    ).fetchall()
    assert means == [(1, 0.0), (2, 1.0)]


def test_the_duckdb_recipe_runs_as_printed(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = duckdb_recipe(store.run_uri(RUN), VERIFIED)
    assert "register_filesystem" not in recipe  # a local store needs no filesystem
    exec(compile(recipe, "<recipe>", "exec"), {})
    printed = capsys.readouterr().out
    assert "question_id" in printed and "iter" in printed and "[6 rows x" in printed
    assert 'fsspec.filesystem("s3"' in duckdb_recipe("s3://spark/runs/r", VERIFIED)
