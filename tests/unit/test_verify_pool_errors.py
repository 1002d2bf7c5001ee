"""verify_batch from a script it cannot start workers for says exactly what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spark_core.verify_pool import _has_main_guard

REPO = Path(__file__).resolve().parents[2]
# Needs Math-Verify (not decided by the quick string/number checks), so the worker pool starts.
CALL = 'print(verify_batch(["\\\\boxed{\\\\sqrt{2}/2}"], ["\\\\frac{\\\\sqrt{2}}{2}"], processes=1))'
IMPORT = "from spark_core.verify_pool import verify_batch\n"


def _run(tmp_path: Path, source: str, stdin: bool) -> subprocess.CompletedProcess:
    script = tmp_path / "check.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-"] if stdin else [sys.executable, str(script)]
    return subprocess.run(args, input=source if stdin else None, capture_output=True, text=True,
                          timeout=180, env=env, cwd=tmp_path)


def test_unguarded_script_is_told_to_add_the_main_guard(tmp_path: Path) -> None:
    proc = _run(tmp_path, IMPORT + CALL + "\n", stdin=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: verify workers failed to start 3 times in a row"), last
    assert f"{tmp_path / 'check.py'} has no `if __name__ == \"__main__\":` guard" in last
    assert "import math_verify" not in last  # the old hint pointed the wrong way
    # Each worker that re-ran the script says why it stopped, instead of a nested bootstrap traceback.
    assert "verify_batch called while a worker process re-imports the main module" in proc.stderr


def test_script_on_stdin_fails_at_once_with_what_to_do(tmp_path: Path) -> None:
    proc = _run(tmp_path, IMPORT + 'if __name__ == "__main__":\n    ' + CALL + "\n", stdin=True)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: verify_batch cannot start worker processes: the main module '<stdin>'")
    assert "save it to a file" in last and "python script.py" in last
    assert "failed to start" not in proc.stderr  # refused before any worker was tried


def test_guarded_script_works(tmp_path: Path) -> None:
    proc = _run(tmp_path, IMPORT + 'if __name__ == "__main__":\n    ' + CALL + "\n", stdin=False)
    assert proc.returncode == 0, proc.stderr
    assert "reward=1.0" in proc.stdout


@pytest.mark.parametrize("source, expected", [
    ('if __name__ == "__main__":\n    pass\n', True),
    ("if '__main__' == __name__:\n    pass\n", True),
    ('def main():\n    if __name__ == "__main__":\n        pass\n', False),  # not top level
    ('if __name__ != "__main__":\n    pass\n', False),
    ("x = 1\n", False),
    ("def broken(:\n", None),
])
def test_main_guard_detection(tmp_path: Path, source: str, expected: bool | None) -> None:
    path = tmp_path / "s.py"
    path.write_text(source)
    assert _has_main_guard(str(path)) is expected
