"""The broker: a WebSocket server (:mod:`peerkit._ws`) that routes envelopes between peers.

It decodes only envelope headers and control bodies; published messages and query bodies are
forwarded as opaque bytes, packed once however many subscribers receive them. Each connection
has a bounded outgoing queue. At the end of each incoming frame the reader writes to the idle
connections it gave something to what the kernel takes at once; the rest is drained by the
connection's writer task, which batches everything queued into one WebSocket frame. The
broker never waits for a slow peer: on overflow it drops published messages and tells the
subscriber how many (or disconnects it, by option).
"""

from __future__ import annotations

import hmac
import math
import ssl
from collections.abc import Callable
from typing import Literal

import trio

from . import _ws, codec
from ._broker_conn import (
    _MAX_ID_LEN,
    _PANICK_TYPE,
    _PEER_LEFT_TYPE,
    _RESERVED_IDS,
    BROKER_ID,
    Changes,
    _check_bind,
    _Conn,
    log,
)
from ._broker_dispatch import BrokerDispatch
from ._checks import check_positive_int, check_seconds
from ._util import OwnNursery, raise_single
from ._wsconf import batch_limit, take_counted, ws_max_frame
from .codec import DEFAULT_MAX_MESSAGE_SIZE, control, pack_envelope
from .errors import (
    DecodeError,
    PeerkitError,
)
from .messages import BrokerShutdownMsg, MessagesDropped, PanickMsg, PeerLeft
from .protocol import (
    PROTOCOL_VERSION,
    BrokerInfo,
    Hello,
    Kind,
    PeerInfo,
    QueryFailed,
    Reject,
    RequestFailed,
    Welcome,
)
from .routing import RoutingTable

__all__ = ["BROKER_ID", "Broker"]


class Broker(BrokerDispatch, OwnNursery):
    """Routes typed messages and queries between peers over WebSocket.

    ``await nursery.start(broker.run)`` returns once the broker listens; ``broker.url`` is
    then ``ws://host:port``. ``async with Broker() as broker:`` does the same with its own
    nursery and shuts down cleanly on exit (every peer receives ``BrokerShutdownMsg``).

    Options:

    * ``token``: shared secret every peer must present. Required to bind an address other
      than loopback.
    * ``ssl_context``: serve ``wss://`` with this server-side :class:`ssl.SSLContext`.
    * ``max_message_size``: largest message body in bytes (default 1 MiB). Bigger published
      messages are refused with an error to their sender; the connection is kept.
    * ``max_peers``: connections beyond this are rejected.
    * ``handshake_timeout``: seconds a new connection has to say hello.
    * ``heartbeat_interval`` / ``heartbeat_timeout``: peers send a heartbeat every interval;
      a peer silent for ``heartbeat_timeout`` seconds is dropped and a ``PanickMsg`` is
      published on its behalf.
    * ``send_queue_size``: published messages queued per connection; what does not fit is
      dropped for that peer and counted (control envelopes are never dropped).
    * ``overflow``: ``"drop"`` (default: drop and tell the subscriber how many) or
      ``"disconnect"`` (close a subscriber that cannot keep up).
    * ``grace_period``: seconds a clean shutdown waits for peers to say goodbye.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_peers: int = 10_000,
        handshake_timeout: float = 5.0,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 5.0,
        send_queue_size: int = 10_000,
        overflow: Literal["drop", "disconnect"] = "drop",
        grace_period: float = 2.0,
    ) -> None:
        _check_bind(host, token)
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise PeerkitError(f"port must be an integer in 0..65535, got {port!r}")
        if overflow not in ("drop", "disconnect"):
            raise PeerkitError(f"overflow must be 'drop' or 'disconnect', got {overflow!r}")
        for name, value in (
            ("max_message_size", max_message_size),
            ("max_peers", max_peers),
            ("send_queue_size", send_queue_size),
        ):
            check_positive_int(name, value)
        for name, fvalue in (
            ("handshake_timeout", handshake_timeout),
            ("heartbeat_interval", heartbeat_interval),
            ("heartbeat_timeout", heartbeat_timeout),
            ("grace_period", grace_period),
        ):
            check_seconds(name, fvalue)
        if heartbeat_timeout <= heartbeat_interval:
            raise PeerkitError(
                "heartbeat_timeout must be longer than heartbeat_interval "
                f"({heartbeat_timeout} <= {heartbeat_interval})"
            )
        self.host = host
        self._port = port
        self.token = token
        self.ssl_context = ssl_context
        self.max_message_size = max_message_size
        self.max_peers = max_peers
        self.handshake_timeout = float(handshake_timeout)
        self.heartbeat_interval = float(heartbeat_interval)
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.send_queue_size = send_queue_size
        self.overflow = overflow
        self.grace_period = float(grace_period)

        self.routing = RoutingTable()
        self._conns: dict[str, _Conn] = {}
        self._changes = Changes()  # connections given something to send by a frame
        self._batch_limit = batch_limit(max_message_size)
        self._started = False
        self._listening = False
        self._shutting_down = False
        self._shutdown_requested = trio.Event()
        self._all_gone = trio.Event()
        self._all_gone.set()
        self._finished = trio.Event()
        #: Called (sync) with ``(peer_id, reason)`` whenever a peer leaves; for embedders.
        self.on_peer_left: Callable[[str, str], None] | None = None

    # ------------------------------------------------------------------ public
    @property
    def port(self) -> int:
        """The bound port (after the broker started listening)."""
        if not self._listening:
            raise PeerkitError("the broker is not listening yet; start it with nursery.start")
        return self._port

    @property
    def url(self) -> str:
        """``ws://host:port`` (or ``wss://``) once listening."""
        scheme = "wss" if self.ssl_context else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def peer_ids(self) -> list[str]:
        """Ids of the connected (handshaken) peers."""
        return sorted(self._conns)

    def info(self) -> BrokerInfo:
        """A snapshot of every connected peer (what ``peerkit peers`` shows)."""
        return BrokerInfo(
            peers=[
                PeerInfo(
                    peer_id=c.peer_id,
                    subscriptions=self.routing.subscriptions_of(c.peer_id),
                    query_handlers=self.routing.handlers_of(c.peer_id),
                    queued=c.queued,
                    dropped=c.dropped_total,
                    msgs_in=c.msgs_in,
                    msgs_out=c.msgs_out,
                    state=c.state,
                )
                for c in sorted(self._conns.values(), key=lambda c: c.peer_id)
            ]
        )

    async def run(self, *, task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`shutdown` (clean) or cancellation (abrupt)."""
        if self._started:
            raise PeerkitError("Broker.run() can be called only once; create a new Broker")
        self._started = True
        try:
            await self._serve_until_shutdown(task_status)
        except BaseExceptionGroup as group:
            raise_single(group)
            raise
        finally:
            self._listening = False
            self._finished.set()

    async def _serve_until_shutdown(self, task_status: trio.TaskStatus[Broker]) -> None:
        if True:
            async with trio.open_nursery() as nursery:
                self._port = await nursery.start(
                    _ws.serve,
                    self._handle_connection,
                    self.host,
                    self._port,
                    self.ssl_context,
                    ws_max_frame(self.max_message_size),
                    self.handshake_timeout,
                    self.grace_period,
                )
                self._listening = True
                nursery.start_soon(self._monitor)
                log.info("broker listening on %s", self.url)
                task_status.started(self)
                await self._shutdown_requested.wait()
                await self._shutdown_peers()
                nursery.cancel_scope.cancel(reason="broker shut down")

    async def shutdown(self) -> None:
        """Clean shutdown: ``BrokerShutdownMsg`` to every peer, wait (bounded) for goodbyes.

        Idempotent; returns when the broker has stopped (or at once if it never ran).
        """
        self._shutdown_requested.set()
        if self._started:
            with trio.move_on_after(self.grace_period + 5.0):
                await self._finished.wait()

    def _end_of_block(self) -> None:
        self._shutdown_requested.set()

    # ---------------------------------------------------------------- shutdown
    async def _shutdown_peers(self) -> None:
        self._shutting_down = True
        body = codec.encode_body(BrokerShutdownMsg())
        data = pack_envelope(
            int(Kind.SHUTDOWN), BrokerShutdownMsg.message_type(), BROKER_ID, 0, "", body
        )
        for conn in list(self._conns.values()):
            conn.push(data)
        with trio.move_on_after(self.grace_period):
            await self._all_gone.wait()
        for conn in list(self._conns.values()):
            conn.scope.cancel(reason="broker shut down")

    # ------------------------------------------------------------- connections
    async def _handle_connection(self, ws: _ws.WebSocket) -> None:
        # This runs in the server's nursery: an exception escaping it would take the whole
        # broker down, so whatever one connection does ends with it.
        conn: _Conn | None = None
        try:
            conn = await self._handshake(ws)
            if conn is None:
                return
            try:
                with conn.scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._writer, conn)
                        await self._reader(conn)
                        nursery.cancel_scope.cancel()
            finally:
                self._remove(conn)
        except* (_ws.ConnectionClosed, trio.BrokenResourceError, OSError):
            pass  # the peer went away; _remove() has dealt with it
        except* Exception as group:
            log.error("connection handler failed (the broker carries on)", exc_info=group)
        finally:
            with trio.move_on_after(self.grace_period) as cs:
                cs.shield = True
                if conn is not None and conn.close_reason is not None:
                    await ws.aclose(code=1008, reason=conn.close_reason[:120])
                else:
                    await ws.aclose()

    async def _handshake(self, ws: _ws.WebSocket) -> _Conn | None:
        with trio.move_on_after(self.handshake_timeout):
            try:
                frame = await ws.get_message()
            except _ws.ConnectionClosed:
                return None
            return await self._accept_hello(ws, frame)
        await self._reject(ws, "bad_hello", f"no hello within {self.handshake_timeout} s")
        return None

    async def _accept_hello(self, ws: _ws.WebSocket, frame: bytes | str) -> _Conn | None:
        try:
            envs = list(codec.iter_envelopes(frame))  # type: ignore[arg-type]
            if len(envs) != 1 or envs[0].kind != Kind.HELLO:
                raise DecodeError("the first frame must hold exactly one hello envelope")
            hello = codec.decode_body(Hello, envs[0].body)
            assert isinstance(hello, Hello)
        except (DecodeError, TypeError) as exc:
            await self._reject(ws, "bad_hello", f"bad handshake: {exc}")
            return None
        pid = hello.peer_id
        if hello.protocol_version != PROTOCOL_VERSION:
            reason, detail = (
                "bad_version",
                (
                    f"protocol version {hello.protocol_version} is not supported by this broker "
                    f"(it speaks {PROTOCOL_VERSION}); use the same peerkit version everywhere"
                ),
            )
        elif self.token is not None and not hmac.compare_digest(
            hello.token.encode(), self.token.encode()
        ):
            reason, detail = "bad_token", "wrong or missing token; pass the broker's token="
        elif pid in _RESERVED_IDS or len(pid) > _MAX_ID_LEN or not pid.isprintable():
            reason, detail = (
                "bad_id",
                (
                    f"invalid peer id {pid!r}: use 1..{_MAX_ID_LEN} printable characters, "
                    f"not {BROKER_ID!r}"
                ),
            )
        elif pid in self._conns:
            reason, detail = (
                "duplicate_id",
                (f"a peer with id {pid!r} is already connected; choose another peer_id"),
            )
        elif len(self._conns) >= self.max_peers:
            reason, detail = (
                "too_many_peers",
                (f"the broker already has max_peers={self.max_peers} peers"),
            )
        elif self._shutting_down:
            reason, detail = "shutting_down", "the broker is shutting down"
        else:
            conn = _Conn(pid, ws, self.send_queue_size, self._changes)
            self._conns[pid] = conn
            self.routing.add_peer(pid)
            self._all_gone = trio.Event()
            conn.push(
                control(
                    Kind.WELCOME,
                    Welcome(
                        peer_id=pid,
                        heartbeat_interval=self.heartbeat_interval,
                        heartbeat_timeout=self.heartbeat_timeout,
                        max_message_size=self.max_message_size,
                    ),
                )
            )
            log.info("peer %r connected", pid)
            return conn
        log.warning("rejected peer %r: %s", pid, detail)
        await self._reject(ws, reason, detail)
        return None

    async def _reject(self, ws: _ws.WebSocket, reason: str, detail: str) -> None:
        with trio.move_on_after(self.grace_period):
            try:
                await ws.send_message(control(Kind.REJECT, Reject(reason=reason, detail=detail)))
                await ws.aclose(code=1008, reason=reason)
            except _ws.ConnectionClosed:
                pass

    def _remove(self, conn: _Conn) -> None:
        if self._conns.get(conn.peer_id) is not conn:
            return
        del self._conns[conn.peer_id]
        removal = self.routing.remove_peer(conn.peer_id)
        for pq in removal.orphaned_queries:
            self._query_failed(
                pq.asker,
                pq.asker_corr,
                QueryFailed(
                    code="handler_gone",
                    detail=f"peer {pq.handler!r} left before answering the {pq.msg_type!r} query",
                    peer_id=pq.handler,
                ),
            )
        if conn.goodbye is not None:
            reason = "goodbye" + (f" ({conn.goodbye.error_msg})" if conn.goodbye.error_msg else "")
            log.info("peer %r left: %s", conn.peer_id, reason)
        elif conn.close_reason is not None:
            reason = f"disconnected by the broker: {conn.close_reason}"
        elif self._shutting_down:
            reason = "broker shutdown"
        else:
            reason = "connection lost without goodbye"
            log.warning("peer %r dropped: %s", conn.peer_id, reason)
        if conn.goodbye is None and not (self._shutting_down and conn.close_reason is None):
            self._publish(
                conn.peer_id,
                _PANICK_TYPE,
                codec.encode_body(
                    PanickMsg(message=f"peer {conn.peer_id!r} {reason}", error_type="PeerLost")
                ),
            )
        self._publish(
            conn.peer_id,
            _PEER_LEFT_TYPE,
            codec.encode_body(PeerLeft(reason=reason, clean=conn.goodbye is not None)),
        )
        if not self._conns:
            self._all_gone.set()
        if self.on_peer_left is not None:
            self.on_peer_left(conn.peer_id, reason)

    # ------------------------------------------------------------------ writer
    async def _writer(self, conn: _Conn) -> None:
        out = conn.out
        ws = conn.ws
        while True:
            await conn.wakeup.wait()
            conn.wakeup = trio.Event()
            while out or conn.dropped_pending or ws.backlog:
                if out or conn.dropped_pending:
                    await ws.send_message(self._next_frame(conn))
                else:
                    await ws.flush()
                conn.last_sent = trio.current_time()

    def _next_frame(self, conn: _Conn) -> bytes:
        """Take what ``conn`` has queued into one frame (a loss report leads it)."""
        parts: list[bytes] = []
        if conn.dropped_pending:
            parts.append(control(Kind.DROPPED, MessagesDropped(count=conn.dropped_pending)))
            conn.dropped_pending = 0
        published = take_counted(conn.out, self._batch_limit, parts)
        conn.queued -= published
        conn.msgs_out += published
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _send_inline(self) -> None:
        """Write to the connections an incoming frame gave something to send, from the
        reader, when their writer is idle and the kernel takes it without waiting: a query
        or a lone message need not wait for each writer task's turn. The rest (and what
        the kernel did not take) is left to the writers, woken here."""
        changes = self._changes
        changes.holding = False
        for conn in changes.conns:
            ws = conn.ws
            if (conn.out or conn.dropped_pending) and ws.can_send_now():
                ws.send_nowait(self._next_frame(conn))
                conn.last_sent = trio.current_time()
            if conn.out or conn.dropped_pending or ws.backlog or ws.closed is not None:
                conn.wakeup.set()
        changes.conns.clear()

    # ------------------------------------------------------------------ reader
    async def _reader(self, conn: _Conn) -> None:
        ws = conn.ws
        while True:
            try:
                frame = await ws.get_message()
            except _ws.ConnectionClosed:
                return
            conn.last_seen = trio.current_time()
            self._changes.holding = True
            try:
                for env in codec.iter_envelopes(frame):  # type: ignore[arg-type]
                    self._dispatch(conn, env)
            except DecodeError as exc:
                log.warning("bad frame from %r: %s", conn.peer_id, exc)
                conn.push(control(Kind.ERROR, RequestFailed(code="bad_frame", detail=str(exc))))
            finally:
                self._send_inline()
            if conn.goodbye is not None and conn.scope.deadline == math.inf:
                # the peer closes after its goodbye; wait for that (bounded) rather than
                # closing from both ends at once
                conn.scope.deadline = trio.current_time() + self.grace_period

    # ---------------------------------------------------------------- liveness
    async def _monitor(self) -> None:
        """Send heartbeats to idle peers and drop peers that fell silent."""
        beat = pack_envelope(int(Kind.HEARTBEAT), "", BROKER_ID)
        while True:
            await trio.sleep(self.heartbeat_interval)
            now = trio.current_time()
            for conn in list(self._conns.values()):
                if now - conn.last_seen >= self.heartbeat_timeout:
                    conn.kick(f"no heartbeat for {now - conn.last_seen:.1f} s")
                elif not conn.out and now - conn.last_sent >= self.heartbeat_interval * 0.9:
                    conn.push(beat)  # only to peers that heard nothing else lately
