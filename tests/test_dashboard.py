"""The dashboard (peerkit.dashboard): what it serves and to whom, its bridge, its command,
and the page itself in headless Chromium against the running demo experiment."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio_websocket

from peerkit import Broker, Peer
from peerkit import jsonwire as jw
from peerkit.errors import PeerkitError
from peerkit.experiment import load_experiment
from peerkit.launch import Launcher

pytest.importorskip("hypercorn", reason="the dashboard needs hypercorn (peerkit[dashboard])")
from chromium import chromium

from peerkit.dashboard import Dashboard, dashboard_main

ROOT = Path(__file__).resolve().parent.parent


async def http_get(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP/1.1 GET on loopback: (status, headers, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        fields = {"Host": f"127.0.0.1:{port}", "Connection": "close", **(headers or {})}
        lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in fields.items()]
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    answer = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        answer[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), answer, body


async def ws_refusal(
    url: str, headers: list[tuple[bytes, bytes]] | None = None, json: bool = True
) -> int | None:
    """The HTTP status that refused a WebSocket to ``url``, or None if it opened."""
    try:
        async with trio_websocket.open_websocket_url(
            url, subprotocols=[jw.SUBPROTOCOL] if json else None, extra_headers=headers
        ):
            return None
    except trio_websocket.ConnectionRejected as exc:
        return exc.status_code
    except BaseExceptionGroup as group:  # trio-websocket 0.12 raises it from its reader task
        found, _ = group.split(trio_websocket.ConnectionRejected)
        if found is None:
            raise
        leaf: BaseException = found
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        assert isinstance(leaf, trio_websocket.ConnectionRejected)
        return leaf.status_code


@pytest.fixture
async def broker(nursery: trio.Nursery) -> AsyncIterator[Broker]:
    broker = Broker()
    await nursery.start(broker.run)
    yield broker
    await broker.shutdown()


# ----------------------------------------------------------------------------- serving


async def test_serves_the_page_and_its_scripts(
    broker: Broker, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(10):
        async with Dashboard(broker.url) as dashboard:
            assert dashboard.url == f"http://127.0.0.1:{dashboard.port}/"
            status, headers, body = await http_get(dashboard.port, "/")
            assert status == 200
            assert headers["content-type"] == "text/html; charset=utf-8"
            assert "default-src 'self'" in headers["content-security-policy"]
            assert b'<script type="module" src="/static/dashboard.js">' in body
            for path, kind in [
                ("/static/peerkit.js", "text/javascript"),
                ("/static/dashboard.js", "text/javascript"),
                ("/static/vendor/uplot/uPlot.iife.min.js", "text/javascript"),
                ("/static/vendor/uplot/uPlot.min.css", "text/css"),
            ]:
                status, headers, body = await http_get(dashboard.port, path)
                assert status == 200, path
                assert headers["content-type"].startswith(kind)
                assert body
            for path in [
                "/static/../dashboard.py",
                "/static/%2e%2e/dashboard.py",
                "/static/nope.js",
                "/static/vendor",
                "/elsewhere",
            ]:
                status, _, _ = await http_get(dashboard.port, path)
                assert status == 404, path


async def test_the_vendored_plot_library_comes_with_its_license() -> None:
    vendor = ROOT / "peerkit" / "static" / "vendor" / "uplot"
    assert "MIT License" in (vendor / "LICENSE").read_text()
    assert (
        (vendor / "uPlot.iife.min.js")
        .read_text()
        .startswith("/*! https://github.com/leeoniya/uPlot")
    )


async def test_a_token_guards_the_page_and_the_bridge(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    broker = Broker(token="tok en")
    await nursery.start(broker.run)
    with trio.fail_after(10):
        async with Dashboard(broker.url, token="tok en") as dashboard:
            assert dashboard.url.endswith("/?token=tok%20en")
            status, _, body = await http_get(dashboard.port, "/")
            assert status == 403
            assert b"open the address with ?token=" in body
            assert (await http_get(dashboard.port, "/?token=wrong"))[0] == 403
            assert (await http_get(dashboard.port, "/?token=tok%20en"))[0] == 200
            # the scripts are the package's own, public
            assert (await http_get(dashboard.port, "/static/peerkit.js"))[0] == 200
            url = f"ws://127.0.0.1:{dashboard.port}/ws"
            assert await ws_refusal(url) == 403
            assert await ws_refusal(url + "?token=wrong") == 403
            assert await ws_refusal(url + "?token=tok%20en") is None
    await broker.shutdown()


async def test_other_sites_and_other_host_names_are_refused(
    broker: Broker, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(10):
        async with Dashboard(broker.url) as dashboard:
            port = dashboard.port
            url = f"ws://127.0.0.1:{port}/ws"
            # a page from another site may not drive the peers (WebSockets ignore CORS)
            assert await ws_refusal(url, [(b"Origin", b"http://evil.example")]) == 403
            assert await ws_refusal(url, [(b"Origin", f"http://127.0.0.1:{port}".encode())]) is None
            # a DNS name pointed at loopback (rebinding) is not this dashboard's address
            status, _, body = await http_get(port, "/", {"Host": f"evil.example:{port}"})
            assert (status, b"is not this dashboard's address" in body) == (403, True)
            # the bridge speaks JSON only
            assert await ws_refusal(url, json=False) == 403
            assert dashboard.bridges == 0


async def test_the_bridge_closes_when_the_broker_is_not_there(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(10):
        async with Dashboard("ws://127.0.0.1:1") as dashboard:
            assert await ws_refusal(f"ws://127.0.0.1:{dashboard.port}/ws") == 403


async def test_the_page_loses_its_bridge_when_the_broker_goes(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    broker = Broker()
    await nursery.start(broker.run)
    with trio.fail_after(10):
        async with Dashboard(broker.url) as dashboard:
            ws = await trio_websocket.connect_websocket_url(
                nursery, f"ws://127.0.0.1:{dashboard.port}/ws", subprotocols=[jw.SUBPROTOCOL]
            )
            hello = {"peer_id": "page", "protocol_version": 2, "token": ""}
            await ws.send_message(json.dumps({"kind": "HELLO", "body": hello}))
            assert json.loads(await ws.get_message())[0]["kind"] == "WELCOME"
            await broker.shutdown()
            kinds = []
            with pytest.raises(trio_websocket.ConnectionClosed):
                while True:
                    kinds += [o["kind"] for o in json.loads(await ws.get_message())]
            assert "SHUTDOWN" in kinds


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"broker_url": "http://x"}, "must start with ws:// or wss://"),
        ({"broker_url": "ws://x", "host": "0.0.0.0"}, "pass the broker's token"),
        ({"broker_url": "ws://x", "token": ""}, "token must be a non-empty string"),
        ({"broker_url": "ws://x", "port": 70000}, "port must be an integer in 0..65535"),
    ],
)
def test_bad_options_name_the_fix(kwargs: dict[str, object], expected: str) -> None:
    with pytest.raises(PeerkitError, match=expected):
        Dashboard(**kwargs)  # type: ignore[arg-type]


def test_the_command_refuses_an_exposed_dashboard_without_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PEERKIT_TOKEN", raising=False)
    assert dashboard_main(["--broker", "ws://127.0.0.1:1", "--host", "0.0.0.0"]) == 2
    assert "pass the broker's token" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dashboard_main([])  # --broker is required


async def test_the_command_serves_until_interrupted(broker: Broker) -> None:
    """``peerkit dashboard``: as the ``peerkit`` command will run it, from its subparser."""
    script = (
        "import argparse, sys\n"
        "from peerkit.dashboard import add_arguments, dashboard_command\n"
        "parser = argparse.ArgumentParser(prog='peerkit')\n"
        "sub = parser.add_subparsers(dest='command', required=True)\n"
        "add_arguments(sub.add_parser('dashboard'))\n"
        "sys.exit(dashboard_command(parser.parse_args(sys.argv[1:])))\n"
    )
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", script, "dashboard", "--broker", broker.url, "--port", "0"],
            stdout=subprocess.PIPE,
        )
        assert process.stdout is not None
        out = b""
        while b"\n" not in out:
            chunk = await process.stdout.receive_some(1024)
            assert chunk, "the command ended before printing its address"
            out += chunk
        line = out.decode().splitlines()[0]
        assert line.startswith("peerkit dashboard on http://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1].strip("/"))
        assert (await http_get(port, "/"))[0] == 200
        process.send_signal(signal.SIGINT)
        assert await process.wait() == 0


# ----------------------------------------------------------------------------- the page


@pytest.fixture
async def demo(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Launcher]:
    """The demo experiment (examples/demo.toml), its peers in this process, running."""
    launcher = Launcher(
        load_experiment(ROOT / "examples" / "demo.toml"),
        inprocess=True,
        run_dir=tmp_path / "run",
        view="log",
        out=io.StringIO(),
        log_level=None,
    )
    done = trio.Event()

    async def run() -> None:
        await launcher.run()
        done.set()

    nursery.start_soon(run)
    await launcher.wait_until(lambda launcher: launcher.running.is_set(), 30)
    yield launcher
    launcher.stop()
    with trio.fail_after(15):
        await done.wait()


async def test_the_page_shows_the_demo_live_and_drives_its_peers(
    demo: Launcher, tmp_path: Path
) -> None:
    assert demo.broker_url is not None
    with trio.fail_after(60):
        async with Dashboard(demo.broker_url) as dashboard, chromium() as browser:
            page = await browser.new_page(
                dashboard.url + "?trace=SignalChunk&sender=filter&poll=0.25"
            )
            # every peer of the demo, with its state
            await page.wait_for(
                "['amplifier', 'filter', 'recorder'].every((id) =>"
                " document.querySelector(`tr[data-peer='${id}'] td.state`)?.textContent"
                " === 'running')",
                "the demo's peers, running, in the table",
            )
            assert dashboard.bridges == 1
            # the trace moves: new samples reach the plot, its time axis follows them
            plotted = (
                "(() => { const d = window.peerkitDashboard; const xs = d.trace?.plot?.data[0];"
                " return xs && xs.length > 0 && d.draws > 3"
                " && [xs[xs.length - 1], d.trace.plot.scales.x.max]; })()"
            )
            first = await page.wait_for(plotted, "a first chunk plotted")
            later = await page.wait_for(
                f"(({plotted}) || [0])[0] > {first[0] + 0.25} && {plotted}", "the trace moving"
            )
            assert later[1] > first[1]
            drawn = await page.evaluate(
                "(() => { const c = document.querySelector('#plot canvas');"
                " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                " let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;"
                " return n; })()"
            )
            assert drawn > 5000  # the traces are on the canvas
            stats = await page.wait_for(
                "window.peerkitDashboard.trace.latency", "latency figures on the page"
            )
            assert 0 < stats["median"] < 1.0
            shot = tmp_path / "dashboard.png"
            await page.screenshot(shot)
            assert shot.stat().st_size > 10_000
            if os.environ.get("PEERKIT_DOCS_SCREENSHOT"):  # to refresh the docs' picture
                shutil.copy(shot, ROOT / "docs" / "_static" / "dashboard.png")

            # stop the recorder from the page: its state changes everywhere
            await page.evaluate(
                "document.querySelector(\"button[data-peer='recorder'][data-action='stop']\").click()"
            )
            await page.wait_for(
                "[...document.querySelectorAll('#events li')].some((li) =>"
                " li.textContent.includes('recorder: recorder stop'))",
                "the recorder's answer in the page's events",
            )
            await page.wait_for(
                "document.querySelector(\"tr[data-peer='recorder'] td.state\")?.textContent"
                " !== 'running'",
                "the recorder's new state in the table",
            )
            async with Peer(demo.broker_url, "observer") as observer:
                states = {p.peer_id: p.state for p in (await observer.broker_info()).peers}
            assert states.get("recorder", "left") != "running"
            assert states["amplifier"] == "running"


async def test_a_dashboard_runs_once(broker: Broker, autojump_clock: trio.abc.Clock) -> None:
    dashboard = Dashboard(broker.url)
    with trio.fail_after(10):
        async with dashboard:
            with pytest.raises(PeerkitError, match="can be called only once"):
                await dashboard.run()
    with pytest.raises(PeerkitError, match="not listening yet"):
        dashboard.url  # noqa: B018
