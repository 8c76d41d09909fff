"""A lean WebSocket connection for trio, on the Sans-I/O layer of ``websockets`` (internal).

``websockets`` does the protocol (handshake, close and ping rules, fragments, the message
size limit; see :mod:`peerkit._wsframes`); this module only moves its bytes: over TLS through the
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

Turning bytes into messages and back, including peerkit's own path for whole binary
frames, is the sans-I/O half, :mod:`peerkit._wsframes`; this module does the I/O.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from time import perf_counter
from typing import Any

import trio
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus, InvalidURI, ProtocolError
from websockets.http11 import Request, Response
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from ._wsconf import RECEIVE_BUFFER
from ._wsframes import CloseReason, ConnectionClosed, Frames, refusal

__all__ = ["CloseReason", "ConnectionClosed", "ConnectionRejected", "HandshakeError", "WebSocket"]

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_OPEN, _CONNECTING = State.OPEN, State.CONNECTING
_sched_yield: Callable[[], None] = getattr(os, "sched_yield", lambda: None)  # not on Windows


async def _poll_pass() -> None:
    """One pass of a poll: let the process's other runnable tasks run, and the others on
    this CPU (``sched_yield``), then come back at once rather than sleep.

    A task that waits for an answer due within a fraction of a millisecond can poll for it
    instead of sleeping until the kernel reports it. Sleeping lets the CPU go idle, and on a
    VM waking an idle CPU, and then trio's run loop on cold caches, costs tens of
    microseconds per hop; a query's round trip crosses four of them. Polling is cooperative
    (every pass is a trio checkpoint, so the process's other tasks and I/O carry on) and
    the caller bounds it in time (``Peer(busy_poll=...)``).
    """
    _sched_yield()
    await trio.lowlevel.checkpoint()


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
        self._close_timeout = close_timeout
        self._c = Frames(protocol)  # the sans-I/O half: bytes and messages
        self._eof = False
        self._backlog = bytearray()  # the unwritten rest of an earlier write (goes first)
        #: one writer at a time, in arrival order; a released lock passes straight to the
        #: next waiter, so nobody (send_nowait included) can overtake a frame that waits
        self._send_lock = trio.StrictFIFOLock()
        self._reading = False
        self._drained = False  # the last read left the socket empty
        self._poll_started = 0.0  # the poll (its end) whose first pass was made
        self._poll_dropped = 0.0  # the poll given up because other tasks had work
        self._read_done = trio.lowlevel.ParkingLot()

    @property
    def closed(self) -> CloseReason | None:
        """Why the connection closed, or None while it is open."""
        return self._c.closed

    # ------------------------------------------------------------------ receiving
    async def get_message(self, poll_until: float = 0.0) -> bytes | str:
        """The next message; :class:`ConnectionClosed` once closed and drained.

        ``poll_until`` (a :func:`time.perf_counter` time; plain TCP only): until then,
        while nothing has arrived, poll the socket at every scheduling pass instead of
        sleeping until the kernel reports data (see :func:`_poll_pass`).
        """
        while not self._c.messages:
            if self._c.closed is not None:
                raise ConnectionClosed(self._c.closed)
            await self._receive(poll_until)
        return self._c.messages.popleft()

    async def _receive(self, poll_until: float = 0.0) -> None:
        """Read once, let the protocol parse, and send what it asks for.

        If another task is reading, wait for its read instead (its result serves both).
        """
        if self._reading:
            await self._read_done.park()
            return
        self._reading = True
        try:
            await self._receive_once(poll_until)
        finally:
            self._reading = False
            if self._read_done:
                self._read_done.unpark_all()

    async def _receive_once(self, poll_until: float) -> None:
        try:
            data = await self._read(poll_until)
        except _STREAM_ERRORS as exc:
            self._lost(f"connection lost: {exc}")
            return
        if not data:
            self._lost("connection lost")
            return
        self._c.receive(data)
        # a pong, a close reply: written without a checkpoint when nothing else is being
        # written, so that a reader cancelled right now still answers
        if self._c.out and self._idle():
            self._write_nowait()
        if self._c.out or self._backlog:
            await self._send()

    def _lost(self, reason: str) -> None:
        self._eof = True
        self._c.close_as(1006, reason)

    # -------------------------------------------------------------------- sending
    async def send_message(self, data: bytes) -> None:
        """Send one binary message (written to the stream before this returns, unless
        cancelled: then it goes out first with the next write)."""
        self._c.frame(data)
        await self._send()

    @property
    def reads_survive_cancellation(self) -> bool:
        """Whether a cancelled :meth:`get_message` leaves the connection as it was (plain
        TCP; a TLS stream may be left broken by a cancelled read)."""
        return self._sock is not None

    def can_send_now(self) -> bool:
        """Whether :meth:`send_nowait` may be used: plain TCP, open, nothing being written."""
        return self._c.closed is None and self._idle()

    def _idle(self) -> bool:
        """Plain TCP, with nothing being written and no backlog: a write may go at once."""
        return self._sock is not None and not self._send_lock.locked() and not self._backlog

    def send_nowait(self, data: bytes) -> None:
        """Write one message without waiting (check :meth:`can_send_now` first).

        What the kernel does not take at once stays in a backlog that the next send, or
        :meth:`flush`, writes first.
        """
        assert self._idle()
        self._c.frame(data)
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
        out = self._c.out
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
            if self._c.out or self._backlog:
                await self._write(self._take_out())
        except _STREAM_ERRORS as exc:
            self._lost(f"connection lost: {exc}")
            raise ConnectionClosed(self._c.closed or CloseReason(1006, "lost")) from None
        finally:
            lock.release()

    # -------------------------------------------------------------------- closing
    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close: send a close frame, wait (bounded) for the other side's, close the stream."""
        proto = self._c.proto
        try:
            with trio.move_on_after(self._close_timeout):
                if proto.state is _OPEN:
                    self._c.close_as(code, reason or "")
                    # a control frame holds 125 bytes: 2 for the code, the rest for a reason
                    short = (reason or "").encode()[:120].decode(errors="ignore")
                    with contextlib.suppress(ProtocolError):  # a code no one may send
                        proto.send_close(code, short)
                    self._c.generated()
                await self._send()
                # wait for the other side's close frame, unless the protocol says the
                # stream ends now (a server that failed the connection, or got the answer)
                waiting = proto.state is not _CONNECTING and proto.close_sent is not None
                while (
                    waiting and proto.close_rcvd is None and not (self._eof or self._c.end_wanted)
                ):
                    await self._receive()
        except ConnectionClosed:
            pass
        finally:
            self._c.close_as(code, reason or "")
            await self.abort()

    # ----------------------------------------------------------------- the stream
    async def _read(self, poll_until: float = 0.0) -> bytes | bytearray:
        sock = self._sock
        if sock is None:
            return await self._stream.receive_some(RECEIVE_BUFFER)
        await trio.lowlevel.checkpoint_if_cancelled()
        polling = (
            poll_until > 0.0 and poll_until != self._poll_dropped and perf_counter() < poll_until
        )
        # after a read that did not fill the buffer the socket is most likely drained: wait
        # first rather than pay for a recv that fails (unless polling: then try at once)
        waited = self._drained and not polling
        if waited:
            await trio.lowlevel.wait_readable(sock)  # cancelled here: nothing was read
        while True:
            try:
                data = sock.recv(RECEIVE_BUFFER)
                break
            except BlockingIOError:
                if polling and self._poll_on(poll_until):
                    await _poll_pass()  # cancelled here: nothing was read
                else:
                    await trio.lowlevel.wait_readable(sock)
                waited = True
        self._drained = len(data) < RECEIVE_BUFFER
        if not waited:  # data was already there: still let the others run (not cancellable
            await trio.lowlevel.cancel_shielded_checkpoint()  # now: the data is taken)
        return data

    def _poll_on(self, poll_until: float) -> bool:
        """Whether a read polling until ``poll_until`` makes another pass.

        Not once the time is up, and not while the process has other tasks to run: its CPU
        does not go idle then, so there is no wake-up to save, and the passes would only
        slow those tasks down (the first pass of a wait is always made: the task whose
        reading this caller took over is still to settle).
        """
        if perf_counter() >= poll_until:
            return False
        if self._poll_started != poll_until:
            self._poll_started = poll_until
            return True
        if trio.lowlevel.current_statistics().tasks_runnable:
            self._poll_dropped = poll_until  # for the rest of this wait
            return False
        return True

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
        self._c.close_as(1006, "aborted")
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
        while self._c.handshake is None:
            if self._c.answer_head is not None:
                status = refusal(self._c.answer_head)
                if status is not None:
                    raise ConnectionRejected(status)
            if self._c.closed is not None:
                raise HandshakeError(f"connection closed during the handshake: {self._c.closed}")
            await self._receive()
        return self._c.handshake


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
    ws._c.answer_head = bytearray()
    try:
        proto.send_request(proto.connect())
        ws._c.generated()
        await ws._send()
        answer = await ws._handshake_event()
    except ConnectionClosed as exc:
        await ws.abort()
        raise HandshakeError(f"connection lost during the handshake: {exc}") from None
    except BaseException:
        await ws.abort()
        raise
    ws._c.answer_head = None
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
                ws._c.generated()
                await ws._send()
                accepted = response.status_code == 101
                if accepted and ws._c.rbuf:  # frames a client sent before our answer
                    ws._c.take_in(b"")
                    ws._c.take_answers()
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
