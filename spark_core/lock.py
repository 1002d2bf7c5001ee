"""The run lease: a file `runs/{run_id}/_LOCK.json` (``layout.LOCK_NAME``) so two triggers never run the
same iteration of a run at once. ``Store.run_lock`` hands one out.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from .layout import LOCK_NAME, TMP_PREFIX
from .store_errors import RunLockedError, StoreError, redact


def _precondition_failed(err: BaseException) -> bool:
    """Whether an S3 call failed with 412 Precondition Failed (s3fs turns it into an OSError)."""
    cause = err.__cause__
    status = getattr(cause, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return isinstance(err, FileExistsError) or status == 412


def _pid_alive(pid: Any) -> bool:
    """Whether a process of this machine is still running (a killed holder frees its lease at once)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # someone else's process, or no pid recorded: assume alive, wait for expiry
    return True


class RunLock:
    """A lease file `runs/{run_id}/_LOCK.json`: owner token + expiry, renewed by a heartbeat thread.

    Acquire: if there is no lease, or it expired (its holder died: the heartbeat stopped; a holder on
    this machine whose process has exited counts as expired at once), write ours atomically, so of two
    acquirers racing for the same lease exactly one succeeds, whatever their timing. On a local store the
    lease is judged and replaced under an exclusive ``flock`` of the run folder (so a local store must be
    on a local filesystem: share a store between machines through S3). On S3 a conditional PUT
    (``If-None-Match: *`` for a new lease, ``If-Match: <ETag>`` to take over the expired lease we read,
    or to renew our own), which the server refuses with 412 when someone else wrote first. S3
    conditional writes: AWS S3 since 2024, SeaweedFS (tested with 4.48). If the lease is lost (expired
    while we hung, taken over), `check()` raises so the holder stops before publishing.
    """

    def __init__(self, store: Any, run_id: str, *, ttl_s: float = 600.0, wait_s: float = 0.0,
                 poll_s: float = 2.0) -> None:
        if ttl_s <= 0:
            raise StoreError("lock ttl must be > 0")
        self.store = store
        self.uri = store.join(store.run_uri(run_id), LOCK_NAME)  # run_uri validates the run id
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.token = uuid.uuid4().hex
        self.held = False
        self.lost = False
        self._etag: str | None = None  # S3: the ETag of the lease object we last wrote
        self._seen_etag: str | None = None  # S3: the ETag of the lease as acquire() last read it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lease records
    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "owner": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquired_at": now,
            "expires_at": now + self.ttl_s,
        }

    def read(self) -> dict[str, Any] | None:
        """The current lease, or None when there is none."""
        try:
            return self.store._read_json(self.uri)
        except StoreError:
            # A damaged lease (written by hand, truncated disk): treat it as expired so it can be taken.
            return {"owner": None, "expires_at": 0, "corrupt": True}

    @staticmethod
    def _expired(rec: dict[str, Any] | None) -> bool:
        """No lease, a lease past its expiry, or one whose holder on this machine has exited."""
        if rec is None or float(rec.get("expires_at", 0)) <= time.time():
            return True
        return rec.get("host") == socket.gethostname() and not _pid_alive(rec.get("pid"))

    @contextmanager
    def _local_guard(self) -> Iterator[None]:
        """Exclusive `flock` of the run folder: on a local store, judging the lease and replacing it is
        one step for every process and thread of this machine (each acquirer opens its own descriptor)."""
        folder = Path(self.store._p(self.uri)).parent
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor drops the flock

    def _guard(self) -> AbstractContextManager[None]:
        """The local guard; nothing on S3, where each write is conditional instead."""
        return self._local_guard() if self.store.is_local else nullcontext()

    def _create_local(self) -> bool:
        # Judged again under the guard: the read in acquire() was unguarded, and another acquirer may
        # have taken the expired lease since. A lease file is written whole aside, then renamed over.
        with self._local_guard():
            current = self.read()
            if not (self._expired(current) or (current or {}).get("owner") == self.token):
                return False
            self._write_local(self._record())
        return True

    def _write_local(self, record: dict[str, Any]) -> None:
        path = Path(self.store._p(self.uri))
        draft = path.with_name(f"{LOCK_NAME}.{TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            draft.write_text(json.dumps(record))
            os.replace(draft, path)  # atomic: a reader never sees a half-written lease
        finally:
            draft.unlink(missing_ok=True)

    # -- S3: compare-and-swap on the lease object
    def _s3_key(self) -> tuple[str, str]:
        bucket, key, _ = self.store.fs.split_path(self.store._p(self.uri))
        return bucket, key

    def _s3_etag(self) -> str | None:
        """ETag of the lease object, or None when there is none."""
        bucket, key = self._s3_key()
        try:
            head = self.store._io(f"stat {self.uri}", self.store.fs.call_s3, "head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        return head["ETag"]

    def _s3_put(self, record: dict[str, Any], etag: str | None) -> bool:
        """PUT the lease if the object is still as we saw it (absent when `etag` is None); False on 412."""
        bucket, key = self._s3_key()
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        body = json.dumps(record, indent=2, sort_keys=True).encode()

        def put() -> str | None:
            try:
                return self.store.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **condition)["ETag"]
            except FileNotFoundError:
                return None  # If-Match on a lease deleted since we read it
            except OSError as err:
                if _precondition_failed(err):
                    return None
                raise

        new = self.store._io(f"write {self.uri}", put)
        if new is None:
            return False
        self._etag = new
        return True

    def _try_take(self, current: dict[str, Any] | None) -> bool:
        if self.store.is_local:
            return self._create_local()
        # The ETag is read before the content was judged (in acquire), never after: a lease written in
        # between changes the ETag and the PUT is refused.
        if not self._s3_put(self._record(), self._seen_etag):
            # A retried PUT whose first attempt did land is refused too: the lease then names us.
            confirmed = self.read()
            if confirmed is None or confirmed.get("owner") != self.token:
                return False
            self._etag = self._s3_etag()
        return True

    def _describe(self, rec: dict[str, Any]) -> str:
        left = max(0.0, float(rec.get("expires_at", 0)) - time.time())
        since = datetime.fromtimestamp(float(rec.get("acquired_at", 0)), timezone.utc).isoformat(
            timespec="seconds"
        )
        return f"host {rec.get('host')} pid {rec.get('pid')} since {since} (lease expires in {left:.0f} s)"

    # -- public
    def acquire(self) -> "RunLock":
        deadline = time.time() + self.wait_s
        while True:
            self._seen_etag = None if self.store.is_local else self._s3_etag()
            current = self.read() if self.store.is_local or self._seen_etag is not None else None
            if self._expired(current) or (current or {}).get("owner") == self.token:
                if self._try_take(current):
                    self.held, self.lost = True, False
                    self._start_heartbeat()
                    return self
                current = self.read()
            if time.time() >= deadline:
                who = self._describe(current) if current else "another process"
                raise RunLockedError(
                    f"run {self.run_id} is being run by {who}; waited {self.wait_s:g} s. "
                    f"Retry later, or delete {redact(self.uri)} if that process is dead."
                )
            time.sleep(max(0.01, min(self.poll_s, deadline - time.time())))

    def renew(self) -> bool:
        """Extend the lease; False (and `lost`) when it is no longer ours."""
        with self._guard():
            current = self.read()
            if current is None or current.get("owner") != self.token:
                self.lost = True
                return False
            record = dict(current, expires_at=time.time() + self.ttl_s)
            if self.store.is_local:
                self._write_local(record)
                return True
        if not self._s3_put(record, self._etag):
            after = self.read()  # refused: written by someone else since, unless our retried PUT landed
            if after is None or after.get("owner") != self.token or after.get("expires_at") != record["expires_at"]:
                self.lost = True
                return False
            self._etag = self._s3_etag()
        return True

    def check(self) -> None:
        """Raise if the lease was lost, so the holder stops before publishing anything."""
        if not self.held or self.lost:
            raise RunLockedError(f"run {self.run_id}: this process no longer holds the run lock")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.held:
            with self._guard():
                current = self.read()
                if current is not None and current.get("owner") == self.token:
                    self.store._rm(self.uri)
        self.held = False

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    if not self.renew():
                        return
                except StoreError:
                    continue  # transient; the next beat retries before the lease runs out

        self._thread = threading.Thread(target=beat, name=f"spark-lock-{self.run_id}", daemon=True)
        self._thread.start()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
