"""A lean WebSocket connection for trio, on wsproto (internal).

wsproto does the protocol (handshake, framing, masking, close and ping rules); this module
only moves its bytes: over TLS through the :class:`trio.SSLStream`, over plain TCP straight
through the socket (a write the kernel takes at once does not yield; a read yields once).

Unlike trio-websocket it has no background reader task, no message channel and no send
lock: :meth:`WebSocket.get_message` reads and parses in the calling task, and
:meth:`WebSocket.send_message` writes at once. Each of those hand-offs is a trio scheduling
pass, and on a small VM a pass that follows an idle moment costs tens of microseconds of cold
execution; a message crossing the broker took six more of them than it needs.

Readers take turns through a flag and writers through a FIFO lock: normally one task reads
(the peer's or the broker's reader) and one writes; a task that finds the stream busy
(closing while the reader still runs, answering a ping during a send) waits its turn.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import ProtocolError

from ._wsconf import RECEIVE_BUFFER

__all__ = ["CloseReason", "ConnectionClosed", "ConnectionRejected", "HandshakeError", "WebSocket"]

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


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

    def __init__(
        self,
        stream: trio.abc.Stream,
        kind: ConnectionType,
        max_message_size: int,
        close_timeout: float,
    ) -> None:
        self._stream = stream
        #: plain TCP: the socket itself, used without SocketStream's scheduling passes
        self._sock = _detach(stream) if isinstance(stream, trio.SocketStream) else None
        self._conn = WSConnection(kind)
        self._max = max_message_size
        self._close_timeout = close_timeout
        self._messages: collections.deque[bytes | str] = collections.deque()
        self._parts: list[Any] = []  # the pieces of a message in progress
        self._size = 0
        self._closed: CloseReason | None = None
        self._eof = False
        self._control: list[bytes] = []  # pongs and close frames waiting to be sent
        self._backlog = bytearray()  # the part of a send_nowait the kernel did not take
        #: one writer at a time, in arrival order; a released lock passes straight to the
        #: next waiter, so nobody (send_nowait included) can overtake a frame that waits
        self._send_lock = trio.StrictFIFOLock()
        self._reading = False
        self._read_done = trio.lowlevel.ParkingLot()
        self._handshake: Event | None = None

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
        """Read once, let wsproto parse, and send what the protocol asks for.

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
        try:
            self._conn.receive_data(data if type(data) is bytes else bytes(data))
            self._process_events()
        except ProtocolError as exc:
            hint = getattr(exc, "event_hint", None)
            if self._conn.state == ConnectionState.CONNECTING and isinstance(
                hint, RejectConnection
            ):
                self._queue_control(hint)  # an HTTP error answer to a bad handshake
            self._close_locally(1002, f"protocol error: {exc}")
        if self._control:
            await self._send(b"")

    def _process_events(self) -> None:
        for event in self._conn.events():
            if isinstance(event, BytesMessage | TextMessage):
                self._size += len(event.data)
                if self._size > self._max:
                    self._close_locally(1009, f"message over {self._max} bytes")
                    return
                self._parts.append(event.data)
                if event.message_finished:
                    parts, self._parts, self._size = self._parts, [], 0
                    if isinstance(event, TextMessage):
                        self._messages.append("".join(parts))
                    elif len(parts) == 1 and type(parts[0]) is bytes:
                        self._messages.append(parts[0])
                    else:
                        self._messages.append(b"".join(parts))
            elif isinstance(event, Ping):
                self._queue_control(event.response())
            elif isinstance(event, CloseConnection):
                if self._conn.state == ConnectionState.REMOTE_CLOSING:  # the other side's
                    if self._closed is None:
                        self._closed = CloseReason(event.code, event.reason or "")
                    self._queue_control(event.response())
                else:  # wsproto found a bad frame and reports it this way
                    self._close_locally(event.code, event.reason or "")
            elif isinstance(event, Request | AcceptConnection | RejectConnection):
                self._handshake = event

    def _queue_control(self, event: Event) -> None:
        with contextlib.suppress(ProtocolError):  # when the state no longer allows it
            self._control.append(self._conn.send(event))

    def _close_locally(self, code: int, reason: str) -> None:
        if self._closed is None:
            self._closed = CloseReason(code, reason)
        if self._conn.state == ConnectionState.OPEN:
            self._queue_control(CloseConnection(code=code, reason=reason[:120]))

    def _lost(self, reason: str) -> None:
        self._eof = True
        if self._closed is None:
            self._closed = CloseReason(1006, reason)

    # -------------------------------------------------------------------- sending
    async def send_message(self, data: bytes) -> None:
        """Send one binary message (written to the stream before this returns)."""
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        await self._send(self._conn.send(BytesMessage(data=data)))

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
        frame = self._with_waiting(self._conn.send(BytesMessage(data=data)))
        try:
            sent = self._sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(f"connection lost: {exc}")
            return
        if sent < len(frame):
            self._backlog += memoryview(frame)[sent:]

    @property
    def backlog(self) -> bool:
        """Bytes of an earlier :meth:`send_nowait` are still waiting to be written."""
        return bool(self._backlog)

    async def flush(self) -> None:
        """Write the backlog (and any protocol answers waiting)."""
        await self._send(b"")

    def _with_waiting(self, data: bytes) -> bytes:
        """``data`` behind what was generated before it and waits: the backlog, then
        protocol answers (pongs, close frames)."""
        if self._control:
            data = b"".join(self._control) + data
            self._control.clear()
        if self._backlog:
            data = bytes(self._backlog) + data
            self._backlog.clear()
        return data

    async def _send(self, data: bytes) -> None:
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # the common case: no scheduling pass
        except trio.WouldBlock:  # another task is writing: wait for it, in order
            await lock.acquire()
        try:
            data = self._with_waiting(data)
            if data:
                await self._write(data)
        except _STREAM_ERRORS as exc:
            self._lost(f"connection lost: {exc}")
            raise ConnectionClosed(self._closed or CloseReason(1006, "lost")) from None
        finally:
            lock.release()

    # -------------------------------------------------------------------- closing
    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close: send a close frame, wait (bounded) for the other side's, close the stream."""
        try:
            with trio.move_on_after(self._close_timeout):
                if self._conn.state == ConnectionState.OPEN:
                    if self._closed is None:
                        self._closed = CloseReason(code, reason or "")
                    self._queue_control(CloseConnection(code=code, reason=reason))
                await self._send(b"")
                while self._conn.state != ConnectionState.CLOSED and not self._eof:
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
        waited = False
        while True:
            try:
                data = sock.recv(RECEIVE_BUFFER)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)  # cancelled here: nothing was read
                waited = True
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
        await trio.lowlevel.checkpoint_if_cancelled()
        with memoryview(data) as view:
            sent = 0
            try:
                while sent < len(view):
                    try:
                        sent += sock.send(view[sent:])
                    except BlockingIOError:  # the kernel's buffer is full: wait for room
                        await trio.lowlevel.wait_writable(sock)
            except trio.Cancelled:
                if sent:  # never half a frame on the wire: the rest goes out first next time
                    self._backlog[0:0] = view[sent:]
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
    async def _handshake_event(self) -> Event:
        while self._handshake is None:
            if self._closed is not None:
                raise HandshakeError(f"connection closed during the handshake: {self._closed}")
            await self._receive()
        return self._handshake


async def connect(
    stream: trio.abc.Stream, host: str, resource: str, max_message_size: int, close_timeout: float
) -> WebSocket:
    """The client side of the opening handshake over ``stream``."""
    ws = WebSocket(stream, ConnectionType.CLIENT, max_message_size, close_timeout)
    try:
        await ws._send(ws._conn.send(Request(host=host, target=resource)))
        answer = await ws._handshake_event()
    except ConnectionClosed as exc:
        await ws.abort()
        raise HandshakeError(f"connection lost during the handshake: {exc}") from None
    except BaseException:
        await ws.abort()
        raise
    if isinstance(answer, RejectConnection):
        await ws.abort()
        raise ConnectionRejected(answer.status_code)
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
        ws = WebSocket(stream, ConnectionType.SERVER, max_message_size, close_timeout)
        accepted = False
        try:
            with trio.move_on_after(handshake_timeout):
                if isinstance(await ws._handshake_event(), Request):
                    await ws._send(ws._conn.send(AcceptConnection()))
                    accepted = True
        except (HandshakeError, ConnectionClosed, *_STREAM_ERRORS):
            accepted = False
        try:
            if accepted and ws._conn.state == ConnectionState.OPEN:
                await handler(ws)
        finally:
            with trio.CancelScope(shield=True):
                await ws.abort()  # a no-op once the handler closed it

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, one, listeners)
        task_status.started(bound)
