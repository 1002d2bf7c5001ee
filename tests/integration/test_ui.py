"""The Prefect UI in a real browser (headless Chromium over the DevTools protocol), after the integration suite's
reference tiny iteration ran on its stack (conftest.py): the flow run's Artifacts tab lists the run's artifacts, the summary shows the
metrics plot (an <img> the browser decoded), a stage preview shows the stage's first rows, the lineage
diagram is drawn by the V2 UI, and the deployment's Custom-run form opens.

Set SPARK_SCREENSHOTS=DIR to keep the screenshots (the README's are made with SPARK_SCREENSHOTS=docs/img).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from infra.local.processes import http_json
from tasks.publish import artifact_keys, stage_artifact_key

from cdp import Browser, Page
from ui_run import UiRun

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(600)]

WIDTH, HEIGHT = 1400, 1000
UI_WAIT_S = 90  # a page of the UI on a busy 2-core machine
SETTLE_S = 2.0


def shot(page: Page, tmp_path: Path, name: str, full_page: bool = False) -> Path:
    """A screenshot, after what the test waited for is shown; the pause only lets the page finish
    drawing (the run's timeline is a canvas) so the picture is complete, nothing is asserted on it."""
    time.sleep(SETTLE_S)
    path = page.screenshot(tmp_path / f"{name}.png", full_page=full_page)
    keep = os.environ.get("SPARK_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    return path


def latest_artifact(ui_run: UiRun, key: str) -> dict[str, Any]:
    """The flow run's newest artifact under `key`."""
    body = {"artifacts": {"key": {"any_": [key]}}, "flow_runs": {"id": {"any_": [ui_run.flow_run["id"]]}},
            "sort": "CREATED_DESC", "limit": 1}
    status, found = http_json("POST", f"{ui_run.api}/artifacts/filter", body, timeout=15, retries=4)
    assert status == 200 and found, f"no artifact {key} for flow run {ui_run.flow_run['id']}: {status} {found}"
    return found[0]


def open_from_artifacts_tab(page: Page, ui_run: UiRun, artifact_id: str) -> None:
    """Flow run page -> Artifacts tab -> the card of `artifact_id` (as a person clicks through)."""
    page.goto(f"{ui_run.ui}/runs/flow-run/{ui_run.flow_run['id']}")
    page.wait_for("document.querySelectorAll('li.p-tab').length > 0", "the flow run's tabs", UI_WAIT_S)
    page.click_text("li.p-tab", "Artifacts")
    card = f"a[href='/artifacts/artifact/{artifact_id}']"
    page.wait_for(f"!!document.querySelector({json.dumps(card)})", f"the card of artifact {artifact_id}", UI_WAIT_S)
    page.evaluate(f"document.querySelector({json.dumps(card)}).click()")
    page.wait_for(f"location.pathname === '/artifacts/artifact/{artifact_id}'", "the artifact page", UI_WAIT_S)


def test_flow_run_artifacts_show_the_plot_and_a_stage_preview(ui_run: UiRun, browser: Browser,
                                                              tmp_path: Path) -> None:
    keys = artifact_keys(ui_run.run_id)
    summary = latest_artifact(ui_run, keys["summary"])
    samples = latest_artifact(ui_run, stage_artifact_key(ui_run.run_id, "samples"))
    page = browser.new_page(WIDTH, HEIGHT)

    page.goto(f"{ui_run.ui}/runs/flow-run/{ui_run.flow_run['id']}")
    page.wait_for("(() => { const t = document.body.innerText; return t.includes('Completed') && "
                  f"t.includes({json.dumps(ui_run.flow_run['name'])}) && /\\d+ Task runs/.test(t) && "
                  "t.includes('Finished in state') && !t.includes('Waiting for logs'); })()",
                  "the completed flow run with its task runs and logs", UI_WAIT_S)
    shot(page, tmp_path, "flow-run")
    page.click_text("li.p-tab", "Artifacts")
    page.wait_for(f"document.body.innerText.includes({json.dumps(keys['index'])})", "the artifact cards", UI_WAIT_S)
    shot(page, tmp_path, "flow-run-artifacts")

    # The summary: its metrics plot is a data: URI the browser decodes into a real image.
    open_from_artifacts_tab(page, ui_run, summary["id"])
    width = page.wait_for(
        "(() => { const im = [...document.querySelectorAll('img')].find(i => i.src.startsWith('data:image/png'));"
        " return im && im.complete ? im.naturalWidth : 0; })()", "the metrics plot", UI_WAIT_S)
    assert width > 0
    shot(page, tmp_path, "artifact-summary", full_page=True)

    # A stage preview: a table with the stage's first rows.
    open_from_artifacts_tab(page, ui_run, samples["id"])
    expected = json.loads(samples["data"])
    # The UI fills text cells after it has drawn the rows (a cell may be empty for a moment): wait for
    # the first row's question text, not merely for rows to exist.
    cells = page.wait_for(
        "(() => { const rows = [...document.querySelectorAll('table tbody tr')];"
        f" return rows.length && rows[0].innerText.includes({json.dumps(expected[0]['question'])})"
        " ? rows.map(r => r.innerText) : null; })()", "the preview's rows with their text", UI_WAIT_S)
    assert len(cells) == len(expected) > 0
    assert expected[0]["question_id"] in cells[0] and expected[0]["question"] in cells[0]
    shot(page, tmp_path, "artifact-stage-preview")


def test_lineage_is_drawn_by_the_v2_ui(ui_run: UiRun, browser: Browser, tmp_path: Path) -> None:
    lineage = latest_artifact(ui_run, artifact_keys(ui_run.run_id)["lineage"])
    page = browser.new_page(WIDTH, HEIGHT)
    page.goto(f"{ui_run.ui}/v2/artifacts/artifact/{lineage['id']}")
    labels = page.wait_for(
        "(() => { const svg = document.querySelector('svg.flowchart, svg[id^=mermaid]');"
        " return svg ? svg.textContent : null; })()", "the Mermaid diagram", UI_WAIT_S)
    assert "iter=0001/samples" in labels and "iter=0000/checkpoint" in labels
    shot(page, tmp_path, "artifact-lineage-v2", full_page=True)


def test_custom_run_form_opens(ui_run: UiRun, browser: Browser, tmp_path: Path) -> None:
    dep = ui_run.deployments["spark-iteration"]
    page = browser.new_page(WIDTH, HEIGHT)
    page.goto(f"{ui_run.ui}/deployments/deployment/{dep.id}/run")
    page.wait_for("document.body.innerText.includes('run_id') || document.body.innerText.includes('Run Id')",
                  "the Custom-run form", UI_WAIT_S)
    text = page.evaluate("document.body.innerText")
    assert "preset" in text.lower()
    shot(page, tmp_path, "custom-run-form")
