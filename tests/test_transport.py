"""The transport is trio-websocket: what peerkit holds and accepts, the broker mounted on an
application's server, and how close codes reach the peer."""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio_websocket

from peerkit import (
    Broker,
    BrokerLostError,
    Message,
    Peer,
    PeerkitError,
    codec,
    message,
)
from peerkit.codec import control
from peerkit.errors import BrokerConnectError
from peerkit.protocol import PROTOCOL_VERSION, Hello, Kind
from peerkit.testing import wait_for_condition

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "peerkit"


@message
class TNote(Message):
    text: str


@message
class TDouble(Message):
    n: int


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="peerkit")


# ------------------------------------------------------------------ one transport


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_imports_another_websocket_layer() -> None:
    """trio-websocket is the only WebSocket library peerkit's code uses: no module imports
    websockets, or wsproto (trio-websocket's own Sans-I/O layer) directly."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & {"websockets", "wsproto"})
        for path in PACKAGE.rglob("*.py")
        if _imports(path) & {"websockets", "wsproto"}
    }
    assert offenders == {}


def test_no_module_frames_websocket_bytes_itself() -> None:
    """No framing, masking, handshake or close-code code of peerkit's own: none of what it
    would need appears in the package (a header byte of a binary frame, the handshake's
    headers and GUID, a masking XOR, an HTTP upgrade)."""
    needles = (
        "Sec-WebSocket",
        "258EAFA5",  # the handshake's GUID
        "Upgrade: websocket",
        "0x82",  # FIN + binary opcode
        "\\x82",
        "mask_key",
        "masking",
    )
    found = [
        f"{path.relative_to(ROOT)}: {needle}"
        for path in PACKAGE.rglob("*.py")
        for needle in needles
        if needle in path.read_text()
    ]
    assert found == []


def test_a_fresh_interpreter_importing_peerkit_loads_no_websockets_package() -> None:
    code = "import sys, peerkit, peerkit.peer, peerkit.broker; print('websockets' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"


async def test_every_connection_is_a_trio_websocket_connection(broker: Broker) -> None:
    with trio.fail_after(10):
        async with Peer(broker.url, "a") as a:
            assert isinstance(a._link._ws, trio_websocket.WebSocketConnection)
            (conn,) = broker._conns.values()
            assert isinstance(conn.ws, trio_websocket.WebSocketConnection)


async def test_a_listening_broker_accepts_any_path(broker: Broker) -> None:
    with trio.fail_after(10):
        async with (
            Peer(broker.url + "/some/where", "a") as a,
            Peer(broker.url + "/?x=1", "b") as b,
            b.subscription(TNote) as stream,
        ):
            await a.send_message(TNote(text="any path"))
            assert (await stream.receive()).text == "any path"


# ------------------------------------------------------------------ close codes


async def test_a_message_over_the_websocket_limit_closes_with_1009(nursery: trio.Nursery) -> None:
    """trio-websocket enforces the broker's frame limit (code 1009, message too big)."""
    with trio.fail_after(10):
        broker = Broker(max_message_size=1000)
        await nursery.start(broker.run)
        async with trio_websocket.open_websocket_url(
            broker.url, connect_timeout=5, disconnect_timeout=5
        ) as ws:
            hello = Hello(peer_id="big", protocol_version=PROTOCOL_VERSION)
            await ws.send_message(control(Kind.HELLO, hello))
            (welcome,) = codec.iter_envelopes(await ws.get_message())  # type: ignore[arg-type]
            assert welcome.kind == Kind.WELCOME
            await ws.send_message(b"\x00" * 200_000)
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                while True:
                    await ws.get_message()
            assert info.value.reason is not None and info.value.reason.code == 1009
        await broker.shutdown()


async def test_a_disconnected_peer_is_told_the_close_code_and_reason(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(20):
        broker = Broker(send_queue_size=10, overflow="disconnect")
        await nursery.start(broker.run)
        slow = Peer(broker.url, "slow", receive_queue_size=1)
        release = trio.Event()
        errors: list[BaseException] = []

        async def stuck(msg: TNote) -> None:
            await release.wait()

        async def run_slow(task_status: trio.TaskStatus[None]) -> None:
            try:
                await slow.run(task_status=task_status)
            except BrokerLostError as exc:
                errors.append(exc)

        async with Peer(broker.url, "pub") as pub, trio.open_nursery() as inner:
            await inner.start(run_slow)
            await slow.subscribe_for_all_msg_subtype(TNote, stuck)

            async def publish() -> None:
                while True:
                    await pub.send_message(TNote(text="x" * 60_000))

            inner.start_soon(publish)
            await slow.wait_finished()
            release.set()
            inner.cancel_scope.cancel()
        (error,) = errors
        assert "code 1008 POLICY_VIOLATION" in str(error) and "overflowed" in str(error)
        await broker.shutdown()


# ------------------------------------------------------------------ mounting


@asynccontextmanager
async def app_server(
    broker: Broker, *, mount: str = "/peerkit"
) -> AsyncIterator[tuple[str, list[str]]]:
    """An application's own trio-websocket server: ``mount`` goes to the broker, ``/echo``
    is its own endpoint, anything else is refused (404). Yields its base URL and the paths
    it saw."""
    seen: list[str] = []

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        seen.append(request.path)
        if request.path == mount:
            await broker.handle_request(request)
        elif request.path == "/echo":
            ws = await request.accept()
            try:
                while True:
                    await ws.send_message(await ws.get_message())
            except trio_websocket.ConnectionClosed:
                pass
        else:
            await request.reject(404)

    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            trio_websocket.serve_websocket,
            handler,
            "127.0.0.1",
            0,
            None,
            **broker.websocket_options(),
        )
        server: trio_websocket.WebSocketServer = await nursery.start(serve)
        yield f"ws://127.0.0.1:{server.port}", seen
        nursery.cancel_scope.cancel()


async def test_mounted_broker_serves_peers_beside_the_apps_own_endpoint(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        broker = Broker(listen=False)
        await nursery.start(broker.run)
        async with app_server(broker) as (base, seen):
            async with trio_websocket.open_websocket_url(f"{base}/echo") as ws:
                await ws.send_message("ping")
                assert await ws.get_message() == "ping"
            async with (
                Peer(f"{base}/peerkit", "listener") as listener,
                Peer(f"{base}/peerkit", "talker") as talker,
                listener.subscription(TNote) as stream,
            ):
                await listener.register_query_handler(TDouble, lambda q: TDouble(n=2 * q.n))
                await talker.send_message(TNote(text="through the app"))
                got = await stream.receive()
                assert (got.text, got.sender) == ("through the app", "talker")
                answer = await talker.query(TDouble(n=21))
                assert isinstance(answer, TDouble) and answer.n == 42
                assert broker.peer_ids == ["listener", "talker"]
            assert seen.count("/peerkit") == 2
            await broker.shutdown()
            # the application's server is still up after the broker shut down
            async with trio_websocket.open_websocket_url(f"{base}/echo") as ws:
                await ws.send_message("still here")
                assert await ws.get_message() == "still here"


async def test_a_mounted_broker_has_no_url_of_its_own(nursery: trio.Nursery) -> None:
    broker = Broker(listen=False)
    await nursery.start(broker.run)
    with pytest.raises(PeerkitError, match=r"mounted broker.*handle_request"):
        _ = broker.url
    await broker.shutdown()


async def _refused_request(broker: Broker) -> tuple[PeerkitError, BrokerConnectError]:
    """Hand a peer's request to ``broker`` through an app; return the app's error and the
    peer's."""
    errors: list[PeerkitError] = []

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        try:
            await broker.handle_request(request)
        except PeerkitError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        server: trio_websocket.WebSocketServer = await nursery.start(
            trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None
        )
        peer = Peer(f"ws://127.0.0.1:{server.port}/peerkit", "p", connect_timeout=5)
        with pytest.raises(BrokerConnectError) as info:
            await peer.run()
        nursery.cancel_scope.cancel()
    (error,) = errors
    return error, info.value


async def test_a_request_before_the_broker_runs_is_refused_clearly() -> None:
    with trio.fail_after(10):
        app_error, peer_error = await _refused_request(Broker(listen=False))
        assert "not running yet" in str(app_error) and "nursery.start(broker.run)" in str(app_error)
        assert "HTTP 503" in str(peer_error)


async def test_a_request_after_the_broker_shut_down_is_refused_clearly(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        broker = Broker(listen=False)
        await nursery.start(broker.run)
        await broker.shutdown()
        app_error, peer_error = await _refused_request(broker)
        assert "has shut down" in str(app_error)
        assert "HTTP 503" in str(peer_error)


async def test_a_peer_at_the_wrong_path_is_told_so(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        broker = Broker(listen=False)
        await nursery.start(broker.run)
        async with app_server(broker) as (base, _seen):
            with pytest.raises(BrokerConnectError, match=r"HTTP 404.*path"):
                await Peer(f"{base}/wrong", "lost").run()
        await broker.shutdown()


async def test_mounted_broker_shutdown_reaches_its_peers(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        broker = Broker(listen=False)
        await nursery.start(broker.run)
        async with app_server(broker) as (base, _seen):
            peer = Peer(f"{base}/peerkit", "p")
            await nursery.start(peer.run)
            await broker.shutdown()
            await peer.wait_finished()
            assert peer.error is None and peer.is_finished


async def test_cancelling_the_apps_nursery_ends_peers_and_broker_cleanly() -> None:
    """Everything in the application's own nursery: cancelling it from outside finishes
    peers and broker (peers still say goodbye) and returns."""
    with trio.fail_after(10):
        broker = Broker(listen=False)
        peer = Peer("ws://placeholder", "p")  # replaced below once the port is known
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.run)
            async with app_server(broker) as (base, _seen):
                peer = Peer(f"{base}/peerkit", "p")
                await nursery.start(peer.run)
                await peer.wait_for_state(lambda p: p.is_running, 5)
                nursery.cancel_scope.cancel()
        assert peer.is_finished and peer.error is None


def _load_example(name: str) -> Callable[[], Awaitable[None]]:
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", ROOT / "examples" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    main: Callable[[], Awaitable[None]] = module.main
    return main


async def test_the_embedded_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(20):
        await _load_example("embedded_app")()
    out = capsys.readouterr().out
    assert "/echo answered 'ping'" in out
    assert 'listener got "hello through the app\'s port" from talker' in out
    assert "listener answered Sum(sender='listener', value=42)" in out


async def test_a_server_that_never_answers_the_hello_fails_the_start_in_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A WebSocket server that accepts the connection but is no broker: the peer's start
    fails within connect_timeout, naming the cause."""

    async def mute(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.get_message()  # the hello, never answered
        await trio.sleep_forever()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server: trio_websocket.WebSocketServer = await nursery.start(
                trio_websocket.serve_websocket, mute, "127.0.0.1", 0, None
            )
            start = trio.current_time()
            peer = Peer(f"ws://127.0.0.1:{server.port}", "p", connect_timeout=3)
            with pytest.raises(BrokerConnectError, match="did not answer the peer's hello"):
                await peer.run()
            assert trio.current_time() - start < 4
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ browsers


async def test_the_broker_negotiates_the_json_subprotocol_and_answers_time(
    broker: Broker,
) -> None:
    from peerkit import jsonwire

    with trio.fail_after(10):
        async with trio_websocket.open_websocket_url(
            broker.url, subprotocols=[jsonwire.SUBPROTOCOL]
        ) as ws:
            assert ws.subprotocol == jsonwire.SUBPROTOCOL
            hello = Hello(peer_id="browser", protocol_version=PROTOCOL_VERSION)
            await ws.send_message(jsonwire.frame_to_json(control(Kind.HELLO, hello)))
            welcome = await ws.get_message()
            assert isinstance(welcome, str) and "WELCOME" in welcome
            await ws.send_message('{"kind": "TIME", "corr": 7}')
            while True:
                answer = await ws.get_message()
                assert isinstance(answer, str)
                if "peerkit.BrokerTime" in answer:
                    break
            assert '"corr": 7' in answer or '"corr":7' in answer
            assert "browser" in broker.peer_ids


async def test_a_json_connection_from_another_sites_page_is_refused_without_a_token(
    broker: Broker,
) -> None:
    from peerkit import jsonwire

    with trio.fail_after(10):
        with pytest.raises(trio_websocket.ConnectionRejected) as info:
            async with trio_websocket.open_websocket_url(
                broker.url,
                subprotocols=[jsonwire.SUBPROTOCOL],
                extra_headers=[(b"Origin", b"https://evil.example")],
            ):
                pass  # pragma: no cover
        assert info.value.status_code == 403
        # a page served from this machine is welcome
        async with trio_websocket.open_websocket_url(
            broker.url,
            subprotocols=[jsonwire.SUBPROTOCOL],
            extra_headers=[(b"Origin", b"http://127.0.0.1:8000")],
        ) as ws:
            assert ws.subprotocol == jsonwire.SUBPROTOCOL


async def test_a_crowd_larger_than_the_handshake_cap_all_gets_in(nursery: trio.Nursery) -> None:
    """Peers turned away while the broker has max_handshakes connections in the handshake
    (too_many_handshakes) try again, within their connect_timeout: all get in."""
    with trio.fail_after(60):
        broker = Broker(max_handshakes=4)
        await nursery.start(broker.run)
        peers = [Peer(broker.url, f"p{i}") for i in range(60)]
        async with trio.open_nursery() as crowd:
            for p in peers:
                crowd.start_soon(p.run)
            await wait_for_condition(lambda: len(broker.peer_ids) == len(peers), 50)
            assert all(p.error is None for p in peers)
            for p in peers:
                await p.async_shutdown()
        await broker.shutdown()


async def test_a_stranger_cannot_end_the_broker_with_an_oversized_message_while_closing(
    nursery: trio.Nursery,
) -> None:
    """trio-websocket 0.12.2's reader task raises for a message over its limit that arrives
    while the connection closes; the broker runs each connection's tasks in a nursery of its
    own, so that ends the connection, not the broker."""
    with trio.fail_after(20):
        broker = Broker()
        await nursery.start(broker.run)
        async with trio_websocket.open_websocket_url(broker.url) as ws:
            await ws.send_message(b"\xc1")  # not a hello: rejected, closing
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                await ws.send_message(b"x" * (3 << 20))  # over the limit, during the close
        async with Peer(broker.url, "after") as peer:  # the broker is still there
            assert peer.is_connected
        await broker.shutdown()
