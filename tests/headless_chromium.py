"""Headless Chromium driven over the DevTools protocol (aiohttp's websocket client): open a page, wait until it says
it is ready, read what it set, collect its script errors and console errors, take a screenshot."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
MISSING = "no chromium on PATH (Debian: apt-get install -y chromium; .ci/run installs it)"


@dataclass
class PageResult:
    png: bytes
    values: dict  # the page's expressions evaluated once it was ready
    errors: list[str] = field(default_factory=list)  # uncaught exceptions and console.error messages


def _devtools_port(profile: Path, process: subprocess.Popen, timeout: float = 30) -> int:
    marker = profile / "DevToolsActivePort"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if marker.is_file() and marker.read_text().strip():
            return int(marker.read_text().split()[0])
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited ({process.returncode}): {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    raise TimeoutError("chromium did not open its DevTools port")


async def _session(port: int, url: str, ready: str, values: dict[str, str], size: tuple[int, int],
                   timeout: float) -> PageResult:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
            target = next(t for t in await r.json() if t["type"] == "page")
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            ids, errors = iter(range(1, 1 << 30)), []

            async def call(method: str, **params: object) -> dict:
                i = next(ids)
                await ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
                async for msg in ws:
                    data = json.loads(msg.data)
                    if data.get("method") == "Runtime.exceptionThrown":
                        details = data["params"]["exceptionDetails"]
                        errors.append(details.get("exception", {}).get("description") or details["text"])
                    elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] == "error":
                        errors.append(" ".join(str(a.get("value", a.get("description"))) for a in data["params"]["args"]))
                    elif data.get("method") == "Log.entryAdded" and data["params"]["entry"]["level"] == "error":
                        errors.append(f"{data['params']['entry']['text']} {data['params']['entry'].get('url', '')}")
                    if data.get("id") == i:
                        if "error" in data:
                            raise RuntimeError(f"{method}: {data['error']}")
                        return data["result"]
                raise RuntimeError("the DevTools connection closed")

            async def evaluate(expression: str) -> object:
                result = await call("Runtime.evaluate", expression=expression, returnByValue=True)
                return result["result"].get("value")

            await call("Runtime.enable")
            await call("Log.enable")
            await call("Page.enable")
            await call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                       mobile=False)
            await call("Page.navigate", url=url)
            end, last, now = time.monotonic() + timeout, None, None
            while not now or now != last:  # truthy, and the same twice in a row: the page has settled
                if time.monotonic() > end:
                    raise TimeoutError(f"{url}: not ready ({ready}) after {timeout} s; errors: {errors}")
                await asyncio.sleep(0.2)
                last, now = now, await evaluate(ready)
            found = {k: await evaluate(v) for k, v in values.items()}
            shot = await call("Page.captureScreenshot", format="png")
            return PageResult(base64.b64decode(shot["data"]), found, errors)


def open_page(url: str, ready: str, values: dict[str, str] | None = None, size: tuple[int, int] = (1000, 700),
              timeout: float = 60) -> PageResult:
    """Open `url` in headless Chromium, wait until the expression `ready` is truthy and its value settles (the same
    twice in a row), evaluate `values`, take a screenshot."""
    if CHROMIUM is None:
        raise RuntimeError(MISSING)
    with tempfile.TemporaryDirectory(prefix="histoflow-chromium-") as profile:
        process = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                    "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                    f"--window-size={size[0]},{size[1]}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            port = _devtools_port(Path(profile), process)
            return asyncio.run(_session(port, url, ready, values or {}, size, timeout))
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
