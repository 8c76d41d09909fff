"""The broker: routes envelopes between peers over trio-websocket.

It decodes only envelope headers and control bodies; published messages and query bodies are
forwarded as opaque bytes, packed once however many subscribers receive them. The broker
holds one :class:`~peerkit._connection.Connection` per peer (its trio-websocket connection,
bounded outgoing queue, reader and writer), a :class:`~peerkit._dispatch.Dispatcher` that
decides where each envelope goes, and its :class:`~peerkit.routing.RoutingTable`. It never
waits for a slow peer: on overflow it drops published messages and tells the subscriber how
many (or disconnects it, by option). What one connection may cost it is bounded in bytes and
in time (:class:`~peerkit._limits.Limits`, the options listed in :class:`Broker`).

It serves on its own port (``trio_websocket.serve_websocket``), or, with ``listen=False``,
is *mounted* on an application's trio-websocket server: the application hands it the
requests it chooses with :meth:`Broker.handle_request`.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, Literal

import trio
import trio_websocket

from . import codec, jsonwire
from ._admission import BROKER_ID, admit, check_bind, is_loopback
from ._batching import MESSAGE_QUEUE, RECEIVE_BUFFER, batch_limit, ws_max_frame
from ._checks import check_positive_int, check_seconds
from ._connection import Connection, log
from ._dispatch import Dispatcher
from ._limits import Limits
from ._util import OwnNursery, raise_single
from .codec import DEFAULT_MAX_MESSAGE_SIZE, control, pack_envelope
from .errors import DecodeError, PeerkitError
from .messages import BrokerShutdownMsg, PanickMsg, PeerJoined, PeerLeft
from .protocol import (
    BrokerInfo,
    Hello,
    Kind,
    PeerInfo,
    QueryFailed,
    Reject,
    Welcome,
)
from .routing import RoutingTable

_PANICK_TYPE = PanickMsg.message_type()


def _listener_port(listener: trio.SocketListener | trio.SSLListener[trio.SocketStream]) -> int:
    """The port a trio listener (TCP, or TLS over TCP) is bound to."""
    if isinstance(listener, trio.SSLListener):
        transport = listener.transport_listener
        assert isinstance(transport, trio.SocketListener)
        listener = transport
    port: int = listener.socket.getsockname()[1]
    return port


_PEER_LEFT_TYPE = PeerLeft.message_type()
_PEER_JOINED_TYPE = PeerJoined.message_type()

__all__ = ["BROKER_ID", "Broker"]


class Broker(OwnNursery):
    """Routes typed messages and queries between peers over WebSocket.

    ``await nursery.start(broker.run)`` returns once the broker listens; ``broker.url`` is
    then ``ws://host:port``. ``async with Broker() as broker:`` does the same with its own
    nursery and shuts down cleanly on exit (every peer receives ``BrokerShutdownMsg``).

    Options:

    * ``token``: shared secret every peer must present. Required to bind an address other
      than loopback.
    * ``ssl_context``: serve ``wss://`` with this server-side :class:`ssl.SSLContext`.
    * ``max_message_size``: largest body of any envelope in bytes (default 1 MiB). A bigger
      published message is refused with an error to its sender; a bigger query or reply
      fails that query (``too_large``, and an error to a replier); the connection is kept.
    * ``max_peers``: connections beyond this are rejected.
    * ``handshake_timeout``: seconds a new connection has to say hello.
    * ``max_handshakes``: connections still waiting to say hello (default 64). A new one
      beyond it closes the *oldest* waiting connection (rejected ``too_many_handshakes``),
      so strangers holding the cap cannot keep out a peer, which says hello at once.
    * ``max_hello_size``: largest first message in bytes (default 4 KiB; a hello is under
      1 KiB): a bigger one is rejected (``bad_hello``) without being decoded.
    * ``heartbeat_interval`` / ``heartbeat_timeout``: peers send a heartbeat every interval;
      a peer silent for ``heartbeat_timeout`` seconds is dropped and a ``PanickMsg`` is
      published on its behalf.
    * ``send_queue_size``: published messages queued per connection; what does not fit is
      dropped for that peer and counted (control envelopes are never dropped).
    * ``send_queue_bytes``: the same bound in bytes (default 32 MiB, at least twice
      ``max_message_size``). Control envelopes (answers, queries, replies) have as much
      again: a peer that lets more pile up (or more than 4096 of them) does not read its
      connection and is disconnected (code 1008).
    * ``overflow``: ``"drop"`` (default: drop and tell the subscriber how many) or
      ``"disconnect"`` (close a subscriber that cannot keep up).
    * ``max_pending_queries``: queries one peer may have waiting for their answers (default
      1000); ``max_pending_queries_total``: the same for all peers together (default
      50,000). Beyond them, and for a handler whose connection is filling up with
      envelopes it has not read, the asker gets :class:`~peerkit.errors.BrokerBusyError`
      at once; the handler is never disconnected for the queries others send it.
    * ``query_deadline``: seconds the broker waits for a query's answer (default 60); then
      the asker gets :class:`~peerkit.QueryTimeout` and a late answer is dropped.
    * ``info_rate``: broker-info requests a second per connection (default 20); beyond, the
      request is refused with ``busy``.
    * ``max_type_length``: longest message type name (default 256 characters);
      ``max_id_length``: longest peer id (default 200). Longer ones are refused
      (``bad_request``, ``bad_id``).
    * ``max_subscriptions`` / ``max_handlers``: subscriptions and query types handled per
      peer (defaults 4096 and 1024); beyond, the request is refused (``too_many``).
    * ``grace_period``: seconds a clean shutdown waits for peers to say goodbye.
    * ``stall_timeout``: a subscriber with a ``lossless`` subscription slows its
      publishers down when it cannot keep up (the broker stops reading them); one that
      drains nothing for this many seconds is disconnected and the publishers resume.
    * ``listen``: ``True`` (default) serves on ``host:port``; ``False`` opens no port:
      the broker is mounted on an application's trio-websocket server, which hands it
      requests with :meth:`handle_request` (see "Embedding peerkit in a trio application").
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
        send_queue_bytes: int | None = None,
        overflow: Literal["drop", "disconnect"] = "drop",
        max_handshakes: int = 64,
        max_hello_size: int = 4096,
        max_pending_queries: int = 1000,
        max_pending_queries_total: int = 50_000,
        query_deadline: float = 60.0,
        info_rate: float = 20.0,
        max_type_length: int = 256,
        max_id_length: int = 200,
        max_subscriptions: int = 4096,
        max_handlers: int = 1024,
        grace_period: float = 2.0,
        stall_timeout: float = 5.0,
        listen: bool = True,
    ) -> None:
        check_bind(host, token)
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise PeerkitError(f"port must be an integer in 0..65535, got {port!r}")
        #: every bound on what a connection may cost (checked here, once)
        self.limits = Limits.checked(
            max_message_size=max_message_size,
            send_queue_size=send_queue_size,
            send_queue_bytes=send_queue_bytes,
            overflow=overflow,
            max_handshakes=max_handshakes,
            max_hello_size=max_hello_size,
            max_pending_queries=max_pending_queries,
            max_pending_queries_total=max_pending_queries_total,
            query_deadline=query_deadline,
            info_rate=info_rate,
            max_type_length=max_type_length,
            max_id_length=max_id_length,
            max_subscriptions=max_subscriptions,
            max_handlers=max_handlers,
        )
        check_positive_int("max_peers", max_peers)
        for name, fvalue in (
            ("handshake_timeout", handshake_timeout),
            ("heartbeat_interval", heartbeat_interval),
            ("heartbeat_timeout", heartbeat_timeout),
            ("grace_period", grace_period),
            ("stall_timeout", stall_timeout),
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
        self.stall_timeout = float(stall_timeout)

        self.listen = bool(listen)

        self.routing = RoutingTable(max_subscriptions=max_subscriptions, max_handlers=max_handlers)
        self._conns: dict[str, Connection] = {}
        self._dispatcher = Dispatcher(self.routing, self._conns, self.info, self.limits)
        #: connections waiting to say hello, oldest first (see _waiting_for_hello)
        self._waiting_hello: dict[trio.CancelScope, None] = {}
        self._batch_limit = batch_limit(max_message_size)
        self._handlers: set[trio.CancelScope] = set()  # every connection being served
        self._running = False  # run() has started and the broker takes connections
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
        if not self.listen:
            raise PeerkitError(
                "a mounted broker (listen=False) has no port of its own: peers connect to "
                "the application's server, at the path it hands to handle_request()"
            )
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

    @property
    def handshakes(self) -> int:
        """Connections waiting to say hello (at most ``max_handshakes``)."""
        return len(self._waiting_hello)

    def info(self) -> BrokerInfo:
        """A snapshot of every connected peer (what ``peerkit peers`` shows)."""
        return BrokerInfo(
            peers=[
                PeerInfo(
                    peer_id=c.peer_id,
                    subscriptions=self.routing.subscriptions_of(c.peer_id),
                    query_handlers=self.routing.handlers_of(c.peer_id),
                    queued=c.queued,
                    queued_bytes=c.queued_bytes,
                    dropped=c.dropped_total,
                    msgs_in=c.msgs_in,
                    msgs_out=c.msgs_out,
                    state=c.state,
                    base=c.base,
                    connected_at=c.connected_at,
                )
                for c in sorted(self._conns.values(), key=lambda c: c.peer_id)
            ],
            types=self._dispatcher.type_stats(),
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
            self._running = False
            self._listening = False
            for scope in self._handlers:
                scope.cancel(reason="broker shut down")
            self._finished.set()

    async def _serve_until_shutdown(self, task_status: trio.TaskStatus[Broker]) -> None:
        async with trio.open_nursery() as nursery:
            if self.listen:
                # trio's listeners, and each connection's WebSocket handshake through
                # trio-websocket's wrap_server_stream in a nursery of its own (see
                # _serve_stream): serve_websocket runs trio-websocket's reader tasks in the
                # server's nursery, where one raising (0.12.2 does, for a message over the
                # limit that arrives while the connection closes) would end the broker
                serve = (
                    functools.partial(
                        trio.serve_tcp, self._serve_stream, self._port, host=self.host
                    )
                    if self.ssl_context is None
                    else functools.partial(
                        trio.serve_ssl_over_tcp,
                        self._serve_stream,
                        self._port,
                        self.ssl_context,
                        host=self.host,
                        https_compatible=True,
                    )
                )
                listeners: list[trio.SocketListener | trio.SSLListener[trio.SocketStream]]
                listeners = await nursery.start(serve)
                self._port = _listener_port(listeners[0])
                self._listening = True
                log.info("broker listening on %s", self.url)
            self._running = True
            nursery.start_soon(self._monitor)
            task_status.started(self)
            await self._shutdown_requested.wait()
            await self._shutdown_peers()
            nursery.cancel_scope.cancel(reason="broker shut down")

    async def handle_request(self, request: trio_websocket.WebSocketRequest) -> None:
        """Serve one WebSocket request that an application's trio-websocket server
        received: accept it and route its peer's envelopes until the peer leaves.

        For a broker mounted on an application's server (``Broker(listen=False)``, though a
        listening broker takes requests this way too). Call it from the application's
        request handler (it returns when the connection ends); the broker must be running
        (``await nursery.start(broker.run)``): before that, and after it shut down, the
        request is rejected (HTTP 503) and :class:`PeerkitError` is raised.
        """
        if not self._running:
            what = "has shut down" if self._finished.is_set() else "is not running yet"
            with trio.move_on_after(self.grace_period):
                await request.reject(503, body=b"the peerkit broker is not running\n")
            raise PeerkitError(
                f"the broker {what}: start it with `await nursery.start(broker.run)` before "
                "handing it requests, and stop handing them over once it shut down"
            )
        await self._serve_request(request)

    def websocket_options(self) -> dict[str, Any]:
        """The trio-websocket settings the broker serves with: pass them to the
        application's ``serve_websocket`` (``**broker.websocket_options()``) when the broker
        is mounted, so that its connections get the same limits and buffers."""
        return {
            "message_queue_size": MESSAGE_QUEUE,
            "max_message_size": ws_max_frame(self.max_message_size),
            "receive_buffer_size": RECEIVE_BUFFER,
            "connect_timeout": self.handshake_timeout,
            "disconnect_timeout": self.grace_period,
        }

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
    async def _serve_stream(
        self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    ) -> None:
        """One accepted TCP (or TLS) connection of a listening broker: the WebSocket
        handshake (trio-websocket), then :meth:`_serve_request`. Whatever happens in it,
        trio-websocket's own tasks included, ends with this connection."""
        try:
            async with trio.open_nursery() as nursery:  # this connection's reader task
                request: trio_websocket.WebSocketRequest | None = None
                with trio.move_on_after(self.handshake_timeout):
                    request = await trio_websocket.wrap_server_stream(
                        nursery,
                        stream,
                        message_queue_size=MESSAGE_QUEUE,
                        max_message_size=ws_max_frame(self.max_message_size),
                        receive_buffer_size=RECEIVE_BUFFER,
                    )
                if request is not None:
                    await self._serve_request(request)
                nursery.cancel_scope.cancel(reason="the connection is served")
        except* (trio_websocket.ConnectionClosed, trio.BrokenResourceError, OSError):
            pass  # the peer went away
        except* Exception as group:
            log.error("connection handler failed (the broker carries on)", exc_info=group)
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_request(self, request: trio_websocket.WebSocketRequest) -> None:
        # This runs in the server's nursery (or the application's handler): an exception
        # escaping it would take the server down, so whatever one connection does ends here.
        with trio.CancelScope() as scope:
            self._handlers.add(scope)
            try:
                subprotocol = jsonwire.choose_subprotocol(request.proposed_subprotocols)
                if subprotocol is not None and not self._origin_allowed(request):
                    await request.reject(403, body=b"this page's origin may not connect\n")
                    return
                try:
                    ws = await request.accept(subprotocol=subprotocol)
                except (trio_websocket.ConnectionClosed, trio.BrokenResourceError, OSError):
                    return
                await self._serve_connection(ws, json=subprotocol is not None)
            finally:
                self._handlers.discard(scope)

    def _origin_allowed(self, request: trio_websocket.WebSocketRequest) -> bool:
        """A browser lets any web site's page open a WebSocket to any address, loopback
        included: without a token, a JSON (browser) connection is taken only from a page
        served from this machine (or from no page at all)."""
        if self.token is not None:
            return True  # the token authenticates, whatever page the peer runs in
        origins = [v for k, v in request.headers if k.lower() == b"origin"]
        if not origins:
            return True
        return is_loopback(urllib.parse.urlsplit(origins[0].decode("latin-1")).hostname or "")

    async def _serve_connection(
        self, ws: trio_websocket.WebSocketConnection, *, json: bool = False
    ) -> None:
        conn: Connection | None = None
        try:
            conn = await self._handshake(ws, json)
            if conn is None:
                return
            try:
                await conn.run(
                    self._dispatcher.dispatch,
                    self._batch_limit,
                    self.grace_period,
                    self.stall_timeout,
                )
            finally:
                self._remove(conn)
        except* (trio_websocket.ConnectionClosed, trio.BrokenResourceError, OSError):
            pass  # the peer went away; _remove() has dealt with it
        except* Exception as group:
            log.error("connection handler failed (the broker carries on)", exc_info=group)
        finally:
            with trio.move_on_after(self.grace_period) as cs:
                cs.shield = True
                if conn is not None and conn.close_reason is not None:
                    await ws.aclose(code=conn.close_code, reason=conn.close_reason[:120])
                else:
                    await ws.aclose()

    async def _handshake(
        self, ws: trio_websocket.WebSocketConnection, json: bool
    ) -> Connection | None:
        with trio.move_on_after(self.handshake_timeout):
            with self._waiting_for_hello() as waiting:
                try:
                    frame = await ws.get_message()
                except trio_websocket.ConnectionClosed:
                    return None
            if waiting.cancelled_caught:
                await self._reject(
                    ws,
                    "too_many_handshakes",
                    f"more than max_handshakes={self.limits.max_handshakes} connections were "
                    "waiting to say hello; this one waited longest (say hello at once)",
                    json,
                )
                return None
            if len(frame) > self.limits.max_hello_size:
                await self._reject(
                    ws,
                    "bad_hello",
                    f"the first message is {len(frame)} bytes, over the broker's "
                    f"max_hello_size of {self.limits.max_hello_size}; it must be a hello",
                    json,
                )
                return None
            conn = await self._accept_hello(ws, frame, json)
            if conn is not None:
                conn.max_bytes = self.limits.send_queue_bytes
            return conn
        await self._reject(ws, "bad_hello", f"no hello within {self.handshake_timeout} s", json)
        return None

    @contextlib.contextmanager
    def _waiting_for_hello(self) -> Iterator[trio.CancelScope]:
        """The scope of a connection's wait for its hello, one of at most
        ``max_handshakes``: a new one beyond that cancels the oldest's wait (strangers that
        hold the slots cannot keep a peer out, which says hello in milliseconds)."""
        waiting = self._waiting_hello
        while len(waiting) >= self.limits.max_handshakes:
            oldest = next(iter(waiting))
            del waiting[oldest]
            oldest.cancel(reason="too many connections waiting to say hello")
        with trio.CancelScope() as scope:
            waiting[scope] = None
            try:
                yield scope
            finally:
                waiting.pop(scope, None)

    async def _accept_hello(
        self, ws: trio_websocket.WebSocketConnection, frame: bytes | str, json: bool
    ) -> Connection | None:
        try:
            if isinstance(frame, str):
                frame = jsonwire.json_to_frame(frame, self.max_message_size)
            envs = list(codec.iter_envelopes(frame))
            if len(envs) != 1 or envs[0].kind != Kind.HELLO:
                raise DecodeError("the first frame must hold exactly one hello envelope")
            hello = codec.decode_body(Hello, envs[0].body)
            assert isinstance(hello, Hello)
        except (DecodeError, TypeError) as exc:
            await self._reject(ws, "bad_hello", f"bad handshake: {exc}", json)
            return None
        pid = hello.peer_id
        reject = admit(
            hello,
            token=self.token,
            connected={p: c.resume_token for p, c in self._conns.items()},
            max_peers=self.max_peers,
            shutting_down=self._shutting_down,
            max_id_length=self.limits.max_id_length,
        )
        if reject is None and pid in self._conns:  # the peer is back: its old connection goes
            stale = self._conns[pid]
            stale.kick("replaced by the same peer's new connection (it reconnected)")
            self._remove(stale, replaced=True)
        if reject is not None:
            log.warning("rejected peer %r: %s", pid, reject.detail)
            await self._reject(ws, reject.reason, reject.detail, json)
            return None
        conn = Connection(
            pid, ws, self.send_queue_size, json=json, max_message_size=self.max_message_size
        )
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
                    resume_token=conn.resume_token,
                ),
            )
        )
        resumed = bool(hello.resume_token)
        log.info("peer %r %s", pid, "reconnected" if resumed else "connected")
        joined = PeerJoined(peer_id=pid, resumed=resumed)
        self._dispatcher.publish(pid, _PEER_JOINED_TYPE, codec.encode_body(joined))
        return conn

    async def _reject(
        self, ws: trio_websocket.WebSocketConnection, reason: str, detail: str, json: bool
    ) -> None:
        frame = control(Kind.REJECT, Reject(reason=reason, detail=detail))
        with trio.move_on_after(self.grace_period):
            try:
                await ws.send_message(jsonwire.frame_to_json(frame) if json else frame)
                await ws.aclose(code=1008, reason=reason)
            except trio_websocket.ConnectionClosed:
                pass

    def _remove(self, conn: Connection, *, replaced: bool = False) -> None:
        """Forget ``conn`` (its routes; its pending queries fail at once) and tell the
        others it left, unless it is ``replaced`` by the same peer's new connection."""
        if self._conns.get(conn.peer_id) is not conn:
            return
        del self._conns[conn.peer_id]
        removal = self.routing.remove_peer(conn.peer_id)
        for pq in removal.orphaned_queries:
            self._dispatcher.query_failed(
                pq.asker,
                pq.asker_corr,
                QueryFailed(
                    code="handler_gone",
                    detail=f"peer {pq.handler!r} left before answering the {pq.msg_type!r} query",
                    peer_id=pq.handler,
                ),
            )
        if replaced:
            log.info("peer %r reconnected: its old connection is closed", conn.peer_id)
            return
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
            self._dispatcher.publish(
                conn.peer_id,
                _PANICK_TYPE,
                codec.encode_body(
                    PanickMsg(message=f"peer {conn.peer_id!r} {reason}", error_type="PeerLost")
                ),
            )
        self._dispatcher.publish(
            conn.peer_id,
            _PEER_LEFT_TYPE,
            codec.encode_body(
                PeerLeft(reason=reason, clean=conn.goodbye is not None, peer_id=conn.peer_id)
            ),
        )
        if not self._conns:
            self._all_gone.set()
        if self.on_peer_left is not None:
            self.on_peer_left(conn.peer_id, reason)

    # ---------------------------------------------------------------- liveness
    async def _monitor(self) -> None:
        """Send heartbeats to idle peers, drop peers that fell silent and fail the queries
        past their deadline."""
        beat = pack_envelope(int(Kind.HEARTBEAT), "", BROKER_ID)
        while True:
            await trio.sleep(self.heartbeat_interval)
            now = trio.current_time()
            self._dispatcher.expire_queries(now)
            for conn in list(self._conns.values()):
                conn.note_activity(now)
                if now - conn.last_seen >= self.heartbeat_timeout:
                    conn.kick(f"no heartbeat for {now - conn.last_seen:.1f} s", code=1001)
                elif not conn.out and now - conn.last_sent >= self.heartbeat_interval * 0.9:
                    conn.push(beat)  # only to peers that heard nothing else lately
