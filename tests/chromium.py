"""Headless Chromium for the tests, driven over the DevTools protocol with trio-websocket
(no other dependency): open a page, evaluate JavaScript in it, take a screenshot."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

_LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


def chromium_or_skip() -> str:
    """The Chromium executable; skipped when missing (failed under CI, which installs it)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    why = "headless Chromium is not installed (Debian: apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must run the browser tests")
    pytest.skip(why)


class PageError(Exception):
    """JavaScript evaluated in the page threw."""


class Page:
    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser = browser
        self.session = session

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        return await self.browser.send(method, params, session=self.session)

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` (awaited if it is a promise), as JSON data."""
        answer = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise PageError(f"{expression[:80]!r} threw: {text}")
        return answer["result"].get("value")

    async def wait_for(self, predicate: str, what: str) -> Any:
        """Wait (in the page, every 50 ms) until the JavaScript ``predicate`` is truthy and
        return its value; the caller's deadline bounds it."""
        try:
            return await self.evaluate(
                "new Promise((resolve) => { const check = () => { let v; try { v = ("
                + predicate
                + "); } catch (e) { v = null; } v ? resolve(v) : setTimeout(check, 50); };"
                " check(); })"
            )
        except trio.Cancelled:  # pragma: no cover - the caller's deadline
            raise
        except PageError as exc:  # pragma: no cover - a broken predicate
            raise AssertionError(f"waiting for {what}: {exc}") from None

    async def screenshot(self, path: Path) -> None:
        answer = await self.send("Page.captureScreenshot", format="png")
        await trio.Path(path).write_bytes(base64.b64decode(answer["data"]))


class Chromium:
    """One headless Chromium process and its DevTools connection."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        ident = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[ident] = send
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        await self.ws.send_message(json.dumps(message))
        try:
            answer = await receive.receive()
        except trio.EndOfChannel:
            raise PageError(f"{method}: the browser closed the connection") from None
        if "error" in answer:
            raise PageError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer["result"]
        return result

    async def _read(self) -> None:
        while True:
            try:
                message = json.loads(await self.ws.get_message())
            except trio_websocket.ConnectionClosed:
                for waiter in self._waiting.values():
                    waiter.close()
                self._waiting.clear()
                return
            waiter = self._waiting.pop(message.get("id", -1), None)
            if waiter is not None:
                waiter.send_nowait(message)

    async def new_page(self, url: str, width: int = 1400, height: int = 1000) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"])
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        await page.send("Page.enable")
        await page.send("Page.navigate", url=url)
        return page


@asynccontextmanager
async def chromium() -> AsyncIterator[Chromium]:
    """Start headless Chromium (skipped if missing) and connect to its DevTools."""
    executable = chromium_or_skip()
    # (Chromium's helper processes may still write to the profile as it is removed)
    with tempfile.TemporaryDirectory(
        prefix="peerkit-chromium-", ignore_cleanup_errors=True
    ) as profile:
        args = [
            executable,
            "--headless",
            "--no-sandbox",  # the tests may run as root (CI does)
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        async with trio.open_nursery() as nursery:
            process = await trio.lowlevel.open_process(
                args,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its helpers end with it (killpg below)
            )
            try:
                assert process.stderr is not None
                seen = b""
                with trio.fail_after(30):
                    while not (found := _LISTENING.search(seen)):
                        chunk = await process.stderr.receive_some(4096)
                        if not chunk:
                            raise RuntimeError(f"chromium did not start: {seen.decode()[-2000:]}")
                        seen += chunk
                nursery.start_soon(_drain, process.stderr)
                url = found.group(1).decode()
                ws = await trio_websocket.connect_websocket_url(
                    nursery, url, max_message_size=64 << 20, message_queue_size=1024
                )
                browser = Chromium(ws)
                nursery.start_soon(browser._read)
                try:
                    yield browser
                finally:
                    with trio.move_on_after(5) as cs:
                        cs.shield = True
                        with contextlib.suppress(PageError, trio_websocket.ConnectionClosed):
                            await browser.send("Browser.close")
                        await process.wait()
                    with trio.move_on_after(5) as cs:
                        cs.shield = True
                        await ws.aclose()
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with trio.CancelScope(shield=True):
                    await process.wait()
                nursery.cancel_scope.cancel()


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    """Keep reading Chromium's log (a full pipe would stall it)."""
    while await stream.receive_some(65536):
        pass
