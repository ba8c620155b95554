"""Headless Chromium driven over the DevTools protocol (aiohttp's websocket client): open a page, wait until it says
it is ready, read what it set, collect its script errors and console errors, take a screenshot; then, step by step,
move the pointer (Input.dispatchMouseEvent, as a mouse does) or run a script, wait again, read and take another."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import aiohttp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
MISSING = "no chromium on PATH (Debian: apt-get install -y chromium; .ci/run installs it)"


@dataclass
class PageResult:
    png: bytes
    values: dict  # the page's expressions evaluated once it was ready
    errors: list[str] = field(default_factory=list)  # uncaught exceptions and console.error messages
    steps: list[PageResult] = field(default_factory=list)  # what each Step found (errors: the page's, all steps)


@dataclass
class Step:
    """Once the page (or the step before) is ready: move the pointer to `pointer(values)` (window px; `values`: what
    the page gave when it was first ready) and/or run `script`, wait until `ready` is truthy and settled, evaluate
    `values`, take a screenshot."""

    ready: str
    values: dict[str, str] = field(default_factory=dict)
    script: str | None = None
    pointer: Callable[[dict], tuple[float, float]] | None = None


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
                   timeout: float, steps: Sequence[Step]) -> PageResult:
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
                        errors.append(" ".join(str(a.get("value", a.get("description")))
                                               for a in data["params"]["args"]))
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
            async def settle(expression: str) -> PageResult:
                end, last, now = time.monotonic() + timeout, None, None
                while not now or now != last:  # truthy, and the same twice in a row: the page has settled
                    if time.monotonic() > end:
                        raise TimeoutError(f"{url}: not ready ({expression}) after {timeout} s; errors: {errors}")
                    await asyncio.sleep(0.2)
                    last, now = now, await evaluate(expression)
                return PageResult(b"", {}, errors)

            async def read(result: PageResult, wanted: dict[str, str]) -> PageResult:
                result.values = {k: await evaluate(v) for k, v in wanted.items()}
                result.png = base64.b64decode((await call("Page.captureScreenshot", format="png"))["data"])
                return result

            await call("Page.navigate", url=url)
            page = await read(await settle(ready), values)
            for step in steps:
                if step.pointer is not None:
                    x, y = step.pointer(page.values)
                    await call("Input.dispatchMouseEvent", type="mouseMoved", x=float(x), y=float(y))
                if step.script is not None:
                    await evaluate(step.script)
                page.steps.append(await read(await settle(step.ready), step.values))
            return page


def open_page(url: str, ready: str, values: dict[str, str] | None = None, size: tuple[int, int] = (1000, 700),
              timeout: float = 60, steps: Sequence[Step] = ()) -> PageResult:
    """Open `url` in headless Chromium, wait until the expression `ready` is truthy and its value settles (the same
    twice in a row), evaluate `values`, take a screenshot; then each of `steps` (PageResult.steps)."""
    if CHROMIUM is None:
        raise RuntimeError(MISSING)
    # Chromium's helper processes may still write the profile as the browser ends: its process group is ended
    # whole, and a file they leave behind does not fail the test
    with tempfile.TemporaryDirectory(prefix="histoflow-chromium-", ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                    "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                    f"--window-size={size[0]},{size[1]}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            port = _devtools_port(Path(profile), process)
            return asyncio.run(_session(port, url, ready, values or {}, size, timeout, steps))
        finally:
            _end_group(process)


def _end_group(process: subprocess.Popen) -> None:
    """The browser asked to end (killed after 10 s), then every helper process it started (its session's process
    group) killed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
