"""Deterministic fault injection for tests: hold one stage's write at a named point until released.

Fault tests (kill the worker mid-write, stop the S3 server during an upload, ...) must not depend on how
fast a task runs. Instead of polling for a task to be RUNNING and hoping it is still there, a test
*arms* a hold for one stage write and one point, waits until the writer reports that it is *held*
there, does its damage, and then *releases* it (or kills the holder).

The hook is off unless ``SPARK_FAULT_DIR`` names a folder (tests set it for the worker they start); then
each hold point costs one ``stat`` of an arm file. Nothing in a normal run sets the variable.

Points of a stage write (``Store.write_table`` and ``Store.checkpoint_writer``), in order:

``before_write``     nothing of the stage is written yet
``mid_write``        the first part / file is under the temporary key, the rest is not (a checkpoint
                     on a local store: every file saved under the temporary key, none moved yet)
``before_manifest``  every part is in place, the ``_SUCCESS.json`` that commits them is not
``after_write``      the stage is committed; the task has not returned yet (a stage boundary)

A hold is one file per (stage key, point) in the fault folder: ``NAME.arm`` (written by the test),
``NAME.held`` (written by the writer when it stops there, holding its pid), ``NAME.release`` (written
by the test). The stage key is the stage's path below the store root, e.g.
``runs/demo/iter=0001/samples``. An armed hold fires once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

ENV = "SPARK_FAULT_DIR"
POINTS: tuple[str, ...] = ("before_write", "mid_write", "before_manifest", "after_write")
# A hold never outlives a forgotten test by more than this: the writer then fails loudly.
HOLD_TIMEOUT_S = float(os.environ.get("SPARK_FAULT_HOLD_TIMEOUT_S", "900"))


class FaultHoldTimeout(RuntimeError):
    """An armed hold was never released."""


def _name(stage_key: str, point: str) -> str:
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; one of {', '.join(POINTS)}")
    safe = stage_key.strip("/").replace("/", "~")
    return f"{safe}@{point}"


def stage_key(uri: str) -> str:
    """The part of a stage URI from its ``runs/`` folder on (what tests arm holds with)."""
    parts = uri.split("://", 1)[-1].strip("/").split("/")
    if "runs" not in parts:
        return "/".join(parts)
    last = len(parts) - 1 - parts[::-1].index("runs")  # a store prefix may itself be called runs
    return "/".join(parts[last:])


def hold_point(uri: str, point: str) -> None:
    """Stop here while a test holds this stage at this point (a no-op unless SPARK_FAULT_DIR is set)."""
    root = os.environ.get(ENV)
    if not root:
        return
    folder = Path(root)
    name = _name(stage_key(uri), point)
    arm = folder / f"{name}.arm"
    if not arm.exists():
        return
    arm.unlink(missing_ok=True)  # one shot: a retried write is not held again
    (folder / f"{name}.held").write_text(str(os.getpid()))
    release = folder / f"{name}.release"
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while not release.exists():
        if time.monotonic() > deadline:
            raise FaultHoldTimeout(f"fault hold {name} was never released (after {HOLD_TIMEOUT_S:.0f} s)")
        time.sleep(0.05)


# ------------------------------------------------------------------------------ test-side helpers


def arm(folder: str | Path, stage_key_: str, point: str) -> Path:
    """Arm a hold; returns the file whose appearance means the writer is held."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = _name(stage_key_, point)
    for suffix in ("held", "release"):
        (folder / f"{name}.{suffix}").unlink(missing_ok=True)
    (folder / f"{name}.arm").write_text("")
    return folder / f"{name}.held"


def wait_held(folder: str | Path, stage_key_: str, point: str, timeout_s: float = 300.0,
              alive: Callable[[], bool] | None = None) -> int:
    """Block until the writer is held at the point; return its pid.

    ``alive`` (optional) is polled to fail fast when the run died before reaching the point.
    """
    held = Path(folder) / f"{_name(stage_key_, point)}.held"
    deadline = time.monotonic() + timeout_s
    while not held.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{stage_key_} never reached {point} within {timeout_s:.0f} s")
        if alive is not None and not alive():
            raise RuntimeError(f"the run ended before {stage_key_} reached {point}")
        time.sleep(0.05)
    text = ""
    while not text:  # written in one call, but another process may see it empty for an instant
        text = held.read_text().strip()
        if not text:
            time.sleep(0.01)
    return int(text)


def disarm(folder: str | Path, stage_key_: str, point: str) -> bool:
    """Remove a hold that has not fired (so a later run is not held); True if it was still armed."""
    arm_file = Path(folder) / f"{_name(stage_key_, point)}.arm"
    if arm_file.exists():
        arm_file.unlink(missing_ok=True)
        return True
    return False


def release(folder: str | Path, stage_key_: str, point: str) -> None:
    """Let the held writer go on."""
    (Path(folder) / f"{_name(stage_key_, point)}.release").write_text("")
