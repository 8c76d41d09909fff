"""The JavaScript client (peerkit/static/peerkit.js), run by Node against a real broker.

The scenario (tests/js/client_scenario.mjs) is a browser peer's life: hello (a wrong token
refused), subscribe, publish, query and answer queries both ways with a Python peer,
bytes/NaN/big integers on the way, errors and timeouts, the broker's clock, its state,
heartbeats over an idle spell, goodbye. It reaches the broker through the dashboard's
JSON bridge, and straight, once the broker negotiates the JSON subprotocol itself.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio_websocket

from peerkit import Broker, Message, Peer, message
from peerkit import jsonwire as jw
from peerkit.errors import RemoteError
from peerkit.messages import PeerLeft
from peerkit.protocol import PROTOCOL_VERSION

pytest.importorskip(
    "hypercorn", reason="the dashboard's bridge needs hypercorn (peerkit[dashboard])"
)
from peerkit.dashboard import Dashboard

ROOT = Path(__file__).resolve().parent.parent
JS_DIR = ROOT / "tests" / "js"
CLIENT = ROOT / "peerkit" / "static" / "peerkit.js"
TOKEN = "s3cret"


def node_or_skip() -> str:
    """The node executable; skipped (failed under CI) when node or the ws package is missing."""
    node = shutil.which("node")
    why = None
    if node is None:
        why = "node is not installed (the JavaScript client's tests need Node >= 18)"
    elif not (JS_DIR / "node_modules" / "ws").is_dir():
        why = "the ws package is missing: run `npm ci --prefix tests/js`"
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI must run these tests)")
        pytest.skip(why)
    assert node is not None
    return node


@message(type="jstest.PySample")
class PySample(Message):
    seq: int
    text: str
    data: bytes
    samples: bytes  # float32 little-endian
    big: int
    nan: float


@message(type="jstest.JsEcho")
class JsEcho(Message):
    seq: int
    text: str
    data: bytes
    samples: bytes
    big: int
    nan: float


@message(type="jstest.JsReady")
class JsReady(Message):
    pass


@message(type="jstest.PyDone")
class PyDone(Message):
    pass


@message(type="jstest.JsBye")
class JsBye(Message):
    note: str


@message(type="jstest.Double")
class Double(Message):
    value: float
    data: bytes


@message(type="jstest.Doubled")
class Doubled(Message):
    value: float
    data: bytes


@message(type="jstest.Reverse")
class Reverse(Message):
    text: str
    data: bytes


@message(type="jstest.Reversed")
class Reversed(Message):
    text: str
    data: bytes


@message(type="jstest.Fail")
class Fail(Message):
    pass


@message(type="jstest.Slow")
class Slow(Message):
    pass


@functools.cache
def broker_speaks_json() -> bool:
    """Whether the broker itself accepts the JSON subprotocol (asked once, in a trio run
    of its own: a skip from inside the test's trio run would lose its reason)."""

    async def probe() -> bool:
        async with Broker() as broker:
            try:
                async with trio_websocket.open_websocket_url(
                    broker.url, subprotocols=[jw.SUBPROTOCOL]
                ) as ws:
                    return ws.subprotocol == jw.SUBPROTOCOL
            except (OSError, trio_websocket.HandshakeError):
                return False

    return trio.run(probe)


@pytest.fixture(params=["bridge", "broker"])
def route(request: pytest.FixtureRequest) -> str:
    """How a JSON client reaches the broker: through the dashboard's bridge, or straight
    (skipped until the broker negotiates the JSON subprotocol)."""
    if request.param == "broker" and not broker_speaks_json():
        pytest.skip(f"the broker does not negotiate {jw.SUBPROTOCOL} yet (the bridge does)")
    return str(request.param)


@pytest.fixture
async def json_url(
    route: str, request: pytest.FixtureRequest, nursery: trio.Nursery
) -> AsyncIterator[str]:
    """The ws:// URL a JSON client uses (the broker is ``request.node.broker``)."""
    broker = Broker(token=TOKEN, heartbeat_interval=0.2, heartbeat_timeout=0.8)
    await nursery.start(broker.run)
    request.node.broker = broker
    if route == "broker":
        yield broker.url
    else:
        dashboard = Dashboard(broker.url, token=TOKEN)
        await nursery.start(dashboard.run)
        yield f"ws://127.0.0.1:{dashboard.port}/ws?token={TOKEN}"
    await broker.shutdown()


def test_client_constants_match_the_protocol() -> None:
    text = CLIENT.read_text()
    assert f"export const PROTOCOL_VERSION = {PROTOCOL_VERSION};" in text
    assert re.search(r"SUBPROTOCOL = `peerkit\.json\.v\$\{PROTOCOL_VERSION\}`", text)


@pytest.fixture
def node() -> str:
    """The node executable (a plain fixture: a skip raised inside the test's trio run
    would lose its reason)."""
    return node_or_skip()


async def test_browser_peer_and_python_peer_exchange_both_ways(
    node: str, json_url: str, request: pytest.FixtureRequest
) -> None:
    broker: Broker = request.node.broker
    echoes: list[JsEcho] = []
    got_echoes = trio.Event()
    js_ready = trio.Event()
    left: list[PeerLeft] = []
    byes: list[JsBye] = []
    result: list[subprocess.CompletedProcess[bytes]] = []
    node_done = trio.Event()

    def on_echo(msg: JsEcho) -> None:
        echoes.append(msg)
        if len(echoes) == 2:
            got_echoes.set()

    async def double(msg: Double) -> Doubled:
        return Doubled(value=msg.value * 2, data=msg.data * 2)

    def fail(msg: Fail) -> Message:
        raise ValueError("refused on purpose")

    async def slow(msg: Slow) -> Message:
        await trio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def run_node() -> None:
        result.append(
            await trio.run_process(
                [node, str(JS_DIR / "client_scenario.mjs"), json_url, TOKEN],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        )
        node_done.set()

    sent = [
        PySample(
            seq=i,
            text=f"sample {i} ✓",
            data=bytes(range(256)) * i,
            samples=b"\x00\x00\xc0\x3f\x00\x00\x00\xc0\x00\x00\x80\x3e",  # 1.5, -2, 0.25
            big=1 << 60,
            nan=math.nan,
        )
        for i in (1, 2)
    ]
    with trio.fail_after(30):
        async with Peer(broker.url, "py", token=TOKEN) as py, trio.open_nursery() as nursery:
            await py.register_query_handler(Double, double)
            await py.register_query_handler(Fail, fail)
            await py.register_query_handler(Slow, slow)
            await py.subscribe_for_specific_msg_subtype(JsEcho, "js", on_echo)
            await py.subscribe_for_all_msg_subtype(JsReady, lambda m: js_ready.set())
            await py.subscribe_for_all_msg_subtype(JsBye, byes.append)
            await py.subscribe_for_all_msg_subtype(PeerLeft, left.append)
            nursery.start_soon(run_node)

            await js_ready.wait()
            for msg in sent:
                await py.send_message(msg)
            await got_echoes.wait()
            for echo, original in zip(echoes, sent, strict=True):
                assert echo.sender == "js"
                assert type(echo.data) is bytes and echo.data == original.data
                assert echo.samples == original.samples
                assert (echo.seq, echo.text, echo.big) == (original.seq, original.text, 1 << 60)
                assert math.isnan(echo.nan)

            answer = await py.ask_peer("js", Reverse(text="abc", data=b"\x01\x02"))
            assert answer == Reversed(text="cba", data=b"\x02\x01", sender="js")
            assert (await py.query(Reverse(text="é✓", data=b""))) == Reversed(
                text="✓é", data=b"", sender="js"
            )
            with pytest.raises(RemoteError) as info:
                await py.query(Reverse(text="boom", data=b""))
            assert info.value.error_type == "RangeError"
            assert info.value.peer_id == "js"
            assert "no boom here" in str(info.value)
            states = {p.peer_id: p.state for p in (await py.broker_info()).peers}
            assert states["js"] == "custom-ready"
            await py.send_message(PyDone())

            await node_done.wait()
            done = result[0]
            output = done.stdout.decode() + done.stderr.decode()
            assert done.returncode == 0, output
            assert output.splitlines()[-1] == "done", output
            await py.wait_for_state(lambda p: bool(left), timeout=5)
            nursery.cancel_scope.cancel()
    assert [b.note for b in byes] == ["closing"]
    assert [(m.sender, m.clean) for m in left] == [("js", True)]


async def test_bad_json_gets_the_brokers_error_and_the_connection_stays(json_url: str) -> None:
    with trio.fail_after(10):
        async with trio_websocket.open_websocket_url(json_url, subprotocols=[jw.SUBPROTOCOL]) as ws:
            hello = {"peer_id": "raw", "protocol_version": PROTOCOL_VERSION, "token": TOKEN}
            await ws.send_message(json.dumps({"kind": "HELLO", "body": hello}))
            (welcome,) = json.loads(await ws.get_message())
            assert welcome["kind"] == "WELCOME"
            await ws.send_message('{"kind": "PUB", "type": "X", "body": {"a": {"$byts": "AA=="}}}')
            (error,) = json.loads(await ws.get_message())
            assert error["kind"] == "ERROR"
            assert error["body"]["code"] == "bad_frame"
            assert error["body"]["detail"] == (
                "malformed frame: the envelope ('X'): a: unknown tag '$byts'; tags are $bytes, "
                '$float, $int, $map (wrap a map whose only key starts with "$" as {"$map": {...}})'
            )
            await ws.send_message(json.dumps({"kind": "INFO", "corr": 5}))
            while True:  # heartbeats may come first
                (reply,) = json.loads(await ws.get_message())
                if reply["kind"] != "HEARTBEAT":
                    break
            assert reply["kind"] == "REPLY" and reply["corr"] == 5
            assert [p["peer_id"] for p in reply["body"]["peers"]] == ["raw"]


async def test_a_wrong_hello_is_rejected_in_json(json_url: str) -> None:
    with trio.fail_after(10):
        async with trio_websocket.open_websocket_url(json_url, subprotocols=[jw.SUBPROTOCOL]) as ws:
            hello = {"peer_id": "raw", "protocol_version": PROTOCOL_VERSION, "token": "nope"}
            await ws.send_message(json.dumps({"kind": "HELLO", "body": hello}))
            (reject,) = json.loads(await ws.get_message())
            assert reject["kind"] == "REJECT"
            assert reject["body"]["reason"] == "bad_token"
            with pytest.raises(trio_websocket.ConnectionClosed):
                await ws.get_message()


def test_client_values_in_node() -> None:
    """toWire/fromWire/decodeSamples on their own (tests/js/values.test.mjs)."""
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is not installed; CI must run the JavaScript client's tests")
        pytest.skip("node is not installed (the JavaScript client's tests need Node >= 18)")
    done = subprocess.run(
        [node, "--test", str(JS_DIR / "values.test.mjs")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "# fail 0" in done.stdout
