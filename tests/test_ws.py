"""peerkit's WebSocket connection against trio-websocket, in both roles."""

from __future__ import annotations

import contextlib
import functools
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
from peerkit.testing import wait_for_condition


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
    for frames trio-websocket never sends (fragments, bad UTF-8). Like RFC 6455 asks of a
    client, it answers a close and then waits for the server to end the TCP connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.proto = ClientProtocol(parse_uri("ws://127.0.0.1/"), max_size=None)
        self.frames: list[Frame] = []

    @classmethod
    async def open(cls, port: int) -> RawClient:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        client.proto.send_request(client.proto.connect())
        await client.flush()
        while client.proto.state is not State.OPEN:
            await client.feed()
        return client

    async def flush(self) -> None:
        data = b"".join(self.proto.data_to_send())
        if data:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.send_all(data)

    async def feed(self) -> bool:
        """Read once and answer what the protocol asks for; False once the stream ended."""
        data = await self.stream.receive_some(65536)
        if data:
            self.proto.receive_data(data)
        else:
            self.proto.receive_eof()
        self.frames += [e for e in self.proto.events_received() if isinstance(e, Frame)]
        await self.flush()
        return bool(data)

    async def next_data(self) -> bytes:
        while True:
            while self.frames:
                frame = self.frames.pop(0)
                if frame.opcode in (Opcode.BINARY, Opcode.TEXT):
                    return bytes(frame.data)
            assert await self.feed(), "the connection ended"

    async def close_code(self) -> int:
        while self.proto.close_rcvd is None:
            assert await self.feed(), "the connection ended without a close frame"
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


async def closing_server(nursery: trio.Nursery, closed_after: list[float]) -> int:
    """A server that reads until the connection closes, then closes its side as the broker
    does (``aclose``), noting how long that took."""

    async def handler(ws: _ws.WebSocket) -> None:
        with contextlib.suppress(_ws.ConnectionClosed):
            while True:
                await ws.get_message()
        start = trio.current_time()
        await ws.aclose()
        closed_after.append(trio.current_time() - start)

    port: int = await nursery.start(_ws.serve, handler, "127.0.0.1", 0, None, 1000, 5.0, 3.0)
    return port


@pytest.mark.parametrize("bad", ["unmasked", "too_big", "bad_utf8"])
async def test_a_failed_connection_ends_the_tcp_connection_at_once(
    nursery: trio.Nursery, bad: str
) -> None:
    """After failing a connection the server closes TCP at once, rather than wait (its
    close timeout) for a close reply that the protocol would discard anyway."""
    with trio.fail_after(15):
        closed_after: list[float] = []
        client = await RawClient.open(await closing_server(nursery, closed_after))
        if bad == "unmasked":
            await client.stream.send_all(b"\x82\x05hello")
        elif bad == "bad_utf8":
            client.proto.send_text(b"caf\xc3")
        else:
            client.proto.send_binary(b"x" * 2000)
        await client.flush()
        start = trio.current_time()
        while await client.feed():  # reads the close frame, answers it, waits for the end
            pass
        assert client.proto.close_rcvd is not None
        assert client.proto.close_rcvd.code == {"unmasked": 1002, "too_big": 1009}.get(bad, 1007)
        assert trio.current_time() - start < 1.0  # the close timeout is 3 s
        await wait_for_condition(lambda: bool(closed_after))
        assert closed_after[0] < 1.0


async def test_a_close_in_the_middle_of_a_message_is_reported_as_our_1002(
    nursery: trio.Nursery,
) -> None:
    seen: list[_ws.CloseReason] = []

    async def handler(ws: _ws.WebSocket) -> None:
        try:
            while True:
                await ws.get_message()
        except _ws.ConnectionClosed as exc:
            seen.append(exc.reason)

    with trio.fail_after(10):
        port = await nursery.start(_ws.serve, handler, "127.0.0.1", 0, None, 1 << 20, 5.0, 1.0)
        client = await RawClient.open(port)
        client.proto.send_binary(b"ab", fin=False)
        client.proto.send_close(1000, "bye")  # the message was not finished
        await client.flush()
        assert await client.close_code() == 1002
        await wait_for_condition(lambda: bool(seen))
        assert seen[0].code == 1002  # what we sent, not the other side's 1000


async def test_a_cancelled_flush_keeps_the_backlog(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        client, server = await ws_pair(nursery)
        client.send_nowait(BIG)  # the server does not read: most of it stays in the backlog
        assert client.backlog
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.flush()  # cancelled before it wrote a byte
        assert client.backlog  # the tail of a frame half on the wire was not dropped
        nursery.start_soon(client.send_message, b"after")
        assert len(await server.get_message()) == len(BIG)
        assert await server.get_message() == b"after"


async def test_a_kick_after_a_cancelled_flush_still_closes_with_1008(
    nursery: trio.Nursery,
) -> None:
    """The broker's path: an inline send leaves a backlog, the writer's flush waits for room
    and is cancelled by the kick, then the connection is closed with 1008."""
    with trio.fail_after(20):
        client, server = await ws_pair(nursery)
        server.send_nowait(BIG)  # the client does not read
        for _ in range(3):  # the first may still fit some bytes in; then nothing fits
            with trio.move_on_after(0.2):
                await server.flush()
        nursery.start_soon(server.aclose, 1008, "kicked")
        with pytest.raises(_ws.ConnectionClosed) as info:
            while True:
                await client.get_message()
        assert info.value.reason == _ws.CloseReason(1008, "kicked")


async def test_a_reader_cancelled_as_a_close_frame_arrives_still_answers_it(
    nursery: trio.Nursery,
) -> None:
    """A peer's reader is cancelled whenever a query takes the reading over; if the close
    frame is already there, the reader still reads it and its answer must go out (a race:
    tried many times)."""
    unanswered = 0
    with trio.fail_after(60):
        for _ in range(30):
            client, server = await ws_pair(nursery)
            scope = trio.CancelScope()
            done = trio.Event()

            async def reader(ws: _ws.WebSocket, scope: trio.CancelScope, done: trio.Event) -> None:
                with scope, contextlib.suppress(_ws.ConnectionClosed):
                    await ws.get_message()
                done.set()

            nursery.start_soon(reader, client, scope, done)
            await trio.testing.wait_all_tasks_blocked()
            server._c.proto.send_close(1000, "bye")
            server._c.generated()
            server._write_nowait()
            await trio.lowlevel.cancel_shielded_checkpoint()  # the reader may read it now
            scope.cancel()  # as a query taking the reading over does
            await done.wait()
            with trio.move_on_after(0.5):
                while server._c.proto.close_rcvd is None and not server._eof:
                    await server._receive()
            unanswered += server._c.proto.close_rcvd is None
            await client.abort()
            await server.abort()
    assert unanswered == 0


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nno!\r\n0\r\n\r\n",
        b"HTTP/1.0 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 403 Forbidden\r\n\r\n",  # no length, and the connection stays open
    ],
    ids=["chunked", "http10", "no_length_kept_open"],
)
async def test_every_refusal_is_connection_rejected(nursery: trio.Nursery, answer: bytes) -> None:
    async def server(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(4096)
        await stream.send_all(answer)
        await trio.sleep(5)

    with trio.fail_after(2):
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, server, 0, host="127.0.0.1")
        )
        stream = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
        with pytest.raises(_ws.ConnectionRejected) as info:
            await _ws.connect(stream, "127.0.0.1", "/", 1 << 20, 1.0)
        assert info.value.status_code == 403


async def test_frames_sent_right_behind_the_handshake_are_not_lost(nursery: trio.Nursery) -> None:
    """A client that does not wait for the server's answer (RFC 6455 says it should) and
    sends its first message in the same packet as its handshake."""
    with trio.fail_after(10):
        port = await echo_server(nursery)
        client = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
        client.proto.send_request(client.proto.connect())
        early = Frame(Opcode.BINARY, b"early").serialize(mask=True, extensions=[])
        await client.stream.send_all(b"".join(client.proto.data_to_send()) + early)
        while client.proto.state is not State.OPEN:
            await client.feed()
        assert await client.next_data() == b"early"


@pytest.mark.parametrize("behind", ["ping", "message then close"])
async def test_what_is_pipelined_behind_the_handshake_is_answered(
    nursery: trio.Nursery, behind: str
) -> None:
    with trio.fail_after(10):
        seen: list[bytes | str] = []

        async def handler(ws: _ws.WebSocket) -> None:
            with contextlib.suppress(_ws.ConnectionClosed):
                while True:
                    seen.append(await ws.get_message())

        port = await nursery.start(_ws.serve, handler, "127.0.0.1", 0, None, 1 << 20, 5.0, 1.0)
        client = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
        client.proto.send_request(client.proto.connect())
        if behind == "ping":
            extra = Frame(Opcode.PING, b"there?").serialize(mask=True, extensions=[])
        else:
            extra = Frame(Opcode.BINARY, b"early").serialize(mask=True, extensions=[])
            extra += Frame(Opcode.CLOSE, b"\x03\xe8bye").serialize(mask=True, extensions=[])
        await client.stream.send_all(b"".join(client.proto.data_to_send()) + extra)
        if behind == "ping":
            while not any(f.opcode == Opcode.PONG for f in client.frames):
                assert await client.feed()
        else:
            assert await client.close_code() == 1000
            await wait_for_condition(lambda: seen == [b"early"])
