"""peerkit's WebSocket connection against trio-websocket, in both roles."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio_websocket
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

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


async def ws_pair(nursery: trio.Nursery) -> tuple[_ws.WebSocket, _ws.WebSocket]:
    """A (client, server) pair of peerkit WebSockets over loopback TCP."""
    accepted: list[_ws.WebSocket] = []
    got = trio.Event()

    async def handler(ws: _ws.WebSocket) -> None:
        accepted.append(ws)
        got.set()
        await trio.sleep_forever()

    port = await nursery.start(_ws.serve, handler, "127.0.0.1", 0, None, 64 << 20, 5.0, 2.0)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = await _ws.connect(stream, "127.0.0.1", "/", 64 << 20, 2.0)
    await got.wait()
    return client, accepted[0]


BIG = b"x" * (32 << 20)  # more than loopback socket buffers hold


async def test_a_cancelled_read_loses_nothing(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        client, server = await ws_pair(nursery)
        await client.send_message(b"one")
        await trio.sleep(0.2)  # the bytes wait in the server's socket
        with trio.CancelScope() as scope:
            scope.cancel()
            await server.get_message()
        assert scope.cancelled_caught
        assert await server.get_message() == b"one"


async def test_a_write_cancelled_mid_frame_still_ends_the_frame(nursery: trio.Nursery) -> None:
    """The broker's kick: its writer is cancelled mid-frame, then it closes with 1008."""
    with trio.fail_after(10):
        client, server = await ws_pair(nursery)
        with trio.move_on_after(0.5) as scope:
            await server.send_message(BIG)  # the client does not read: stuck mid-frame
        assert scope.cancelled_caught
        nursery.start_soon(server.aclose, 1008, "kicked")
        with pytest.raises(_ws.ConnectionClosed) as info:
            while True:
                await client.get_message()
        assert info.value.reason == _ws.CloseReason(1008, "kicked")


async def test_nothing_overtakes_a_send_that_waits_its_turn(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        client, server = await ws_pair(nursery)
        seen: list[bool] = []

        async def first() -> None:  # like the broker's reader answering a ping
            await server.send_message(BIG)  # blocks: the client is not reading
            seen.append(server.can_send_now())  # at once, before the waiting send ran

        nursery.start_soon(first)
        await trio.sleep(0.3)
        nursery.start_soon(server.send_message, b"second")  # waits its turn, frame built
        await trio.sleep(0.3)
        got = [await client.get_message() for _ in range(2)]
        assert len(got[0]) == len(BIG) and got[1] == b"second"
        assert seen == [False]  # the turn went to the waiting send: nothing could overtake


async def test_a_reset_during_the_handshake_is_a_handshake_error() -> None:
    with trio.fail_after(10):
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        stream = await trio.open_tcp_stream("127.0.0.1", listener.getsockname()[1])
        conn, _ = await listener.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # the server resets the connection
        await trio.sleep(0.1)
        with pytest.raises((_ws.HandshakeError, OSError, trio.BrokenResourceError)):
            await _ws.connect(stream, "127.0.0.1", "/", 1 << 20, 1.0)
        listener.close()


class RawClient:
    """A client that writes frames as given (websockets' Sans-I/O protocol over a stream),
    for frames trio-websocket never sends: fragments, bad UTF-8."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.proto = ClientProtocol(parse_uri("ws://127.0.0.1/"), max_size=None)

    @classmethod
    async def open(cls, port: int) -> RawClient:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        client.proto.send_request(client.proto.connect())
        await client.flush()
        while client.proto.state is not State.OPEN:
            await client.feed()
        return client

    async def flush(self) -> None:
        await self.stream.send_all(b"".join(self.proto.data_to_send()))

    async def feed(self) -> list[Frame]:
        data = await self.stream.receive_some(65536)
        if data:
            self.proto.receive_data(data)
        else:
            self.proto.receive_eof()
        return [e for e in self.proto.events_received() if isinstance(e, Frame)]

    async def next_data(self) -> bytes:
        while True:
            for frame in await self.feed():
                if frame.opcode in (Opcode.BINARY, Opcode.TEXT):
                    return bytes(frame.data)

    async def close_code(self) -> int | None:
        while self.proto.close_rcvd is None:
            await self.feed()
        return self.proto.close_rcvd.code


async def test_fragments_are_joined_into_one_message(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        client = await RawClient.open(await echo_server(nursery))
        client.proto.send_binary(b"ab", fin=False)
        client.proto.send_ping(b"in between")  # a control frame may come between fragments
        client.proto.send_continuation(b"cd", fin=False)
        client.proto.send_continuation(b"ef", fin=True)
        await client.flush()
        assert await client.next_data() == b"abcdef"


async def test_fragments_over_the_limit_close_with_1009(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        client = await RawClient.open(await echo_server(nursery, max_message_size=1000))
        client.proto.send_binary(b"x" * 600, fin=False)
        client.proto.send_continuation(b"x" * 600, fin=True)  # each fits, the sum does not
        await client.flush()
        assert await client.close_code() == 1009


async def test_text_that_is_not_utf8_closes_with_1007(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        client = await RawClient.open(await echo_server(nursery))
        client.proto.send_text(b"caf\xc3")  # cut in the middle of a character
        await client.flush()
        assert await client.close_code() == 1007


async def test_a_frame_that_breaks_the_protocol_closes_with_1002(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        client = await RawClient.open(await echo_server(nursery))
        await client.stream.send_all(b"\x82\x05hello")  # a client frame must be masked
        assert await client.close_code() == 1002
