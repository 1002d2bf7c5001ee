"""Shared helpers of the benchmark scripts: machine facts, repeats, subprocess workers, Markdown tables.

Every benchmark measures ours and a baseline in the same run, because the machines are shared and
noisy: absolute seconds drift from run to run, ratios measured side by side do not drift as much.
Workers that need their own peak memory figure run in a child process (``run_worker``): the child's
``ru_maxrss`` is then its own peak and not the parent's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# Benchmarks never reach a model hub, and tokenizers' own thread pool would fight torch for 2 cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


# ------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge a figure: CPU, cores, load, library versions, date."""
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    info["torch_threads"] = int(os.environ.get("SPARK_BENCH_THREADS") or 0) or max(1, os.cpu_count() or 1)
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    for name in ("torch", "transformers", "trl", "prefect", "pyarrow", "duckdb", "pandas"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - an absent optional library is just not reported
            continue
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One Markdown line naming the machine (printed above every table)."""
    keys = ("cpu", "cores", "torch_threads", "gpu", "torch", "transformers", "trl", "prefect", "pyarrow", "duckdb")
    parts = [f"{k} {info[k]}" for k in keys if k in info]
    load = f", load avg {info['load_avg_1m']}" if "load_avg_1m" in info else ""
    return f"_{info['date']}; " + "; ".join(parts) + f"{load}_"


# ------------------------------------------------------------------------------------ timing


def peak_rss_mb() -> float:
    """Peak resident memory of THIS process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as t: ...` then `t[0]` holds the elapsed seconds (perf_counter)."""
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


def alternate(
    rounds: int, contenders: dict[str, Callable[[], float]]
) -> dict[str, list[float]]:
    """Run each contender once per round, reversing the order every other round.

    Alternating means a slow patch of a shared machine hits both sides instead of one; reversing the
    order cancels a systematic first/second effect (caches, frequency boost).
    """
    names = list(contenders)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            out[name].append(contenders[name]())
    return out


def ratio(ours: float, baseline: float) -> float:
    return ours / baseline if baseline else float("nan")


# ------------------------------------------------------------------------------- subprocesses


def run_worker(script: Path, spec: dict[str, Any], timeout_s: float = 900) -> dict[str, Any]:
    """Run `python script --worker SPEC_JSON --out FILE` in a fresh process and return FILE's JSON.

    A fresh process per contender keeps peak RSS separate and gives both sides the same cold start.
    The child's stderr is passed through so progress and errors stay visible.
    """
    with tempfile.TemporaryDirectory(prefix="spark-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "--worker", json.dumps(spec), "--out", str(out)]
        proc = subprocess.run(cmd, cwd=REPO, timeout=timeout_s, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout or "")[-2000:]
            raise RuntimeError(f"worker {spec} failed with exit code {proc.returncode}\n{tail}")
        return json.loads(out.read_text())


def write_worker_result(path: str, result: dict[str, Any]) -> None:
    result = dict(result)
    result.setdefault("peak_rss_mb", round(peak_rss_mb(), 1))
    Path(path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------- reporting


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers with `digits` significant figures (no scientific notation for ordinary sizes)."""
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "NO", None: "-"}[value]
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 10 ** digits:
            return f"{value:,.0f}"
        decimals = max(0, digits - 1 - int(f"{magnitude:e}".split("e")[1]))
        return f"{value:.{decimals}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, info: dict[str, Any], tables: Sequence[tuple[str, str]], notes: Sequence[str] = ()) -> str:
    """A Markdown section: title, machine line, then each (caption, table), then notes."""
    parts = [f"## {title}", "", machine_line(info), ""]
    for caption, table in tables:
        if caption:
            parts += [caption, ""]
        parts += [table, ""]
    parts += [f"- {note}" for note in notes]
    return "\n".join(parts).rstrip() + "\n"


def base_parser(description: str) -> argparse.ArgumentParser:
    """`--quick` (smoke run), `--json PATH`, plus the hidden worker arguments."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smallest sizes: a smoke run of the script")
    parser.add_argument("--json", metavar="PATH", help="also write all measurements to this JSON file")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every measured process (default: all cores)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser


def apply_threads(args: argparse.Namespace) -> None:
    """Pass `--threads` to this process and every worker it starts (through the environment)."""
    if getattr(args, "threads", None):
        os.environ["SPARK_BENCH_THREADS"] = str(args.threads)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str))
        print(f"(results written to {path})")


def set_threads() -> int:
    """Same torch thread count in every process that is compared: all cores (as a user would run),
    or SPARK_BENCH_THREADS (set by `--threads`; 1 gives steadier ratios on a machine others load)."""
    import torch

    threads = int(os.environ.get("SPARK_BENCH_THREADS") or 0) or max(1, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


def quiet_libraries() -> None:
    """Silence progress bars and info logs of transformers/datasets so tables stay readable."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
