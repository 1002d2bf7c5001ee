"""Stalled Prefect API requests in a tiny `spark run` on the temporary API: Prefect's default task-run
recorder vs the batched one `flows.common.embedded_prefect` configures.

Each side is a fresh process running the `spark-run` flow (iterations as subflows) for a tiny run on a
fresh local store, exactly as `spark run` does, except that the baseline sets the temporary server's
task-run recorder back to Prefect's default (one SQLite transaction per task-run event). Every Prefect
client request is timed; a request over 0.5 s on loopback is a stall (in practice a 503 "database is
locked" and the client's ~2 s retry). Afterwards the temporary server's database is read to check that
every task run of the run was recorded.

    python bench/prefect_stalls.py                  # 2 rounds x 2 sides x 6 iterations, ~3 min
    python bench/prefect_stalls.py --quick          # 1 round, 3 iterations
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SCRIPT = Path(__file__).resolve()
STALL_S = 0.5


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import prefect.client.base as base
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId
    from prefect.settings import PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE, temporary_settings

    from flows.common import embedded_prefect
    from flows.run import spark_run
    from spark_core.config import load_config

    common.quiet_libraries()
    common.set_threads()
    stalls: list[dict[str, Any]] = []
    requests = [0]
    original = base.PrefectHttpxAsyncClient._send_with_retry

    async def timed(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await original(self, request, *args, **kwargs)
        finally:
            requests[0] += 1
            if (elapsed := time.perf_counter() - start) > STALL_S:
                path = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "{id}", request.url.path)
                stalls.append({"request": f"{request.method} {path}", "s": round(elapsed, 2)})

    base.PrefectHttpxAsyncClient._send_with_retry = timed  # type: ignore[method-assign]
    cfg = load_config(preset="tiny", overrides={"iterations": spec["iterations"]})
    default_recorder = {PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE: 1} if spec["side"] == "default" else {}
    with tempfile.TemporaryDirectory(prefix="spark-bench-stalls-") as store:
        with embedded_prefect(), temporary_settings(updates=default_recorder):
            start = time.perf_counter()
            state = spark_run(config=cfg, iterations=cfg.iterations, run_id="stalls", store=store, return_state=True)
            wall = time.perf_counter() - start
            state.result()  # raises if the run failed
            # Task runs recorded per iteration subflow (the recorder flushes on its own clock: wait 6 s).
            time.sleep(6)
            parent = FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])
            with get_client(sync_client=True) as client:
                subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=parent))
                recorded = [len(client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[f.id]))))
                            for f in sorted(subflows, key=lambda f: f.created)]
    return {"wall_s": wall, "requests": requests[0], "stalls": stalls, "task_runs_per_subflow": recorded}


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    args = parser.parse_args()
    common.apply_threads(args)
    if args.worker:
        import json

        common.write_worker_result(args.out, worker(json.loads(args.worker)))
        return 0
    rounds = args.rounds or (1 if args.quick else 2)
    iterations = args.iterations or (3 if args.quick else 6)
    info = common.machine_info()
    runs: dict[str, list[dict[str, Any]]] = {"default": [], "batched": []}
    for r in range(rounds):
        for side in ("default", "batched") if r % 2 == 0 else ("batched", "default"):
            print(f"[stalls] {side} (round {r + 1}/{rounds})", file=sys.stderr)
            runs[side].append(common.run_worker(SCRIPT, {"side": side, "iterations": iterations}, timeout_s=900))
    rows = []
    for side, label in (("default", "Prefect default (1 event per transaction)"),
                        ("batched", "batched (embedded_prefect)")):
        rs = runs[side]
        stalls = [s for r in rs for s in r["stalls"]]
        rows.append([label, len(rs), iterations, common.median([r["wall_s"] for r in rs]),
                     len(stalls), sum(s["s"] for s in stalls) / len(rs),
                     ", ".join(sorted({s["request"] for s in stalls})) or "-",
                     " / ".join(",".join(map(str, r["task_runs_per_subflow"])) for r in rs)])
    table = common.markdown_table(
        ["temporary server's task-run recorder", "runs", "iterations per run", "wall s (median)",
         f"requests over {STALL_S} s (all runs)", "stalled s per run", "stalled requests",
         "task runs recorded per iteration subflow"], rows)
    notes = [f"Wall ratio batched / default: {common.fmt(common.ratio(rows[1][3], rows[0][3]))}.",
             "Each side in a fresh process with a fresh store; rounds alternate which side goes first."]
    print(common.report("Prefect API stalls in a tiny spark run", info, [("", table)], notes))
    common.write_json(args.json, {"benchmark": "prefect_stalls", "machine": info, "results": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
