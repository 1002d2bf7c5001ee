"""Committed stages whose parts went missing or changed are detected and named; a full disk gives a clear
error and leaves no partial stage; two processes on one run id: one wins, the other names the holder."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from spark_core.store import RunLockedError, Store, StoreError

REPO = Path(__file__).resolve().parents[2]


def _table(n: int = 50) -> pa.Table:
    return pa.table({"x": list(range(n)), "s": [f"row {i}" for i in range(n)]})


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


def _stage(store: Store, name: str = "samples") -> tuple[str, Path]:
    uri = store.stage_uri("r", 1, name)
    store.write_table(uri, _table(), rows_per_part=20)
    return uri, Path(store._p(uri))


def test_manifest_records_size_and_sha256_of_every_part(store: Store) -> None:
    uri, folder = _stage(store)
    m = store.manifest(uri)
    assert sorted(m["parts"]) == m["files"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for name, facts in m["parts"].items():
        assert facts["bytes"] == (folder / name).stat().st_size and len(facts["sha256"]) == 64


def test_missing_part_is_named(store: Store) -> None:
    uri, folder = _stage(store)
    (folder / "part-00001.parquet").unlink()
    with pytest.raises(StoreError, match=r"samples: part part-00001\.parquet listed in the manifest is missing"):
        store.read_table(uri)


def test_truncated_part_is_named(store: Store) -> None:
    uri, folder = _stage(store)
    part = folder / "part-00002.parquet"
    size = part.stat().st_size
    part.write_bytes(part.read_bytes()[: size // 2])
    with pytest.raises(StoreError, match=rf"part-00002\.parquet is truncated: {size // 2} bytes, the manifest records {size}"):
        store.read_table(uri)


def test_same_size_corruption_is_caught_by_the_checksum(store: Store) -> None:
    uri, folder = _stage(store)
    part = folder / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"part-00000\.parquet is corrupt: its sha256 differs"):
        store.read_table(uri)


def test_a_manifest_without_parts_is_still_read(store: Store) -> None:
    """Stages written before manifests carried parts keep working."""
    import json

    uri, folder = _stage(store)
    m = json.loads((folder / "_SUCCESS.json").read_text())
    del m["parts"]
    (folder / "_SUCCESS.json").write_text(json.dumps(m))
    assert store.read_table(uri).num_rows == 50


def test_damaged_checkpoint_file_is_named(store: Store) -> None:
    uri = store.stage_uri("r", 1, "checkpoint")
    with store.checkpoint_writer(uri) as folder:
        (folder / "model.safetensors").write_bytes(b"w" * 1000)
        (folder / "config.json").write_text("{}")
    m = store.manifest(uri)
    assert m["parts"]["model.safetensors"]["bytes"] == 1000
    weights = Path(store._p(uri)) / "model.safetensors"
    weights.write_bytes(b"w" * 10)
    with pytest.raises(StoreError, match=r"model\.safetensors is truncated: 10 bytes, the manifest records 1000"):
        store.download_checkpoint(uri)
    weights.unlink()
    with pytest.raises(StoreError, match=r"model\.safetensors listed in the manifest is missing"):
        store.download_checkpoint(uri)


# ------------------------------------------------------------------------------------- disk full


def _assert_nothing_partial(store: Store, uri: str) -> None:
    assert not store.is_done(uri)
    folder = Path(store._p(uri))
    assert not folder.exists() or list(folder.rglob("*")) == [], sorted(folder.rglob("*"))


def test_disk_full_on_a_part_write_is_a_clear_error(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    done_uri, _ = _stage(store, "verified")
    uri = store.stage_uri("r", 1, "samples")
    real = Store._write_bytes
    calls = {"n": 0}

    def full_after_one(self: Store, target: str, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second part finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device", target)
        real(self, target, data)

    monkeypatch.setattr(Store, "_write_bytes", full_after_one)
    with pytest.raises(StoreError, match=r"no space left on device while writing .*samples .*nothing of this stage was committed"):
        store.write_table(uri, _table(), rows_per_part=20)
    _assert_nothing_partial(store, uri)
    assert store.read_table(done_uri).num_rows == 50  # what was committed before is untouched


def test_disk_full_on_the_manifest_write_leaves_no_stage(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = store.stage_uri("r", 1, "samples")
    real = Store._write_bytes

    def full_on_manifest(self: Store, target: str, data: bytes) -> None:
        if target.endswith("_SUCCESS.json"):
            raise OSError(errno.ENOSPC, "No space left on device", target)
        real(self, target, data)

    monkeypatch.setattr(Store, "_write_bytes", full_on_manifest)
    with pytest.raises(StoreError, match="no space left on device"):
        store.write_table(uri, _table())
    _assert_nothing_partial(store, uri)


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 512 KiB tmpfs (needs root and mount rights: skipped, saying so, where they are missing)."""
    mnt = tmp_path / "tiny-disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({proc.stderr.strip()}); the ENOSPC "
                    "simulations above cover the same code")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_disk_table_and_checkpoint(tiny_disk: Path) -> None:
    store = Store(str(tiny_disk / "store"))
    small = store.stage_uri("r", 1, "verified")
    store.write_table(small, _table())
    big = pa.table({"blob": [os.urandom(64 * 1024) for _ in range(12)]})  # 768 KiB, incompressible
    uri = store.stage_uri("r", 1, "samples")
    with pytest.raises(StoreError, match=r"no space left on device while writing .*samples \([\d,]+ bytes free on "):
        store.write_table(uri, big, rows_per_part=3)
    _assert_nothing_partial(store, uri)
    ckpt = store.stage_uri("r", 1, "checkpoint")
    with pytest.raises(StoreError, match=r"no space left on device while writing .*checkpoint"):
        with store.checkpoint_writer(ckpt) as folder:
            (folder / "model.safetensors").write_bytes(os.urandom(900 * 1024))
    _assert_nothing_partial(store, ckpt)
    assert store.read_table(small).num_rows == 50
    assert [p.name for p in (tiny_disk / "store").rglob("*") if "_tmp-" in p.name] == []
    # Space freed, the same writes succeed: a re-trigger resumes.
    store.write_table(uri, big.slice(0, 2))
    assert store.read_table(uri).num_rows == 2


# ------------------------------------------------------------------------- two writers, one run id

HOLDER = """
import sys, time
from pathlib import Path
from spark_core.store import Store
store, run_id, flag = Store(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
with store.run_lock(run_id, ttl_s=60):
    flag.write_text("held")
    while not flag.with_suffix(".release").exists():
        time.sleep(0.05)
"""


def test_two_processes_on_one_run_id_one_wins_the_other_names_the_holder(tmp_path: Path) -> None:
    store_uri, run_id = str(tmp_path / "store"), "shared"
    flag = tmp_path / "holder.flag"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, store_uri, run_id, str(flag)],
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert holder.poll() is None, "the holder process died"
            assert time.monotonic() < deadline, "the holder never took the lease"
            time.sleep(0.05)
        store = Store(store_uri)
        with pytest.raises(RunLockedError) as err:
            store.run_lock(run_id, wait_s=0.5, poll_s=0.1).acquire()
        message = str(err.value)
        assert f"run {run_id} is being run by host {socket.gethostname()} pid {holder.pid}" in message
        assert "waited 0.5 s" in message and "_LOCK.json" in message
        flag.with_suffix(".release").write_text("")
        assert holder.wait(timeout=60) == 0
        with store.run_lock(run_id, wait_s=5, poll_s=0.1):  # the winner is done: the other may go now
            pass
    finally:
        if holder.poll() is None:
            holder.kill()


def test_a_sigkilled_holder_on_this_machine_frees_the_run_at_once(tmp_path: Path) -> None:
    store_uri, run_id = str(tmp_path / "store"), f"r-{uuid.uuid4().hex[:6]}"
    flag = tmp_path / "holder.flag"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, store_uri, run_id, str(flag)],
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert holder.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    holder.kill()
    holder.wait(timeout=30)
    with Store(store_uri).run_lock(run_id, wait_s=0):  # no waiting for the 60 s lease to run out
        pass
