"""peerkit's WebSocket connection against trio-websocket, in both roles."""

from __future__ import annotations

import pytest
import trio
import trio_websocket

from peerkit import _ws


async def echo_server(nursery: trio.Nursery, max_message_size: int = 1 << 20) -> int:
    """A peerkit-side server echoing binary messages; returns its port."""

    async def handler(ws: _ws.WebSocket) -> None:
        try:
            while True:
                msg = await ws.get_message()
                if msg == b"close please":
                    await ws.aclose(code=4000, reason="as you wish")
                    return
                await ws.send_message(msg if isinstance(msg, bytes) else msg.encode())
        except _ws.ConnectionClosed:
            pass

    port: int = await nursery.start(
        _ws.serve, handler, "127.0.0.1", 0, None, max_message_size, 5.0, 5.0
    )
    return port


async def test_trio_websocket_client_talks_to_our_server(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        port = await echo_server(nursery)
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/x") as ws:
            for size in (0, 1, 125, 126, 65535, 65536, 300_000):
                await ws.send_message(b"b" * size)
                assert await ws.get_message() == b"b" * size
            await ws.send_message("text too")  # a text frame arrives as str
            assert await ws.get_message() == b"text too"
            await ws.ping(b"are you there")  # returns once the pong came back
            await ws.send_message(b"close please")
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await ws.get_message()
            assert info.value.reason.code == 4000
            assert info.value.reason.reason == "as you wish"


async def test_message_over_the_limit_closes_with_1009(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        port = await echo_server(nursery, max_message_size=1000)
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
            await ws.send_message(b"x" * 1000)
            assert await ws.get_message() == b"x" * 1000
            await ws.send_message(b"x" * 1001)
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await ws.get_message()
            assert info.value.reason.code == 1009


async def test_plain_http_gets_no_websocket(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        port = await echo_server(nursery)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := await stream.receive_some(4096):
            answer += chunk
        assert not answer.startswith(b"HTTP/1.1 101")  # refused, then closed
        await stream.aclose()


async def test_our_client_talks_to_a_trio_websocket_server(nursery: trio.Nursery) -> None:
    closed: list[trio_websocket.CloseReason] = []
    done = trio.Event()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except trio_websocket.ConnectionClosed as exc:
            closed.append(exc.reason)
            done.set()

    with trio.fail_after(10):
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        ws = await _ws.connect(stream, f"127.0.0.1:{server.port}", "/", 1 << 20, 5.0)
        for size in (0, 5, 70_000):
            await ws.send_message(b"y" * size)
            assert await ws.get_message() == b"y" * size
        await ws.aclose(code=1000, reason="done")
        assert ws.closed == _ws.CloseReason(1000, "done")
        await done.wait()
        assert closed[0].code == 1000 and closed[0].reason == "done"


async def test_rejected_handshake_names_the_status(nursery: trio.Nursery) -> None:
    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        await request.reject(403)

    with trio.fail_after(10):
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        with pytest.raises(_ws.ConnectionRejected) as info:
            await _ws.connect(stream, "x", "/", 1 << 20, 5.0)
        assert info.value.status_code == 403
