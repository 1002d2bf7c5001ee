"""Fixtures of the integration tests: a real SeaweedFS S3 server, a real Prefect server (SQLite) and a
real process worker, all on loopback with free ports and a temporary state directory.

- `stack` (session): the `infra.local.Stack`; everything it started is stopped at the end.
- `s3` (session): starts the S3 server; an s3fs filesystem with the stack's credentials.
- `prefect_api` (session): starts the Prefect server; its API URL.
- `deployed` (session): `spark deploy` against that server: {"spark-run": Deployed, "spark-iteration": ...}.
- `worker` (per test): makes sure the worker runs (tests kill and restart it).
- `reference_run` (session): one uninterrupted `tiny` iteration run through the `spark-iteration`
  deployment, the baseline the resume test compares against.
- `ui_run` (session), `browser` (per test): the browser tests (test_ui.py, marker `browser`) open the
  reference run in the Prefect UI with a headless Chromium; they share this stack rather than start
  their own (a second server, deployment and tiny iteration cost about two minutes of the suite).

A component that cannot start fails the tests with its log tail (never a silent skip). Measured
start-up and run times are printed in the terminal summary.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import s3fs

from deployments.deploy import Deployed, deploy
from infra.local import Stack, StackSettings, free_port

from cdp import Browser, find_chromium
from it_helpers import (
    SERVER_ENV,
    TIMINGS,
    ReferenceRun,
    create_flow_run,
    ensure_worker,
    run_root,
    s3_filesystem,
    started,
    tiny_config,
    wait_flow_run,
)
from ui_run import UiRun

HERE = Path(__file__).resolve().parent
_RUNNING: list[Stack] = []


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = StackSettings(
        s3_port=free_port(), prefect_port=free_port(), bucket="spark",
        worker_name="spark-it-worker", worker_poll_seconds=1,
    )
    st = Stack(tmp_path_factory.mktemp("spark-stack"), settings)
    # `prefect deploy` and other Prefect CLI calls of this session keep their state in the stack's dir.
    with mock.patch.dict(os.environ, {"PREFECT_HOME": str(st.state_dir / "prefect-client")}):
        _RUNNING.append(st)
        try:
            yield st
        finally:
            st.down()
            _RUNNING.clear()


@pytest.fixture(scope="session")
def s3(stack: Stack) -> s3fs.S3FileSystem:
    started("S3 server (weed mini)", stack.start_s3)
    return s3_filesystem(stack)


@pytest.fixture(scope="session")
def prefect_api(stack: Stack) -> str:
    started("Prefect server", lambda: stack.start_server(extra_env=SERVER_ENV))
    return stack.api_url


@pytest.fixture(scope="session")
def deployed(prefect_api: str) -> dict[str, Deployed]:
    start = time.monotonic()
    result = {d.name.split("/", 1)[1]: d for d in deploy(api_url=prefect_api)}
    TIMINGS["spark deploy"] = time.monotonic() - start
    return result


@pytest.fixture
def worker(stack: Stack, prefect_api: str, s3: s3fs.S3FileSystem) -> Stack:
    ensure_worker(stack)
    return stack


@pytest.fixture(scope="session")
def reference_run(
    stack: Stack, prefect_api: str, s3: s3fs.S3FileSystem, deployed: dict[str, Deployed]
) -> ReferenceRun:
    ensure_worker(stack)
    store_uri = stack.store_uri("reference")
    config = tiny_config(store_uri, stack.state_dir / "cache" / "models")
    run_id = "tiny-it"
    start = time.monotonic()
    _, run = create_flow_run(
        prefect_api, deployed["spark-iteration"].id, {"run_id": run_id, "config": config}, f"reference-{run_id}"
    )
    done = wait_flow_run(prefect_api, run["id"], stack, timeout_s=600)
    seconds = time.monotonic() - start
    TIMINGS["reference tiny iteration (trigger -> Completed)"] = seconds
    return ReferenceRun(run_id, store_uri, run_root(store_uri, run_id), config, done, seconds)


@pytest.fixture(scope="session")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium; .ci/run does it)")
    return path


@pytest.fixture(scope="session")
def ui_run(reference_run: ReferenceRun, stack: Stack, deployed: dict[str, Deployed]) -> UiRun:
    # The server serves the UI with PREFECT_UI_API_URL set to its own API (Stack.start_server).
    return UiRun(stack, stack.api_url, stack.api_url.removesuffix("/api"), deployed,
                 reference_run.run_id, reference_run.flow_run)


@pytest.fixture
def browser(chromium: str, tmp_path: Path) -> Iterator[Browser]:
    with Browser.launch(tmp_path / "chromium", binary=chromium) as b:
        yield b


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the servers after the last integration test, not at the end of the whole session, so the
    tests collected after these ones do not share the CPU with an idle Prefect server and worker."""
    if not _RUNNING:
        return
    later = item.session.items[item.session.items.index(item) + 1 :]
    if not any(HERE in Path(str(other.path)).parents for other in later):
        for st in _RUNNING:
            st.down()
        _RUNNING.clear()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.write_sep("-", "integration timings")
        for what, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{seconds:7.1f} s  {what}")

