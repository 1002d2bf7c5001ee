"""The test-only hold hook (spark_core.faults) and its four points in Store.write_table / checkpoint_writer."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from spark_core import faults
from spark_core.store import Store

STAGE = "runs/demo/iter=0001/samples"
CKPT = "runs/demo/iter=0001/checkpoint"


@pytest.fixture
def fault_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "faults"
    folder.mkdir()
    monkeypatch.setenv(faults.ENV, str(folder))
    return folder


def _table() -> pa.Table:
    return pa.table({"x": list(range(10))})


def _visible(store: Store, uri: str) -> tuple[bool, list[str]]:
    """(manifest present, files under the stage) as a reader would see them right now."""
    folder = Path(store._p(uri))
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if folder.exists() else []
    return store.is_done(uri), files


def test_stage_key_is_the_path_from_runs_on() -> None:
    assert faults.stage_key("s3://bucket/pre/runs/demo/iter=0001/samples") == STAGE
    assert faults.stage_key("/tmp/x/runs/y/runs/demo/iter=0001/samples") == STAGE  # last `runs`
    assert faults.stage_key("/tmp/elsewhere/stage") == "tmp/elsewhere/stage"


def test_unknown_point_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault point 'midway'"):
        faults.arm("/tmp", STAGE, "midway")


def test_hook_is_a_no_op_without_the_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.arm(tmp_path, STAGE, "before_write")  # armed, but the writer does not look
    store = Store(str(tmp_path / "store"))
    uri = store.stage_uri("demo", 1, "samples")
    store.write_table(uri, _table())
    assert (tmp_path / f"{STAGE.replace('/', '~')}@before_write.arm").exists()


@pytest.mark.parametrize("point", faults.POINTS)
def test_table_write_is_held_at_each_point(fault_dir: Path, tmp_path: Path, point: str) -> None:
    store = Store(str(tmp_path / "store"))
    uri = store.stage_uri("demo", 1, "samples")
    faults.arm(fault_dir, STAGE, point)
    result: dict[str, object] = {}
    writer = threading.Thread(target=lambda: result.update(m=store.write_table(uri, _table(), rows_per_part=4)))
    writer.start()
    pid = faults.wait_held(fault_dir, STAGE, point, timeout_s=30, alive=writer.is_alive)
    assert pid == os.getpid()
    done, files = _visible(store, uri)
    tmp_parts = [f for f in files if f.startswith("_tmp-")]
    if point == "before_write":
        assert (done, files) == (False, [])
    elif point == "mid_write":  # one of three parts written, under the temporary key only
        assert not done and len(tmp_parts) == 1 and tmp_parts == files
    elif point == "before_manifest":  # every part in place, not yet committed
        assert not done and files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    else:
        assert done and tmp_parts == []
    assert writer.is_alive()  # it really waits for the release
    faults.release(fault_dir, STAGE, point)
    writer.join(30)
    assert not writer.is_alive() and store.read_table(uri).num_rows == 10


@pytest.mark.parametrize("point", faults.POINTS)
def test_checkpoint_write_is_held_at_each_point(fault_dir: Path, tmp_path: Path, point: str) -> None:
    store = Store(str(tmp_path / "store"))
    uri = store.stage_uri("demo", 1, "checkpoint")
    faults.arm(fault_dir, CKPT, point)

    def write() -> None:
        with store.checkpoint_writer(uri) as folder:
            (folder / "weights.bin").write_bytes(b"w" * 100)
            (folder / "config.json").write_text("{}")

    writer = threading.Thread(target=write)
    writer.start()
    faults.wait_held(fault_dir, CKPT, point, timeout_s=30, alive=writer.is_alive)
    done, files = _visible(store, uri)
    if point == "before_write":
        assert (done, files) == (False, [])
    elif point == "mid_write":
        assert not done and files and all(f.startswith("_tmp-") for f in files)
    elif point == "before_manifest":
        assert not done and files == ["config.json", "weights.bin"]
    else:
        assert done
    faults.release(fault_dir, CKPT, point)
    writer.join(30)
    assert store.is_done(uri)


def test_a_hold_fires_once_and_disarm_removes_an_unfired_one(fault_dir: Path, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    uri = store.stage_uri("demo", 1, "samples")
    faults.arm(fault_dir, STAGE, "after_write")
    writer = threading.Thread(target=lambda: store.write_table(uri, _table()))
    writer.start()
    faults.wait_held(fault_dir, STAGE, "after_write", timeout_s=30)
    faults.release(fault_dir, STAGE, "after_write")
    writer.join(30)
    store.write_table(uri, _table(), overwrite=True)  # not held again: would block forever otherwise
    faults.arm(fault_dir, STAGE, "before_write")
    assert faults.disarm(fault_dir, STAGE, "before_write") is True
    assert faults.disarm(fault_dir, STAGE, "before_write") is False
    store.write_table(uri, _table(), overwrite=True)


def test_a_forgotten_hold_times_out_loudly(fault_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "HOLD_TIMEOUT_S", 0.2)
    store = Store(str(tmp_path / "store"))
    uri = store.stage_uri("demo", 1, "samples")
    faults.arm(fault_dir, STAGE, "before_manifest")
    with pytest.raises(faults.FaultHoldTimeout, match="was never released"):
        store.write_table(uri, _table())
    assert not store.is_done(uri)


def test_wait_held_fails_fast_when_the_writer_died(fault_dir: Path) -> None:
    faults.arm(fault_dir, STAGE, "before_write")
    with pytest.raises(RuntimeError, match="ended before runs/demo/iter=0001/samples reached before_write"):
        faults.wait_held(fault_dir, STAGE, "before_write", timeout_s=30, alive=lambda: False)
