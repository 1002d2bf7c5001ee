"""A headless Chromium driven over the DevTools protocol with the `websockets` package (Prefect installs
it), enough to open the Prefect UI, wait for what a page shows, read the DOM and take screenshots.

    with Browser.launch(tmp_dir) as browser:
        page = browser.new_page(width=1400, height=1000)
        page.goto("http://127.0.0.1:4200/runs")
        page.wait_for("document.querySelectorAll('img').length > 0", what="an image")
        page.screenshot(Path("shot.png"))

Waiting is on conditions in the page (a JavaScript expression polled until it is truthy), never on
fixed sleeps, so a slow machine only makes a test slower, not flaky.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    """The path of a Chromium/Chrome binary on PATH (or /usr/bin/chromium), else None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


class BrowserError(RuntimeError):
    """The browser did not start, a DevTools command failed, or a page never showed what was awaited."""


@dataclass
class Page:
    """One tab, attached with a flat DevTools session on the browser's connection."""

    browser: "Browser"
    session_id: str

    def send(self, method: str, params: dict[str, Any] | None = None, timeout_s: float = 60) -> dict[str, Any]:
        return self.browser.send(method, params, session_id=self.session_id, timeout_s=timeout_s)

    def goto(self, url: str) -> None:
        answer = self.send("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise BrowserError(f"cannot open {url}: {answer['errorText']}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited when it is a promise), as JSON."""
        answer = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in answer:
            raise BrowserError(f"JavaScript failed: {expression[:200]}: {answer['exceptionDetails']}")
        return answer.get("result", {}).get("value")

    def wait_for(self, expression: str, what: str, timeout_s: float = 60, poll_s: float = 0.25) -> Any:
        """Poll `expression` until it is truthy; BrowserError naming `what` (and the page text) if never."""
        deadline = time.monotonic() + timeout_s
        error = ""
        while True:
            try:  # while a page loads, `document.body` may be null: not ready yet
                value = self.evaluate(expression)
            except BrowserError as err:
                value, error = None, str(err)
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText.slice(0, 1500) : ''")
                raise BrowserError(f"page never showed {what} within {timeout_s} s; url "
                                   f"{self.evaluate('location.href')}; last error: {error[:300]}; "
                                   f"it shows:\n{text}")
            time.sleep(poll_s)

    def click_text(self, selector: str, text: str) -> None:
        """Click the first element matching `selector` whose text contains `text`."""
        found = self.evaluate(
            f"(() => {{ const el = [...document.querySelectorAll({json.dumps(selector)})]"
            f".find(e => e.innerText && e.innerText.includes({json.dumps(text)}));"
            " if (!el) return false; el.scrollIntoView(); el.click(); return true; })()"
        )
        if not found:
            raise BrowserError(f"no {selector} with text {text!r} to click")

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        """Save a PNG of the viewport (or the whole page) to `path`."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 6000),
                                "scale": 1})
        data = self.send("Page.captureScreenshot", params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


@dataclass
class Browser:
    """A Chromium process and the DevTools websocket of its browser target."""

    process: subprocess.Popen
    ws: ClientConnection
    log: Path
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def launch(cls, work_dir: Path, binary: str | None = None, timeout_s: float = 60) -> "Browser":
        binary = binary or find_chromium()
        if binary is None:
            raise BrowserError("no Chromium binary found (install the Debian package `chromium`)")
        work_dir.mkdir(parents=True, exist_ok=True)
        log = work_dir / "chromium.log"
        argv = [
            binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            f"--user-data-dir={work_dir / 'profile'}", "about:blank",
        ]
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        url = None
        while url is None:
            text = log.read_text(errors="replace")
            m = re.search(r"DevTools listening on (ws://\S+)", text)
            if m:
                url = m.group(1)
            elif process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise BrowserError(f"Chromium did not open its DevTools port:\n{text[-3000:]}")
            else:
                time.sleep(0.1)
        ws = connect(url, max_size=64 * 2**20, open_timeout=30)
        return cls(process, ws, log)

    def send(self, method: str, params: dict[str, Any] | None = None, session_id: str | None = None,
             timeout_s: float = 60) -> dict[str, Any]:
        """Send one command and return its result; events arriving meanwhile are dropped."""
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id:
            msg["sessionId"] = session_id
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"no answer to {method} within {timeout_s} s")
            answer = json.loads(self.ws.recv(timeout=left))
            if answer.get("id") == msg_id:
                if "error" in answer:
                    raise BrowserError(f"{method} failed: {answer['error']}")
                return answer.get("result", {})

    def new_page(self, width: int = 1400, height: int = 1000) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.send("Page.enable")
        page.send("Runtime.enable")
        page.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        return page

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout_s=10)
        except Exception:  # noqa: BLE001 - the process is killed below either way
            pass
        try:
            self.ws.close()
        finally:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
