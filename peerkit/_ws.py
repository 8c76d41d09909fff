"""A lean WebSocket connection for trio, on the Sans-I/O layer of ``websockets`` (internal).

``websockets`` does the protocol (handshake, framing, masking in C, close and ping rules,
the message size limit); this module only moves its bytes: over TLS through the
:class:`trio.SSLStream`, over plain TCP straight through the socket (a write the kernel takes
at once does not yield; a read yields once).

Unlike trio-websocket it has no background reader task, no message channel and no send
lock: :meth:`WebSocket.get_message` reads and parses in the calling task, and
:meth:`WebSocket.send_message` writes at once. Each of those hand-offs is a trio scheduling
pass, and on a small VM a pass that follows an idle moment costs tens of microseconds of cold
execution; a message crossing the broker took six more of them than it needs.

Readers take turns through a flag and writers through a FIFO lock: normally one task reads
(the peer's or the broker's reader) and one writes; a task that finds the stream busy
(closing while the reader still runs, answering a ping during a send) waits its turn.

Everything the protocol generates (data frames, pongs, close frames) joins one outgoing
list in the order it was generated, and whoever writes next writes all of it. A write that
is cancelled, or that the kernel takes only in part, leaves the rest at the head of a
backlog: nothing generated is lost or reordered, and no frame is left half written.

**Data frames.** Nearly every frame peerkit exchanges is one whole binary message. Those
frames, and only while the connection is open, are framed and unframed here (a header of 2
to 14 bytes and the mask, with websockets' own C masking); every other frame (text,
fragments, pings, pongs, closes, anything malformed or over the size limit) goes to
websockets, whole and in stream order, and so does the handshake. Going through the
protocol object costs a small frame about 13 µs of cold CPU in each process on the way,
four times per query: a quarter of a query's round trip on the reference machine. The tests
check this path against websockets itself on generated streams (messages, close codes and
answers must be the same, however the stream is cut into reads).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, NamedTuple

import trio
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus, InvalidURI, ProtocolError
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from ._wsconf import RECEIVE_BUFFER

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a websockets built without its C extension
    from websockets.utils import apply_mask

__all__ = ["CloseReason", "ConnectionClosed", "ConnectionRejected", "HandshakeError", "WebSocket"]

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_BINARY, _TEXT, _CONT = Opcode.BINARY, Opcode.TEXT, Opcode.CONT
_OPEN, _CONNECTING = State.OPEN, State.CONNECTING


class _ProtocolLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The protocol's log, as ``peerkit.websocket``. Its per-connection INFO lines
    ("connection open", "connection closed") repeat what the broker and the peers log
    themselves, so they go out at DEBUG."""

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return msg, kwargs


_LOG = _ProtocolLog(logging.getLogger("peerkit.websocket"), None)


def _detach(stream: trio.SocketStream) -> socket.socket:
    """The stream's socket as a plain non-blocking socket (the stream is unusable after)."""
    ts = stream.socket
    sock = socket.socket(ts.family, ts.type, ts.proto, fileno=ts.detach())
    sock.setblocking(False)
    return sock


class CloseReason(NamedTuple):
    """Why a connection closed: the WebSocket close code and reason."""

    code: int
    reason: str


class ConnectionClosed(Exception):
    """The connection is closed (``reason`` says how)."""

    def __init__(self, reason: CloseReason) -> None:
        super().__init__(f"WebSocket closed (code {reason.code}: {reason.reason})")
        self.reason = reason


class HandshakeError(Exception):
    """The WebSocket opening handshake failed."""


class ConnectionRejected(HandshakeError):
    """The server answered the opening handshake with an HTTP error status."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"the server rejected the WebSocket handshake (HTTP {status_code})")
        self.status_code = status_code


class WebSocket:
    """One WebSocket connection over a trio stream (TCP or TLS)."""

    def __init__(self, stream: trio.abc.Stream, protocol: Protocol, close_timeout: float) -> None:
        self._stream = stream
        #: plain TCP: the socket itself, used without SocketStream's scheduling passes
        self._sock = _detach(stream) if isinstance(stream, trio.SocketStream) else None
        self._proto = protocol
        self._close_timeout = close_timeout
        self._messages: collections.deque[bytes | str] = collections.deque()
        self._parts: list[bytes | bytearray | memoryview] = []  # a message in progress
        self._text = False  # ... which is a text message
        self._closed: CloseReason | None = None
        self._eof = False
        self._server = isinstance(protocol, ServerProtocol)  # reads masked frames
        limit = protocol.max_message_size
        self._max = limit if limit is not None else 1 << 63
        self._head_fed = False  # the handshake's HTTP head went to the protocol object
        self._head_tail = b""  # the last bytes of the head given so far (up to 3)
        self._rbuf = bytearray()  # received bytes of an incomplete frame or header
        self._owed = 0  # bytes of the frame in progress that go to the protocol object
        self._given = bytearray()  # ... or the part of its header it has (length unknown)
        self._out: list[bytes] = []  # generated and not yet written, in order
        self._backlog = bytearray()  # the unwritten rest of an earlier write (goes first)
        self._end_wanted = False  # the protocol asked to end the stream (a server's close)
        #: a client's handshake answer as it arrives, for its status line
        self._answer_head: bytearray | None = None
        #: one writer at a time, in arrival order; a released lock passes straight to the
        #: next waiter, so nobody (send_nowait included) can overtake a frame that waits
        self._send_lock = trio.StrictFIFOLock()
        self._reading = False
        self._drained = False  # the last read left the socket empty
        self._read_done = trio.lowlevel.ParkingLot()
        self._handshake: Request | Response | None = None

    @property
    def closed(self) -> CloseReason | None:
        """Why the connection closed, or None while it is open."""
        return self._closed

    # ------------------------------------------------------------------ receiving
    async def get_message(self) -> bytes | str:
        """The next message; :class:`ConnectionClosed` once closed and drained."""
        while not self._messages:
            if self._closed is not None:
                raise ConnectionClosed(self._closed)
            await self._receive()
        return self._messages.popleft()

    async def _receive(self) -> None:
        """Read once, let the protocol parse, and send what it asks for.

        If another task is reading, wait for its read instead (its result serves both).
        """
        if self._reading:
            await self._read_done.park()
            return
        self._reading = True
        try:
            await self._receive_once()
        finally:
            self._reading = False
            if self._read_done:
                self._read_done.unpark_all()

    async def _receive_once(self) -> None:
        try:
            data = await self._read()
        except _STREAM_ERRORS as exc:
            self._lost(f"connection lost: {exc}")
            return
        if not data:
            self._lost("connection lost")
            return
        if self._answer_head is not None:
            self._answer_head += data[:1024]
        self._take_in(data)
        self._take_answers()
        # a pong, a close reply: written without a checkpoint when nothing else is being
        # written, so that a reader cancelled right now still answers
        if (
            self._out
            and self._sock is not None
            and not self._backlog
            and not (self._send_lock.locked())
        ):
            self._write_nowait()
        if self._out or self._backlog:
            await self._send()

    def _take_in(self, data: bytes | bytearray) -> None:
        """Take received bytes: whole binary frames here, the rest to the protocol."""
        buf = self._rbuf
        if buf:
            buf += data
            del buf[: self._split(buf)]
        else:
            used = self._split(data)
            if used < len(data):
                buf += memoryview(data)[used:]

    def _split(self, data: bytes | bytearray) -> int:
        """Handle the frames at the start of ``data``; returns how many bytes were used (the
        rest is an incomplete header, or an incomplete binary frame)."""
        proto = self._proto
        n = len(data)
        pos = 0
        while pos < n:
            given = self._given
            if given:  # the protocol object has the start of a header: give it the rest
                size = 4 if given[1] & 0x7F == 126 else 10
                take = min(size - len(given), n - pos)
                given += data[pos : pos + take]
                self._feed(data[pos : pos + take])
                pos += take
                if len(given) == size:  # now the frame's length is known
                    self._owed = int.from_bytes(given[2:], "big") + (4 if given[1] & 0x80 else 0)
                    given.clear()
                continue
            if self._owed:  # a frame, or part of one, for the protocol object
                give = min(self._owed, n - pos)
                self._feed(data[pos : pos + give])
                self._owed -= give
                pos += give
                continue
            state = proto.state
            if state is not _OPEN:
                if state is not _CONNECTING:  # closing: the protocol discards the rest
                    self._feed(data[pos:])
                    return n
                if self._head_fed:  # frames sent before the handshake ended wait for it
                    return pos  # (at most one read: nothing is read until it ends)
                # the handshake's HTTP head goes to the protocol as it comes (it limits the
                # head's size); it ends at the first blank line, perhaps cut across reads
                tail = self._head_tail
                end = (tail + data[pos:]).find(b"\r\n\r\n")
                if end < 0:
                    self._head_tail = (tail + data[max(pos, n - 3) :])[-3:]
                    self._feed(data[pos:])
                    return n
                self._owed = end + 4 - len(tail)
                self._head_fed = True
                continue
            # an open connection: a frame header (RFC 6455, 5.2)
            if n - pos < 2:
                return pos
            first, second = data[pos], data[pos + 1]
            masked = second & 0x80
            ours = (
                first == 0x82  # FIN, no reserved bits, binary
                and (masked != 0) is self._server
                and not self._parts  # not inside a fragmented message
            )
            length = second & 0x7F
            head = 2
            if length >= 126:
                head = 4 if length == 126 else 10
                if n - pos < head:
                    if ours:
                        return pos  # wait for the length
                    # the protocol object may refuse this frame from its first two bytes
                    self._given += data[pos:]
                    self._feed(data[pos:])
                    return n
                length = int.from_bytes(data[pos + 2 : pos + head], "big")
            if masked:
                head += 4
            if ours and length <= self._max:
                start = pos + head
                end = start + length
                if end > n:
                    return pos  # wait for the whole frame (at most the size limit)
                if type(data) is bytes:  # a read's bytes: slicing copies once
                    body: bytes | memoryview = data[start:end]
                else:  # the buffer of a frame that took several reads: copy it once
                    body = memoryview(data)[start:end]  # (released before it shrinks)
                self._messages.append(
                    apply_mask(body, data[start - 4 : start]) if masked else bytes(body)
                )
                pos = end
            else:
                self._owed = head + length  # anything else: the protocol object's
        return pos

    def _feed(self, chunk: bytes | bytearray) -> None:
        proto = self._proto
        proto.receive_data(chunk)  # never raises: a bad frame makes the protocol fail
        self._process_events(proto.events_received())

    def _process_events(self, events: list[Request | Response | Frame]) -> None:
        for event in events:
            if type(event) is Frame:
                op = event.opcode
                if op is _BINARY or op is _TEXT:
                    self._parts = [event.data]
                    self._text = op is _TEXT
                elif op is _CONT:
                    self._parts.append(event.data)
                else:
                    continue  # ping, pong, close: the protocol answers them itself
                if event.fin and not self._finish_message():
                    return
            else:
                self._handshake = event  # type: ignore[assignment]

    def _finish_message(self) -> bool:
        """Queue the message whose last frame came; False if it failed the connection."""
        parts, self._parts = self._parts, []
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if not self._text:
            self._messages.append(data if type(data) is bytes else bytes(data))
            return True
        try:
            self._messages.append(str(data, "utf-8"))
        except UnicodeDecodeError:
            self._fail(1007, "a text message is not valid UTF-8")
            return False
        return True

    def _take_answers(self) -> None:
        """Collect what the protocol wrote while receiving, and note a close."""
        proto = self._proto
        self._generated()
        if self._closed is None and proto.state is not _OPEN:
            if proto.state is _CONNECTING:
                if proto.handshake_exc is not None and self._handshake is None:
                    self._closed = CloseReason(1002, f"bad handshake: {proto.handshake_exc}")
                return
            # when we failed the connection, our close says why, whatever came before it
            close = (
                proto.close_sent
                if proto.parser_exc is not None
                else proto.close_rcvd or proto.close_sent
            )
            self._closed = (
                CloseReason(close.code, close.reason)
                if close is not None
                else CloseReason(1006, "connection lost")
            )

    def _fail(self, code: int, reason: str) -> None:
        if self._closed is None:
            self._closed = CloseReason(code, reason)
        self._proto.fail(code, reason)
        self._generated()

    def _lost(self, reason: str) -> None:
        self._eof = True
        if self._closed is None:
            self._closed = CloseReason(1006, reason)

    # -------------------------------------------------------------------- sending
    def _generated(self) -> None:
        """Move what the protocol generated to the outgoing list (an empty item asks to
        end the stream)."""
        for chunk in self._proto.data_to_send():
            if chunk:
                self._out.append(chunk)
            else:
                self._end_wanted = True

    def _frame(self, data: bytes) -> None:
        """Generate ``data`` as one binary frame (ConnectionClosed once closed)."""
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        if self._proto.state is not _OPEN:  # closing: no more data frames
            raise ConnectionClosed(CloseReason(1006, "closing"))
        n = len(data)
        if self._server:  # RFC 6455, 5.2: FIN and binary, then the length
            if n < 126:
                head = bytes((0x82, n))
            elif n < 65536:
                head = b"\x82\x7e" + n.to_bytes(2, "big")
            else:
                head = b"\x82\x7f" + n.to_bytes(8, "big")
            self._out.append(head + data)
            return
        if n < 126:  # a client masks: the mask bit, and a fresh key for every frame
            head = bytes((0x82, 0x80 | n))
        elif n < 65536:
            head = b"\x82\xfe" + n.to_bytes(2, "big")
        else:
            head = b"\x82\xff" + n.to_bytes(8, "big")
        key = os.urandom(4)
        self._out.append(head + key + apply_mask(data, key))

    async def send_message(self, data: bytes) -> None:
        """Send one binary message (written to the stream before this returns, unless
        cancelled: then it goes out first with the next write)."""
        self._frame(data)
        await self._send()

    @property
    def reads_survive_cancellation(self) -> bool:
        """Whether a cancelled :meth:`get_message` leaves the connection as it was (plain
        TCP; a TLS stream may be left broken by a cancelled read)."""
        return self._sock is not None

    def can_send_now(self) -> bool:
        """Whether :meth:`send_nowait` may be used: plain TCP, open, nothing being written."""
        return (
            self._sock is not None
            and not self._send_lock.locked()
            and not self._backlog
            and self._closed is None
        )

    def send_nowait(self, data: bytes) -> None:
        """Write one message without waiting (check :meth:`can_send_now` first).

        What the kernel does not take at once stays in a backlog that the next send, or
        :meth:`flush`, writes first.
        """
        assert self._sock is not None and not self._send_lock.locked() and not self._backlog
        self._frame(data)
        self._write_nowait()

    def _write_nowait(self) -> None:
        """Give the kernel what it takes of the outgoing list at once (plain TCP, nothing
        being written, no backlog); the rest becomes the backlog."""
        assert self._sock is not None
        data = self._take_out()
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(f"connection lost: {exc}")
            return
        if sent < len(data):
            self._backlog += memoryview(data)[sent:]

    @property
    def backlog(self) -> bool:
        """Bytes of an earlier :meth:`send_nowait` are still waiting to be written."""
        return bool(self._backlog)

    async def flush(self) -> None:
        """Write the backlog (and any protocol answers waiting)."""
        await self._send()

    def _take_out(self) -> bytes:
        """The backlog, then everything generated since, as one block to write."""
        out = self._out
        if len(out) == 1 and not self._backlog:
            return out.pop()
        data = b"".join(out)
        out.clear()
        if self._backlog:
            data = bytes(self._backlog) + data
            self._backlog.clear()
        return data

    async def _send(self) -> None:
        """Write the backlog and everything generated so far."""
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # the common case: no scheduling pass
        except trio.WouldBlock:  # another task is writing: wait for it, in order
            await lock.acquire()
        try:
            if self._out or self._backlog:
                await self._write(self._take_out())
        except _STREAM_ERRORS as exc:
            self._lost(f"connection lost: {exc}")
            raise ConnectionClosed(self._closed or CloseReason(1006, "lost")) from None
        finally:
            lock.release()

    # -------------------------------------------------------------------- closing
    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close: send a close frame, wait (bounded) for the other side's, close the stream."""
        proto = self._proto
        try:
            with trio.move_on_after(self._close_timeout):
                if proto.state is _OPEN:
                    if self._closed is None:
                        self._closed = CloseReason(code, reason or "")
                    # a control frame holds 125 bytes: 2 for the code, the rest for a reason
                    short = (reason or "").encode()[:120].decode(errors="ignore")
                    with contextlib.suppress(ProtocolError):  # a code no one may send
                        proto.send_close(code, short)
                    self._generated()
                await self._send()
                # wait for the other side's close frame, unless the protocol says the
                # stream ends now (a server that failed the connection, or got the answer)
                waiting = proto.state is not _CONNECTING and proto.close_sent is not None
                while waiting and proto.close_rcvd is None and not (self._eof or self._end_wanted):
                    await self._receive()
        except ConnectionClosed:
            pass
        finally:
            if self._closed is None:
                self._closed = CloseReason(code, reason or "")
            await self.abort()

    # ----------------------------------------------------------------- the stream
    async def _read(self) -> bytes | bytearray:
        sock = self._sock
        if sock is None:
            return await self._stream.receive_some(RECEIVE_BUFFER)
        await trio.lowlevel.checkpoint_if_cancelled()
        # after a read that did not fill the buffer the socket is most likely drained: wait
        # first rather than pay for a recv that fails
        waited = self._drained
        if waited:
            await trio.lowlevel.wait_readable(sock)  # cancelled here: nothing was read
        while True:
            try:
                data = sock.recv(RECEIVE_BUFFER)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                waited = True
        self._drained = len(data) < RECEIVE_BUFFER
        if not waited:  # data was already there: still let the others run (not cancellable
            await trio.lowlevel.cancel_shielded_checkpoint()  # now: the data is taken)
        return data

    async def _write(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            try:
                await self._stream.send_all(data)
            except trio.Cancelled:  # the stream may hold part of a frame: it is done for
                self._lost("a write was cancelled halfway")
                raise
            return
        with memoryview(data) as view:
            sent = 0
            try:
                await trio.lowlevel.checkpoint_if_cancelled()
                while sent < len(view):
                    try:
                        sent += sock.send(view[sent:])
                    except BlockingIOError:  # the kernel's buffer is full: wait for room
                        await trio.lowlevel.wait_writable(sock)
            except trio.Cancelled:  # nothing lost, never half a frame on the wire: the
                self._backlog[0:0] = view[sent:]  # rest goes out first next time
                raise

    async def abort(self) -> None:
        """Close the connection at once, without a close handshake."""
        if self._closed is None:
            self._closed = CloseReason(1006, "aborted")
        self._eof = True
        sock = self._sock
        if sock is None:
            await trio.aclose_forcefully(self._stream)
        elif sock.fileno() != -1:
            trio.lowlevel.notify_closing(sock)
            sock.close()
            await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------------ handshakes
    async def _handshake_event(self) -> Request | Response:
        while self._handshake is None:
            if self._answer_head is not None:
                status = _refusal(self._answer_head)
                if status is not None:
                    raise ConnectionRejected(status)
            if self._closed is not None:
                raise HandshakeError(f"connection closed during the handshake: {self._closed}")
            await self._receive()
        return self._handshake


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})[ \r]")


def _refusal(head: bytearray) -> int | None:
    """The status of a server's handshake answer that is not 101, from its first line.

    A refusal is known from its status line: there is no need to wait for its body (which a
    server may send without a length, leaving the connection open) or to accept only what
    the protocol library parses (it wants HTTP/1.1).
    """
    match = _STATUS_LINE.match(head)
    if match is None:
        return None
    status = int(match.group(1))
    return None if status == 101 else status


async def connect(
    stream: trio.abc.Stream, host: str, resource: str, max_message_size: int, close_timeout: float
) -> WebSocket:
    """The client side of the opening handshake over ``stream`` (``host`` as in a URL)."""
    scheme = "wss" if isinstance(stream, trio.SSLStream) else "ws"
    try:
        uri = parse_uri(f"{scheme}://{host}{resource}")
    except InvalidURI as exc:
        await trio.aclose_forcefully(stream)
        raise HandshakeError(f"not a usable WebSocket address: {exc}") from None
    proto = ClientProtocol(uri, max_size=max_message_size, logger=_LOG)
    ws = WebSocket(stream, proto, close_timeout)
    ws._answer_head = bytearray()
    try:
        proto.send_request(proto.connect())
        ws._generated()
        await ws._send()
        answer = await ws._handshake_event()
    except ConnectionClosed as exc:
        await ws.abort()
        raise HandshakeError(f"connection lost during the handshake: {exc}") from None
    except BaseException:
        await ws.abort()
        raise
    ws._answer_head = None
    failure = proto.handshake_exc
    if failure is not None:
        await ws.abort()
        if isinstance(failure, InvalidStatus):
            raise ConnectionRejected(failure.response.status_code)
        raise HandshakeError(f"the server's handshake answer is not usable: {failure}")
    assert isinstance(answer, Response)
    return ws


async def serve(
    handler: Callable[[WebSocket], Awaitable[object]],
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    max_message_size: int,
    handshake_timeout: float,
    close_timeout: float,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept WebSocket connections and run ``handler(ws)`` for each; reports the port."""
    tcp = await trio.open_tcp_listeners(port, host=host)
    bound: int = tcp[0].socket.getsockname()[1]
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = (
        [trio.SSLListener(t, ssl_context, https_compatible=True) for t in tcp]
        if ssl_context is not None
        else list(tcp)
    )

    async def one(stream: trio.abc.Stream) -> None:
        proto = ServerProtocol(max_size=max_message_size, logger=_LOG)
        ws = WebSocket(stream, proto, close_timeout)
        accepted = False
        try:
            with trio.move_on_after(handshake_timeout):
                request = await ws._handshake_event()
                assert isinstance(request, Request)
                response = proto.accept(request)  # or a 4xx answer to a bad request
                proto.send_response(response)
                ws._generated()
                await ws._send()
                accepted = response.status_code == 101
                if accepted and ws._rbuf:  # frames a client sent before our answer
                    ws._take_in(b"")
                    ws._take_answers()
                    await ws._send()
        except (HandshakeError, ConnectionClosed, *_STREAM_ERRORS):
            accepted = False
        try:
            if accepted:  # (the handler also takes what came before a close)
                await handler(ws)
        finally:
            with trio.CancelScope(shield=True):
                await ws.abort()  # a no-op once the handler closed it

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, one, listeners)
        task_status.started(bound)
