"""Just enough W3C WebDriver to drive headless Chromium through Debian's `chromedriver`, over plain HTTP.

A browser session keeps its cookies across navigations (which `chromium --dump-dom` cannot), so a test
can sign in, click through the pages and sign out the way an operator does. No selenium dependency:
each command is one JSON request to chromedriver (https://www.w3.org/TR/webdriver2/).
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import requests

from tests.conftest import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# The flags of the other Chromium test: nothing in the background, no first-run UI, no sandbox (root).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--window-size=1280,900"]  # fmt: skip
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


class WebDriverError(RuntimeError):
    pass


class Browser:
    """One headless Chromium session behind its own chromedriver process; `close()` ends both."""

    def __init__(self, profile: Path, screenshots: Path) -> None:
        self.port = free_port()
        self.screenshots = screenshots
        screenshots.mkdir(parents=True, exist_ok=True)
        self._driver = subprocess.Popen(
            [CHROMEDRIVER, f"--port={self.port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._base = f"http://127.0.0.1:{self.port}"
        self.session: str | None = None
        try:
            self._wait_ready()
            options = {"binary": CHROMIUM, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]}
            caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}}
            self.session = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self._base}/status", timeout=1).json()["value"]["ready"]:
                    return
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(0.1)
        raise WebDriverError("chromedriver did not start")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        r = requests.request(method, self._base + path, json=body, timeout=60)
        value = r.json().get("value")
        if r.status_code != 200:
            raise WebDriverError(f"{method} {path}: {r.status_code} {value}")
        return value

    def _session(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    @property
    def url(self) -> str:
        return self._session("GET", "/url")

    @property
    def title(self) -> str:
        return self._session("GET", "/title")

    @property
    def source(self) -> str:
        return self._session("GET", "/source")

    def cookies(self) -> list[dict[str, Any]]:
        return self._session("GET", "/cookie")

    def find(self, css: str) -> str:
        return self._session("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def click(self, css: str) -> None:
        self._session("POST", f"/element/{self.find(css)}/click", {})

    def wait_for_url(self, expected: str, within_s: float = 15.0) -> str:
        """The page's URL once it is `expected`, or whatever it is after `within_s`: a click that submits a
        form returns before the browser has followed the answer's redirect on a busy machine."""
        deadline = time.monotonic() + within_s
        while (url := self.url) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return url

    def type(self, css: str, text: str) -> None:
        element = self.find(css)
        self._session("POST", f"/element/{element}/clear", {})
        self._session("POST", f"/element/{element}/value", {"text": text})

    def text(self, css: str) -> str:
        return self._session("GET", f"/element/{self.find(css)}/text")

    def screenshot(self, name: str) -> Path:
        path = self.screenshots / f"{name}.png"
        path.write_bytes(base64.b64decode(self._session("GET", "/screenshot")))
        return path

    def execute(self, script: str, *args: Any) -> Any:
        """Run `script` (a function body; `arguments` holds `args`) in the page and return its value.
        It runs through the DevTools protocol, not as the page's own script: the pages' CSP, which
        allows no script at all, does not apply to it."""
        return self._session("POST", "/execute/sync", {"script": script, "args": list(args)})

    def _cdp(self, command: str, params: dict[str, Any]) -> Any:
        return self._session("POST", "/goog/cdp/execute", {"cmd": command, "params": params})

    def set_viewport(self, width: int, height: int = 900) -> None:
        """Lay pages out for a viewport of `width` x `height` CSS pixels (a phone is 390 wide), as
        Chromium's device emulation does: exact, whatever the headless window's own limits."""
        self._cdp("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})  # fmt: skip
        self.viewport = (width, height)

    def full_screenshot(self, name: str, max_height: int = 8000) -> Path:
        """The whole page (up to `max_height` pixels) at the current viewport width."""
        width, height = getattr(self, "viewport", (1280, 900))
        full = min(int(self.execute("return document.documentElement.scrollHeight")), max_height)
        self.set_viewport(width, max(full, height))
        try:
            return self.screenshot(name)
        finally:
            self.set_viewport(width, height)

    def close(self) -> None:
        try:
            if self.session:
                self._call("DELETE", f"/session/{self.session}")
        except (requests.RequestException, WebDriverError):
            pass
        finally:
            self._driver.terminate()
            try:
                self._driver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._driver.kill()
                self._driver.wait()
