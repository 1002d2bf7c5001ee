"""``verify_batch``: the rules of ``spark_core.verify`` applied to many completions in a pool of worker
processes, with a wall-clock limit per item.

The pool is persistent (forkserver, or spawn where forkserver is missing). A worker interrupts a slow
item itself (a timer signal in its own main thread); a worker stuck in C code that ignores signals is
killed and replaced. Code that calls ``verify_batch`` from a script must guard its entry point with
``if __name__ == "__main__":`` (workers re-import the main module, as usual for non-fork
multiprocessing), and cannot be piped in with ``python - < script.py``; both cases fail with an error
that says so.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from .verify import MODES, VerifyResult, extract_boxed, math_reward, quick_math, verify_choice, warm_up

__all__ = ["shutdown_pool", "verify_batch"]


# ----------------------------------------------------------------------------------- worker side
class _SoftTimeout(BaseException):
    """Raised by the worker's timer; a BaseException so that Math-Verify's `except Exception` passes it on."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _SoftTimeout


def _worker_main(conn: Connection) -> None:
    """Worker loop: receive ``(timeout_s, [(key, answer, gold), ...])``, send ``(key, reward, status)`` per item."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    signal.signal(signal.SIGALRM, _on_alarm)
    warm_up()  # milliseconds when inherited warm from the forkserver; otherwise done before "ready"
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        timeout_s, items = message
        for key, answer, gold in items:
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
                try:
                    reward, status = math_reward(answer, gold), "ok"
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _SoftTimeout:
                reward, status = 0.0, "timeout"
            except Exception:
                reward, status = 0.0, "error"
            conn.send((key, reward, status))


# ----------------------------------------------------------------------------------- parent side
_START_TIMEOUT_S = 120.0  # a worker that is not ready by then is a broken environment, not a slow item
_MAX_START_FAILURES = 3
_CHUNK_MAX_ITEMS = 32
_CHUNK_MAX_CHARS = 1 << 20  # a megabyte answer travels (nearly) alone instead of delaying a chunk


def _hard_limit(timeout_s: float) -> float:
    """When the parent kills a worker: after its own timer had a fair chance to fire."""
    return timeout_s + max(0.5, 0.25 * timeout_s)


_GUARD = 'if __name__ == "__main__":'


def _has_main_guard(path: str) -> bool | None:
    """Whether a script has a top-level ``if __name__ == "__main__":`` block (None: cannot tell)."""
    import ast

    try:
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1:
            sides = [node.test.left, *node.test.comparators]
            names = {n.id for n in sides if isinstance(n, ast.Name)}
            consts = {n.value for n in sides if isinstance(n, ast.Constant)}
            if names == {"__name__"} and consts == {"__main__"} and isinstance(node.test.ops[0], ast.Eq):
                return True
    return False


def _main_module_problem() -> str | None:
    """Why workers cannot start from this main module, with what to do; None when it looks fine.

    Workers are started by forkserver/spawn, which re-import the caller's main module in each worker
    (as ``__mp_main__``): a script read from stdin cannot be re-imported, and a script without a guard
    calls ``verify_batch`` again inside every worker while it starts.
    """
    import sys

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None:  # python -c, an interactive shell, a notebook: nothing is re-imported
        return None
    if path == "<stdin>" or not os.path.isfile(path):
        return (
            f"the main module {path!r} cannot be re-imported by the worker processes (a script piped "
            "into `python -`?): save it to a file, put its code under `" + _GUARD + "` and run "
            "`python script.py`"
        )
    if _has_main_guard(path) is False:
        return (
            f"{path} has no `{_GUARD}` guard, so each worker process re-runs it while starting "
            f"(and calls verify_batch again): put the script's top-level code under `{_GUARD}`"
        )
    return None


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))  # respects taskset/cgroup CPU pinning
    return os.cpu_count() or 1


@dataclass
class _Worker:
    proc: Any  # multiprocessing.Process of the chosen context
    conn: Connection
    started_at: float
    ready: bool = False
    inflight: deque = field(default_factory=deque)  # items sent and not yet answered
    item_started_at: float = 0.0


class _Pool:
    """Worker processes with per-item wall-clock deadlines; workers that overrun are killed and replaced."""

    def __init__(self) -> None:
        methods = multiprocessing.get_all_start_methods()
        # Never fork the caller: it may run threads (Prefect), and a forked copy of a threaded process can
        # deadlock. The forkserver is a fresh single-threaded process; it imports and warms Math-Verify
        # once, so each (re)started worker forked from it is ready in milliseconds. (If another library
        # started the forkserver first, the preload does not apply and workers warm themselves.)
        if "forkserver" in methods:
            self.ctx = multiprocessing.get_context("forkserver")
            self.ctx.set_forkserver_preload(["spark_core._verify_warmup"])
        else:
            self.ctx = multiprocessing.get_context("spawn")
        self.workers: list[_Worker] = []
        self.start_failures = 0  # workers lost before "ready" since the last one that made it

    def _start_worker(self) -> None:
        parent_conn, child_conn = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=_worker_main, args=(child_conn,), daemon=True, name="spark-verify")
        proc.start()
        child_conn.close()  # so that the parent sees EOF when the worker dies
        self.workers.append(_Worker(proc=proc, conn=parent_conn, started_at=time.monotonic()))

    def _remove(self, worker: _Worker) -> None:
        if worker.proc.is_alive():
            worker.proc.kill()
        worker.proc.join(timeout=5)
        worker.conn.close()
        self.workers.remove(worker)

    def pids(self) -> list[int]:
        """Process ids of the live workers (for diagnostics and tests)."""
        return [w.proc.pid for w in self.workers if w.proc.is_alive()]

    def shutdown(self) -> None:
        for worker in list(self.workers):
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in list(self.workers):
            worker.proc.join(timeout=1)
            self._remove(worker)

    def run(
        self, items: list[tuple[int, str, str]], timeout_s: float, processes: int
    ) -> dict[int, tuple[float, str]]:
        """Check ``(key, answer, gold)`` items; returns ``{key: (reward, status)}`` for every key."""
        try:
            return self._run(items, timeout_s, processes)
        except BaseException:
            # Busy workers would later answer for keys of this abandoned batch: they must not survive.
            for worker in [w for w in self.workers if w.inflight or not w.ready]:
                self._remove(worker)
            raise

    def _run(
        self, items: list[tuple[int, str, str]], timeout_s: float, processes: int
    ) -> dict[int, tuple[float, str]]:
        results: dict[int, tuple[float, str]] = {}
        queue: deque[tuple[int, str, str]] = deque(items)
        size = max(1, min(processes, len(items)))
        chunk_items = max(1, min(_CHUNK_MAX_ITEMS, math.ceil(len(items) / (size * 4))))
        hard = _hard_limit(timeout_s)

        while len(results) < len(items):
            # (Re)start workers lazily: a batch of 3 slow items needs at most 3 processes.
            while len(self.workers) < size and queue:
                self._start_worker()
            active = self.workers[:size]
            for worker in active:
                if worker.ready and not worker.inflight and queue:
                    chunk = self._take_chunk(queue, chunk_items)
                    worker.inflight.extend(chunk)
                    worker.item_started_at = time.monotonic()
                    try:
                        worker.conn.send((timeout_s, chunk))
                    except OSError:  # it died while idle (killed from outside): nothing was started
                        worker.inflight.clear()
                        queue.extendleft(reversed(chunk))
                        self._remove(worker)
            active = self.workers[:size]

            deadlines = [
                w.item_started_at + hard if w.ready else w.started_at + _START_TIMEOUT_S
                for w in active
                if w.inflight or not w.ready
            ]
            if not deadlines:  # every active worker was just removed: start fresh ones
                continue
            wait_s = max(0.0, min(deadlines) - time.monotonic())
            wait([w.conn for w in active] + [w.proc.sentinel for w in active], timeout=wait_s)

            for worker in list(active):
                self._drain(worker, results)
            now = time.monotonic()
            for worker in list(active):
                dead = not worker.proc.is_alive()
                if not worker.ready:
                    if dead or now - worker.started_at > _START_TIMEOUT_S:
                        code = worker.proc.exitcode
                        self._remove(worker)
                        # One loss may be a kill from outside; repeated ones mean a broken environment.
                        self.start_failures += 1
                        if self.start_failures >= _MAX_START_FAILURES:
                            raise RuntimeError(
                                f"verify workers failed to start {self.start_failures} times in a row "
                                f"(last exit code {code}); "
                                + (_main_module_problem() or "run `python -c 'import math_verify'` to see why")
                            )
                    continue
                overdue = bool(worker.inflight) and now - worker.item_started_at > hard
                if dead or overdue:
                    # The item in progress is the culprit; the rest of its chunk is re-queued.
                    if worker.inflight:
                        key = worker.inflight.popleft()[0]
                        results[key] = (0.0, "timeout" if overdue and not dead else "error")
                        queue.extendleft(reversed(worker.inflight))
                        worker.inflight.clear()
                    self._remove(worker)
        return results

    @staticmethod
    def _take_chunk(queue: deque, max_items: int) -> list[tuple[int, str, str]]:
        chunk = [queue.popleft()]
        chars = len(chunk[0][1]) + len(chunk[0][2])
        while queue and len(chunk) < max_items:
            nxt_chars = len(queue[0][1]) + len(queue[0][2])
            if chars + nxt_chars > _CHUNK_MAX_CHARS:
                break
            chunk.append(queue.popleft())
            chars += nxt_chars
        return chunk

    def _drain(self, worker: _Worker, results: dict[int, tuple[float, str]]) -> None:
        """Read every message the worker has sent so far."""
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if message[0] == "ready":
                    worker.ready = True
                    self.start_failures = 0
                    continue
                key, reward, status = message
                if worker.inflight and worker.inflight[0][0] == key:
                    worker.inflight.popleft()
                results[key] = (reward, status)
                worker.item_started_at = time.monotonic()
        except (EOFError, OSError):
            pass  # the worker died; the caller sees it through is_alive()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()  # one batch at a time: callers in several threads share the workers


def shutdown_pool() -> None:
    """Stop the worker processes (registered atexit; the next ``verify_batch`` starts new ones)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.shutdown()
            _POOL = None


atexit.register(shutdown_pool)


def verify_batch(
    completions: Sequence[str],
    golds: Sequence[str],
    modes: Sequence[str] | None = None,
    timeout_s: float = 5.0,
    processes: int | None = None,
) -> list[VerifyResult]:
    """Check many completions: ``verify`` (mode ``math``) or ``verify_choice`` (mode ``choice``) per item.

    Safe from any thread. Each math item that needs Math-Verify runs in a worker process under a
    wall-clock limit of ``timeout_s`` seconds; an item over it gets status ``timeout``. Cheap verdicts
    (no box, equal strings or numbers, choice labels) are made here without any IPC, and identical
    (answer, gold) pairs are checked once. ``processes`` defaults to the number of usable CPUs.
    """
    global _POOL
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
    if modes is None:
        modes = ["math"] * len(completions)
    elif len(modes) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(modes)} modes")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    workers = _usable_cpus() if processes is None else processes
    if workers < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")

    out: list[VerifyResult | None] = [None] * len(completions)
    slow: dict[tuple[str, str], list[int]] = {}  # (answer, gold) -> item indices
    for i, (completion, gold, mode) in enumerate(zip(completions, golds, modes)):
        if mode == "choice":
            out[i] = verify_choice(completion, gold)
        elif mode == "math":
            answer = extract_boxed(completion)
            quick = quick_math(answer, gold)
            if quick is not None:
                out[i] = quick
            else:
                assert answer is not None  # _quick_math answers every missing answer
                slow.setdefault((answer, gold), []).append(i)
        else:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r} at index {i}")

    if slow:
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # We are a worker re-importing an unguarded main module: say so instead of a nested traceback.
            raise RuntimeError("verify_batch called while a worker process re-imports the main module: "
                               + (_main_module_problem() or f"put the script's code under `{_GUARD}`"))
        problem = _main_module_problem()
        if problem is not None and problem.startswith("the main module"):  # stdin: would fail 3 starts
            raise RuntimeError(f"verify_batch cannot start worker processes: {problem}")
        keyed = list(slow.items())
        items = [(k, answer, gold) for k, ((answer, gold), _) in enumerate(keyed)]
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = _Pool()
            verdicts = _POOL.run(items, float(timeout_s), workers)
        for k, ((answer, _gold), indices) in enumerate(keyed):
            reward, status = verdicts[k]
            for i in indices:
                out[i] = VerifyResult(reward, answer, status)
    return out  # type: ignore[return-value]
