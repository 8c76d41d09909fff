"""The peer's link to its broker: one trio-websocket connection and everything that touches
it (internal).

A :class:`Link` connects (retrying while the broker is not up yet), says hello and reads the
welcome, then runs three tasks until the connection ends: the *writer* packs whatever is
queued into one WebSocket message (runs of published messages, control envelopes), the
*reader* hands every incoming envelope to the peer (answers to the link's own requests are
matched here, by correlation id), and the *heartbeat* speaks when the peer said nothing for
an interval and gives the broker up when it said nothing for the heartbeat timeout.

Nothing above the link sees the connection: the peer calls :meth:`Link.publish`,
:meth:`Link.push` and :meth:`Link.request`, and receives envelopes through the ``handle``
function it gave the link.
"""

from __future__ import annotations

import collections
import logging
import random
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable

import attrs
import trio
import trio_websocket

from . import codec
from ._batching import (
    MAX_BATCH,
    MESSAGE_QUEUE,
    RECEIVE_BUFFER,
    Outgoing,
    Run,
    batch_limit,
    take_frame,
)
from ._ratelog import DEFAULT_INTERVAL, RateLog
from ._util import raise_single
from .codec import Envelope, control, pack_envelope
from .errors import (
    BrokerConnectError,
    BrokerLostError,
    BrokerRequestError,
    DecodeError,
    DuplicatePeerId,
    HandlerAlreadyRegistered,
    HandshakeRejected,
)
from .protocol import PROTOCOL_VERSION, Hello, Kind, Reject, RequestFailed, Welcome

log = logging.getLogger("peerkit.peer")

#: How large a WebSocket message the peer accepts from the broker (the broker enforces the
#: message sizes; this only bounds what one incoming message may cost).
PEER_MAX_FRAME = 256 * 1024 * 1024

_ANSWERS = frozenset({int(Kind.ACK), int(Kind.NACK), int(Kind.REPLY), int(Kind.QERR)})
_HEARTBEAT = int(Kind.HEARTBEAT)


@attrs.define(eq=False)
class Pending:
    """A request waiting for its answer (or for the error that ends the wait)."""

    event: trio.Event = attrs.field(factory=trio.Event)
    envelope: Envelope | None = None
    error: BaseException | None = None

    def resolve(self, envelope: Envelope | None = None, error: BaseException | None = None) -> None:
        if not self.event.is_set():
            self.envelope, self.error = envelope, error
            self.event.set()


#: close codes after which a peer does NOT reconnect: the broker closed the connection on
#: purpose (1008: policy, e.g. too slow a reader) or because of what the peer sent (1002,
#: 1003, 1007, 1009: protocol errors, too big); after any other (a broker that went away,
#: a lost connection) it does
_FINAL_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1010})


def _lost(text: str, *, reconnectable: bool = True) -> BrokerLostError:
    """A :class:`BrokerLostError` that says whether reconnecting makes sense."""
    exc = BrokerLostError(text)
    exc.reconnectable = reconnectable  # type: ignore[attr-defined]
    return exc


def _close_text(exc: trio_websocket.ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return "the connection closed"
    text = f"code {reason.code} {reason.name}"
    return f"{text}: {reason.reason}" if reason.reason else text


@attrs.define(eq=False)
class Link:
    """The peer's connection to its broker (see the module docstring).

    ``handle(envelope)`` is called, in the reader task, with every envelope that is not an
    answer to one of the link's requests (nor a heartbeat), and ``frame_done()`` after each
    incoming WebSocket message.
    """

    url: str
    peer_id: str
    handle: Callable[[Envelope], None]
    #: called once after each incoming WebSocket message's envelopes were handled; when it
    #: returns True, the reader awaits ``wait_room()`` before it reads on (back-pressure:
    #: a lossless subscriber's inbox is over its bound)
    frame_done: Callable[[], bool | None] = lambda: None
    wait_room: Callable[[], Awaitable[bool]] | None = None
    token: str | None = None
    ssl_context: ssl.SSLContext | None = None
    connect_timeout: float = 10.0
    grace_period: float = 2.0
    #: reconnect after losing an established connection (for up to reconnect_timeout s)
    reconnect: bool = False
    reconnect_timeout: float = 30.0
    #: called (in a task of the new connection) after each reconnection, to restore what
    #: the broker must know (subscriptions, handlers, state)
    on_resume: Callable[[], Awaitable[None]] | None = None

    #: published messages written to the broker
    msgs_out: int = 0
    welcome: Welcome | None = None
    #: max_message_size from the welcome
    max_message_size: int = codec.DEFAULT_MAX_MESSAGE_SIZE
    #: whether the connection is open and the broker answered hello (envelopes can flow)
    up: bool = False
    #: completed reconnections
    reconnects: int = 0
    #: counts the connections (welcomes): envelopes of one connection mean nothing on the
    #: next (correlation ids above all)
    session: int = 0

    _ws: trio_websocket.WebSocketConnection | None = None
    _stream: trio.abc.Stream | None = None  # the TCP (or TLS) stream under _ws
    _closing: bool = False
    _out: collections.deque[Outgoing] = attrs.field(factory=collections.deque)
    _tail: Run | None = None  # the run at the end of _out, while it can grow
    _out_ready: trio.Event = attrs.field(factory=trio.Event)
    _writing: int = 0  # tasks writing a WebSocket message right now
    _in_frame: bool = False  # the reader is handling a frame (it writes what it queues)
    _progress: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    _enqueued: int = 0  # items (envelopes, published messages) ever queued
    _sent: int = 0  # ... and ever written
    _frames_in: int = 0  # WebSocket messages received (the heartbeat task reads it)
    _paused: bool = False  # the reader waits for room (the broker is not silent meanwhile)
    _resume_token: str = ""  # from the last welcome
    _stop_reconnecting: trio.Event = attrs.field(factory=trio.Event)
    _next_corr: int = 1
    _pending: dict[int, Pending] = attrs.field(factory=dict)
    _bad_frames: RateLog = attrs.field(factory=lambda: RateLog(DEFAULT_INTERVAL, trio.current_time))

    # ------------------------------------------------------------------ queueing
    @property
    def backlog(self) -> int:
        """Items queued and not yet written."""
        return self._enqueued - self._sent

    def push(self, data: bytes, *, wake: bool = True) -> None:
        """Queue a packed envelope; it goes out with the writer's next message (or with the
        reader's, when the reader is handling a frame: it writes what it queued at the
        frame's end; or with the caller's, ``wake=False``, when it writes it itself)."""
        self._enqueued += 1
        self._tail = None
        self._out.append(data)
        if wake and not self._in_frame:
            self._out_ready.set()

    def publish(self, msg_type: str, body: bytes) -> None:
        """Queue one message to publish: it joins the run at the tail of the queue when
        that run has its type and room (:data:`MAX_BATCH` messages, one body's size)."""
        run = self._tail
        if (
            run is not None
            and run.type == msg_type
            and run.size + len(body) <= self.max_message_size
            and len(run.bodies) < MAX_BATCH
        ):
            run.bodies.append(body)
            run.size += len(body)
        else:
            self._out.append(run := Run(msg_type, body))
            self._tail = run
        self._enqueued += 1
        self._out_ready.set()

    async def wait_for_room(self, limit: int) -> None:
        """Wait until fewer than ``limit`` items are queued (or the link is down)."""
        while self._enqueued - self._sent >= limit and self.up:
            await self._progress.park()

    async def flush(self) -> None:
        """Wait until everything queued so far is written (or the link is down)."""
        target = self._enqueued
        while self._sent < target and self.up:
            await self._progress.park()

    # ------------------------------------------------------------------ requests
    async def request(
        self, kind: Kind, type_name: str, target: str, body: bytes, timeout: float
    ) -> Envelope | None:
        """Send a request envelope and return its answer, or None after ``timeout``.

        A query given up (timeout, cancellation) is cancelled at the broker. Raises the
        error that ended the wait when the link went down meanwhile.
        """
        if not self.up:
            raise BrokerLostError(
                f"{kind.name} request: no connection to the broker at {self.url} "
                "(it was lost; the peer is reconnecting)"
            )
        corr = self._next_corr
        self._next_corr += 1
        pending = self._pending[corr] = Pending()
        self.push(pack_envelope(int(kind), type_name, "", corr, target, body), wake=False)
        try:
            with trio.move_on_after(timeout):
                await self._write_inline()  # (or wakes the writer)
                await pending.event.wait()
        finally:
            self._pending.pop(corr, None)
            if pending.envelope is None and kind == Kind.QUERY and self.up:
                self.push(pack_envelope(int(Kind.QCANCEL), "", "", corr))
        if pending.error is not None:
            raise pending.error
        return pending.envelope

    async def call(
        self,
        kind: Kind,
        type_name: str = "",
        *,
        target: str = "",
        body: bytes = b"",
        timeout: float,
    ) -> Envelope:
        """A request the broker acknowledges: returns the ACK (or the REPLY), raises
        :class:`BrokerRequestError` on a NACK and :class:`BrokerLostError` after
        ``timeout``."""
        env = await self.request(kind, type_name, target, body, timeout)
        if env is None:
            raise BrokerLostError(
                f"{kind.name} request: the broker did not answer within {timeout:g} s"
            )
        if env.kind == Kind.NACK:
            failure = codec.decode_body(RequestFailed, env.body)
            assert isinstance(failure, RequestFailed)
            cls = (
                HandlerAlreadyRegistered
                if failure.code == "already_registered"
                else BrokerRequestError
            )
            raise cls(failure.code, failure.detail)
        return env

    def fail_pending(self, error: BaseException) -> None:
        """End every request still waiting, with ``error``."""
        waiting = list(self._pending.values())
        self._pending.clear()
        for p in waiting:
            p.resolve(error=error)

    # ------------------------------------------------------------------ life
    async def run(
        self, *, task_status: trio.TaskStatus[Welcome] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, say hello (started with the welcome), then move envelopes until the
        connection ends: returns after :meth:`aclose`, raises :class:`BrokerLostError` when
        the broker goes away (and, with ``reconnect``, cannot be reached again within
        ``reconnect_timeout``) and :class:`BrokerConnectError` (or a subclass of
        :class:`HandshakeRejected`) when it cannot be reached at first or refuses the peer.

        While the broker's port refuses connections (not started yet), it retries with
        back-off until ``connect_timeout``."""
        try:
            await self._connect_and_serve(self.connect_timeout, task_status)
            return
        except BrokerLostError as exc:
            if not self.reconnect or self._closing or not getattr(exc, "reconnectable", False):
                raise
            lost: BrokerLostError = exc
        while True:
            self._went_down(lost)
            try:
                async with trio.open_nursery() as nursery:  # the closing peer stops attempts
                    nursery.start_soon(self._cancel_on_close, nursery.cancel_scope)
                    await self._connect_and_serve(self.reconnect_timeout, None)
                    nursery.cancel_scope.cancel()
                return
            except BaseExceptionGroup as group:
                try:
                    raise_single(group)
                    raise
                except BrokerLostError as exc:
                    if self._closing:
                        return
                    if not getattr(exc, "reconnectable", False):
                        raise
                    lost = exc
                except (BrokerConnectError, HandshakeRejected) as exc:
                    if self._closing:
                        return
                    raise BrokerLostError(
                        f"{lost}; could not reconnect: {exc} (reconnect_timeout="
                        f"{self.reconnect_timeout} s)"
                    ) from None

    async def _cancel_on_close(self, scope: trio.CancelScope) -> None:
        """Stop reconnection attempts when the peer closes (a connection that is up closes
        the ordinary way: goodbye, flush, close)."""
        await self._stop_reconnecting.wait()
        if not self.up:
            scope.cancel(reason="the peer is closing")

    def _went_down(self, lost: BaseException) -> None:
        """The connection was lost and the link will reconnect: what was waiting for the
        old connection ends now."""
        log.warning("peer %r lost its broker (%s); reconnecting", self.peer_id, lost)
        self.fail_pending(BrokerLostError(f"the connection to the broker was lost: {lost}"))
        # control envelopes (answers, requests, reports) belonged to the old connection;
        # runs of published messages wait for the new one
        kept: collections.deque[Outgoing] = collections.deque(
            item for item in self._out if isinstance(item, Run)
        )
        self._sent += sum(1 for item in self._out if not isinstance(item, Run))
        self._out.clear()
        self._out.extend(kept)
        self._tail = None
        self._progress.unpark_all()

    async def _connect_and_serve(
        self, timeout: float, task_status: trio.TaskStatus[Welcome] | None
    ) -> None:
        """One connection: connect (retrying while the port refuses), hello, then serve it
        until it ends. ``task_status`` None: a reconnection (``on_resume`` restores what the
        broker must know)."""
        deadline = trio.current_time() + timeout
        delay = 0.05
        while True:
            try:
                await self._attempt(deadline, timeout, task_status)
                return
            except HandshakeRejected as exc:
                # a crowd connecting at once: the broker makes room for the newest by
                # turning away the oldest still in the handshake; try again, within time
                if exc.reason != "too_many_handshakes" or trio.current_time() >= deadline:
                    raise
                log.debug("broker at %s busy with handshakes; trying again", self.url)
            with trio.move_on_at(deadline):
                await trio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 1.0)

    async def _attempt(
        self, deadline: float, timeout: float, task_status: trio.TaskStatus[Welcome] | None
    ) -> None:
        delay = 0.05
        last_error: BaseException | None = None
        while True:
            try:
                with trio.move_on_at(deadline):
                    stream = await self._open_stream()
                    break
            except OSError as exc:
                last_error = exc
                log.debug("broker at %s not reachable yet: %s", self.url, exc)
            if trio.current_time() >= deadline:
                detail = f" (last error: {last_error})" if last_error is not None else ""
                raise BrokerConnectError(
                    f"could not connect to the broker at {self.url} within "
                    f"{timeout} s{detail}; is it running? (raise connect_timeout "
                    "to wait longer)"
                )
            with trio.move_on_at(deadline):
                await trio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: not all at once
            delay = min(delay * 2, 1.0)
        try:
            try:
                async with trio.open_nursery() as nursery:  # trio-websocket's reader task
                    await self._connected(nursery, stream, deadline, task_status)
                    # closed cleanly: trio-websocket's reader ends when the broker closes
                    # TCP after the closing handshake (cancelling it could cut the handshake)
                    nursery.cancel_scope.deadline = trio.current_time() + self.grace_period
            except BaseExceptionGroup as group:
                raise_single(group)
                raise
        except trio_websocket.ConnectionRejected as exc:
            raise BrokerConnectError(
                f"the server at {self.url} refused the WebSocket connection "
                f"(HTTP {exc.status_code}); is it a peerkit broker, and is the URL's path the "
                "one it is mounted on?"
            ) from None

    async def _open_stream(self) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        """The TCP (and TLS) stream under the WebSocket; TLS fails here, with its reason."""
        url = urllib.parse.urlsplit(self.url)
        host = url.hostname or "127.0.0.1"
        port = url.port or (443 if url.scheme == "wss" else 80)
        tcp = self._stream = await trio.open_tcp_stream(host, port)
        if url.scheme != "wss":
            return tcp
        context = self.ssl_context or ssl.create_default_context()
        tls = trio.SSLStream(tcp, context, server_hostname=host, https_compatible=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(tcp)
            raise BrokerConnectError(
                f"TLS handshake with the broker at {self.url} failed: "
                f"{exc.__cause__ or exc}; pass an ssl_context that trusts the broker's "
                "certificate"
            ) from None
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        self._stream = tls
        return tls

    async def _connected(
        self,
        nursery: trio.Nursery,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
        deadline: float,
        task_status: trio.TaskStatus[Welcome] | None,
    ) -> None:
        url = urllib.parse.urlsplit(self.url)
        resource = (url.path or "/") + (f"?{url.query}" if url.query else "")
        ws: trio_websocket.WebSocketConnection | None = None
        with trio.move_on_at(deadline):
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                url.netloc,
                resource,
                message_queue_size=MESSAGE_QUEUE,
                max_message_size=PEER_MAX_FRAME,
                receive_buffer_size=RECEIVE_BUFFER,
            )
        if ws is None:
            await trio.aclose_forcefully(stream)
            raise BrokerConnectError(
                f"the server at {self.url} accepted the connection but did not complete the "
                f"WebSocket handshake within {self.connect_timeout:g} s; is it a peerkit "
                "broker? (raise connect_timeout to wait longer)"
            )
        try:
            await self._session(ws, deadline, task_status)
        finally:
            with trio.move_on_after(self.grace_period) as cleanup:
                cleanup.shield = True
                await ws.aclose()

    async def _session(
        self,
        ws: trio_websocket.WebSocketConnection,
        deadline: float,
        task_status: trio.TaskStatus[Welcome] | None,
    ) -> None:
        self._ws = ws
        try:
            with trio.move_on_at(deadline) as hello_scope:
                welcome, rest = await self._hello(ws)
            if hello_scope.cancelled_caught:
                raise BrokerConnectError(
                    f"the broker at {self.url} did not answer the peer's hello within "
                    f"{self.connect_timeout} s; is it a peerkit broker? (raise "
                    "connect_timeout to wait longer)"
                )
            self.welcome = welcome
            self.max_message_size = welcome.max_message_size
            self._resume_token = welcome.resume_token
            self.session += 1
            self.up = True
            for env in rest:
                self.handle(env)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, ws)
                    nursery.start_soon(self._heartbeat, welcome)
                    if task_status is not None:
                        task_status.started(welcome)
                    else:
                        nursery.start_soon(self._resume)
                    await self._reader(ws)
                    nursery.cancel_scope.cancel(reason="the broker connection ended")
            except BaseExceptionGroup as group:
                raise_single(group)
                raise
        finally:
            self.up = False
            self._progress.unpark_all()

    async def _resume(self) -> None:
        """After a reconnection: restore what the broker must know, then count it."""
        if self._out:
            self._out_ready.set()  # what waited for the new connection
        if self.on_resume is not None:
            await self.on_resume()
        self.reconnects += 1
        log.info(
            "peer %r reconnected to %s (reconnection %d)", self.peer_id, self.url, self.reconnects
        )

    async def _hello(
        self, ws: trio_websocket.WebSocketConnection
    ) -> tuple[Welcome, list[Envelope]]:
        hello = Hello(
            peer_id=self.peer_id,
            protocol_version=PROTOCOL_VERSION,
            token=self.token or "",
            resume_token=self._resume_token,
        )
        try:
            await ws.send_message(control(Kind.HELLO, hello))
            frame = await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            if exc.reason is not None and exc.reason.reason == "too_many_handshakes":
                # turned away before its reject could be read: as retryable as the reject
                raise HandshakeRejected("too_many_handshakes", _close_text(exc)) from None
            raise BrokerConnectError(
                f"the broker at {self.url} closed the connection during the handshake "
                f"({_close_text(exc)})"
            ) from None
        try:
            envs = list(codec.iter_envelopes(frame))  # type: ignore[arg-type]
        except DecodeError as exc:
            raise BrokerConnectError(f"bad handshake answer from {self.url}: {exc}") from None
        first = envs[0]
        if first.kind == Kind.REJECT:
            reject = codec.decode_body(Reject, first.body)
            assert isinstance(reject, Reject)
            cls = DuplicatePeerId if reject.reason == "duplicate_id" else HandshakeRejected
            raise cls(reject.reason, f"the broker rejected {self.peer_id!r}: {reject.detail}")
        if first.kind != Kind.WELCOME:
            raise BrokerConnectError(f"unexpected handshake answer {Kind(first.kind).name}")
        welcome = codec.decode_body(Welcome, first.body)
        assert isinstance(welcome, Welcome)
        return welcome, envs[1:]

    async def aclose(self) -> None:
        """Write what is queued (bounded by the caller's deadline), then close the
        connection; the link's :meth:`run` returns."""
        self._closing = True
        self._stop_reconnecting.set()
        if self.up:
            await self.flush()
        if self._ws is not None:
            await self._ws.aclose()

    async def abort(self) -> None:
        """Drop the connection at once: no goodbye, no closing handshake (as a crash
        would; for tests)."""
        if self._stream is not None:
            await trio.aclose_forcefully(self._stream)

    # ------------------------------------------------------------------ tasks
    async def _writer(self, ws: trio_websocket.WebSocketConnection) -> None:
        while True:
            await self._out_ready.wait()
            self._out_ready = trio.Event()
            while self._out:
                if not await self._write_frame(ws):
                    return  # the reader reports why

    async def _write_frame(self, ws: trio_websocket.WebSocketConnection) -> bool:
        """Take what is queued into one WebSocket message and write it; False when the
        connection is closed. Several tasks may write (see :meth:`_write_inline`): what
        one took from the queue is ahead of what the next takes, and trio-websocket's
        send lock is first come, first served, so messages keep their order."""
        frame, count, published = take_frame(self._out, batch_limit(self.max_message_size))
        if not self._out:  # the tail run is packed: the next message starts another
            self._tail = None
        self._writing += 1
        try:
            await ws.send_message(frame)
        except trio_websocket.ConnectionClosed:
            return False
        finally:
            self._writing -= 1
        self._sent += count
        self.msgs_out += published
        self._progress.unpark_all()
        return True

    async def _write_inline(self, *, shield: bool = True) -> None:
        """Write what is queued from the calling task itself when no write is in progress
        (a request, or the answers the reader just queued), instead of waking the writer
        task: one task switch less per round trip. Shielded, as a cancelled write could cut
        a message in two; it waits only while the broker does not read, which the
        heartbeat ends (closing the connection fails the write)."""
        ws = self._ws
        if ws is None or not self.up or not self._out:
            return
        if not self._writing:
            if shield:
                with trio.CancelScope(shield=True):
                    await self._write_frame(ws)
            else:
                await self._write_frame(ws)
        if self._out:
            self._out_ready.set()

    async def _reader(self, ws: trio_websocket.WebSocketConnection) -> None:
        handle = self.handle
        pending = self._pending
        while True:
            try:
                frame = await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                if self._closing:
                    return
                code = exc.reason.code if exc.reason is not None else 1006
                raise _lost(
                    f"the broker at {self.url} closed the connection of {self.peer_id!r} "
                    f"({_close_text(exc)})",
                    reconnectable=code not in _FINAL_CODES,
                ) from None
            self._frames_in += 1
            self._in_frame = True
            try:
                for env in codec.iter_envelopes(frame):  # type: ignore[arg-type]
                    kind = env.kind
                    if kind in _ANSWERS:
                        waiting = pending.get(env.corr)
                        if waiting is not None:
                            waiting.resolve(env)
                    elif kind != _HEARTBEAT:
                        handle(env)
            except DecodeError as exc:
                if (report := self._bad_frames.hit("frame")) is not None:
                    log.error(
                        "peer %r: bad frame from the broker: %s%s", self.peer_id, exc, report.more()
                    )
            finally:
                self._in_frame = False
            if self.frame_done() and self.wait_room is not None:
                await self._wait_room(self.wait_room)
            if self._out:  # e.g. the answers to the queries it brought
                await self._write_inline(shield=False)  # (or wakes the writer)

    async def _wait_room(self, wait_room: Callable[[], Awaitable[bool]]) -> None:
        """Read nothing until the handlers make progress (lossless back-pressure); handlers
        that take nothing for the heartbeat timeout give the connection up (the broker
        disconnects such a subscriber anyway, after its stall_timeout)."""
        timeout = self.welcome.heartbeat_timeout if self.welcome is not None else 5.0
        self._paused = True
        try:
            while True:
                with trio.move_on_after(timeout) as scope:
                    more = await wait_room()
                if scope.cancelled_caught:
                    raise _lost(
                        f"peer {self.peer_id!r}: its handlers took no message for {timeout:g} s "
                        "while a lossless subscription's messages waited; it gave up its "
                        "connection (a lossless subscriber must keep up, or it stalls the "
                        "publishers)",
                        reconnectable=False,
                    )
                if not more:
                    return
        finally:
            self._paused = False

    async def _heartbeat(self, welcome: Welcome) -> None:
        """Send a heartbeat when the peer said nothing for an interval; give the broker up
        when it said nothing for the heartbeat timeout.

        The reader only counts what arrives (no clock read per message); this task, which
        wakes at least once an interval, notes when the count moved."""
        interval = welcome.heartbeat_interval
        timeout = welcome.heartbeat_timeout
        beat = pack_envelope(_HEARTBEAT)
        last = self._enqueued
        heard = trio.current_time()
        seen = self._frames_in
        next_beat = heard + interval
        while True:
            await trio.sleep_until(min(next_beat, heard + timeout))
            now = trio.current_time()
            if self._frames_in != seen or self._paused:  # paused: we are not reading
                seen, heard = self._frames_in, now
            if now - heard >= timeout:
                raise _lost(f"no word from the broker at {self.url} for {timeout:g} s")
            if now >= next_beat:
                if self._enqueued == last:
                    self.push(beat)
                last = self._enqueued
                next_beat = now + interval
