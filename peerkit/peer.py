"""The trio peer: one nursery, a strict lifecycle, and the messaging API."""

from __future__ import annotations

import collections
import inspect
import logging
import math
import ssl
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar

import attrs
import trio
import trio_websocket

from . import codec
from ._util import raise_single
from ._wsconf import MAX_BATCH, RECEIVE_BUFFER, batch_limit
from .codec import Envelope, control, pack_envelope
from .errors import (
    BrokerConnectError,
    BrokerLostError,
    BrokerRequestError,
    DecodeError,
    DuplicatePeerId,
    HandlerAlreadyRegistered,
    HandlerGoneError,
    HandshakeRejected,
    MultiplePeersAvailable,
    NoHandlerError,
    NotConnectedException,
    PeerkitError,
    QueryAnswerUnknown,
    QueryTimeout,
    RemoteError,
    ShuttingDownException,
)
from .messages import (
    BrokerGoodbyeMsg,
    Message,
    MessagesDropped,
    OkMsg,
    PanickMsg,
    PeerControlMessage,
    message_type_of,
)
from .protocol import (
    PROTOCOL_VERSION,
    SHARE_POLICIES,
    BrokerInfo,
    Hello,
    Kind,
    PeerStateReport,
    QueryFailed,
    RegisterHandler,
    Reject,
    RequestFailed,
    Welcome,
)
from .states import PeerState, StateMachine

__all__ = ["Peer", "query_handler", "subscribe"]

log = logging.getLogger("peerkit.peer")

M = TypeVar("M", bound=Message)
F = TypeVar("F", bound=Callable[..., Any])
Handler = Callable[[Any], Any]

#: How large a frame the peer accepts from the broker (the broker enforces message sizes).
_PEER_WS_MAX_FRAME = 256 * 1024 * 1024
_PUB = int(Kind.PUB)
_DROPPED_TYPE = MessagesDropped.message_type()
#: send_message yields to the scheduler once this many envelopes wait to be written
_YIELD_EVERY = 64


# ------------------------------------------------------------------ decorators


def subscribe(msg_type: type[Message], *, sender: str | None = None) -> Callable[[F], F]:
    """Declare a method as a handler of ``msg_type`` (from ``sender``, or from everyone).

    The peer subscribes it once connected, before ``run()`` reports the peer started.
    """
    message_type_of(msg_type)  # fail early for an unregistered class

    def deco(fn: F) -> F:
        fn.__dict__.setdefault("__peerkit_subscribe__", []).append((msg_type, sender))
        return fn

    return deco


def query_handler(msg_type: type[Message], *, policy: str = "exclusive") -> Callable[[F], F]:
    """Declare a method as the query handler of ``msg_type`` (it returns the response)."""
    message_type_of(msg_type)
    if policy not in SHARE_POLICIES:
        raise PeerkitError(f"policy must be one of {', '.join(SHARE_POLICIES)}, not {policy!r}")

    def deco(fn: F) -> F:
        fn.__dict__["__peerkit_query__"] = (msg_type, policy)
        return fn

    return deco


# ------------------------------------------------------------------ internals


@attrs.define(eq=False)
class _Sub:
    msg_type: str
    sender: str | None
    handler: Handler | None = None
    channel: trio.MemorySendChannel[Any] | None = None


@attrs.define(eq=False)
class _Pending:
    event: trio.Event = attrs.field(factory=trio.Event)
    envelope: Envelope | None = None
    error: BaseException | None = None


def _check_seconds(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not value > 0
        or (isinstance(value, float) and math.isnan(value))
    ):
        raise PeerkitError(f"{name} must be a positive number of seconds, got {value!r}")


class Peer(StateMachine):
    """A peer: one trio nursery, a strict lifecycle and typed messaging through a broker.

    ``await nursery.start(peer.run)`` returns once the peer is connected; ``run()`` returns
    when the peer is finished and re-raises the error that killed it, if any.
    ``async with peer:`` owns the nursery and shuts the peer down gracefully on exit.

    Options: ``token`` (the broker's shared secret), ``ssl_context`` (for ``wss://``),
    ``connect_timeout`` (seconds to reach the broker, retrying while it is not up yet),
    ``request_timeout`` (broker acknowledgements), ``query_timeout`` (default for
    :meth:`query`), ``send_timeout`` (how long :meth:`send_message` waits for room in a full
    queue), ``grace_period`` (bound on the graceful part of shutdown), ``send_queue_size``,
    ``receive_queue_size`` (messages waiting for handlers; overflow drops and counts),
    ``max_concurrent_queries`` (query handlers running at once), ``is_essential``.
    """

    #: Whether the experiment stops when this peer panics (reported in ``PanickMsg``).
    is_essential: bool = True

    _declared_subs: tuple[tuple[str, type[Message], str | None], ...] = ()
    _declared_queries: tuple[tuple[str, type[Message], str], ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        subs: list[tuple[str, type[Message], str | None]] = []
        queries: list[tuple[str, type[Message], str]] = []
        seen: set[str] = set()
        for klass in cls.__mro__:
            for name, value in vars(klass).items():
                if name in seen:
                    continue
                seen.add(name)
                for msg_type, sender in getattr(value, "__peerkit_subscribe__", ()):
                    subs.append((name, msg_type, sender))
                q = getattr(value, "__peerkit_query__", None)
                if q is not None:
                    queries.append((name, q[0], q[1]))
        cls._declared_subs = tuple(subs)
        cls._declared_queries = tuple(queries)

    def __init__(
        self,
        broker_url: str,
        peer_id: str | None = None,
        *,
        autostart: bool = True,
        autoshutdown: bool = True,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 10.0,
        request_timeout: float = 10.0,
        query_timeout: float = 10.0,
        send_timeout: float = 10.0,
        grace_period: float = 2.0,
        send_queue_size: int = 10_000,
        receive_queue_size: int = 10_000,
        max_concurrent_queries: int = 16,
        is_essential: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(broker_url, str) or not broker_url.startswith(("ws://", "wss://")):
            raise PeerkitError(
                f"broker_url must be a ws:// or wss:// URL such as ws://127.0.0.1:8765, "
                f"got {broker_url!r}"
            )
        if peer_id is None:
            peer_id = f"{type(self).__name__.lower()}-{uuid.uuid4().hex[:8]}"
        if not isinstance(peer_id, str) or not peer_id or not peer_id.isprintable():
            raise PeerkitError(f"peer_id must be a non-empty printable string, got {peer_id!r}")
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("request_timeout", request_timeout),
            ("query_timeout", query_timeout),
            ("send_timeout", send_timeout),
            ("grace_period", grace_period),
        ):
            _check_seconds(name, value)
        for name, ivalue in (
            ("send_queue_size", send_queue_size),
            ("receive_queue_size", receive_queue_size),
            ("max_concurrent_queries", max_concurrent_queries),
        ):
            if not isinstance(ivalue, int) or isinstance(ivalue, bool) or ivalue < 1:
                raise PeerkitError(f"{name} must be a positive integer, got {ivalue!r}")
        self.broker_url = broker_url
        self.peer_id = peer_id
        self.autostart = autostart
        self.autoshutdown = autoshutdown
        self.token = token
        self.ssl_context = ssl_context
        self.connect_timeout = float(connect_timeout)
        self.request_timeout = float(request_timeout)
        self.query_timeout = float(query_timeout)
        self.send_timeout = float(send_timeout)
        self.grace_period = float(grace_period)
        self.send_queue_size = send_queue_size
        self.receive_queue_size = receive_queue_size
        self.max_concurrent_queries = max_concurrent_queries
        if is_essential is not None:
            self.is_essential = is_essential

        # statistics (read freely)
        self.msgs_in = 0
        self.msgs_out = 0
        #: messages lost for this peer: reported by the broker or dropped locally
        self.dropped_messages = 0
        self.decode_errors = 0

        self._error: BaseException | None = None
        self._run_started = False
        self._run_task: trio.lowlevel.Task | None = None
        self._main_scope = trio.CancelScope()
        self._finished_event = trio.Event()
        self._state_lot = trio.lowlevel.ParkingLot()
        self._queued_tasks: list[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]] = []
        self._user_nursery: trio.Nursery | None = None
        self._lifecycle_lock = trio.Lock()
        self._stop_on_shutdown = False
        self._cm_nursery: Any = None

        self._ws: trio_websocket.WebSocketConnection | None = None
        self._link_ok = False
        self._welcome: Welcome | None = None
        self._max_message_size = codec.DEFAULT_MAX_MESSAGE_SIZE
        self._out: collections.deque[bytes] = collections.deque()
        self._out_ready = trio.Event()
        self._progress = trio.lowlevel.ParkingLot()
        self._enqueued = 0
        self._sent = 0
        self._next_corr = 1
        self._pending: dict[int, _Pending] = {}

        self._subs: dict[str, list[_Sub]] = {}
        self._sub_refs: collections.Counter[tuple[str, str | None]] = collections.Counter()
        self._query_handlers: dict[str, Handler] = {}
        self._builtin_queries: dict[str, Handler] = {
            PeerControlMessage.message_type(): self._on_control_query,
        }
        self._inbox: collections.deque[tuple[str, str, bytes]] = collections.deque()
        self._inbox_ready = trio.Event()
        self._local_drops = 0
        self._query_send, self._query_recv = trio.open_memory_channel[Envelope](
            max_concurrent_queries * 4
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.peer_id!r} {self.state}>"

    # ================================================================ hooks
    async def _connections_established(self) -> None:
        """Called once connected (handlers declared with decorators are subscribed).

        Do set-up that talks to other peers here; the peer becomes ready afterwards.
        """

    async def _start(self) -> None:
        """Called by :meth:`start` (ready → running). Spawn the main work with create_task."""

    async def _stop(self) -> None:
        """Called by :meth:`stop` (running → ready) and when a running peer shuts down."""

    async def _shutting_down(self) -> None:
        """Called once during shutdown, after the peer's tasks were cancelled and while the
        connection is still open (queries still work); bounded by ``grace_period``."""

    def _messages_dropped(self, count: int) -> None:
        """Called when ``count`` messages meant for this peer were lost (queue overflow)."""
        log.warning(
            "peer %r lost %d messages: it receives faster than its handlers run "
            "(total %d, see peer.dropped_messages)",
            self.peer_id,
            count,
            self.dropped_messages,
        )

    async def _become_ready(self) -> None:
        """Everything between connected and ready; subclasses extend it (ConfiguredPeer)."""
        await self._connections_established()

    # ============================================================ lifecycle
    def _state_changed(self, old: PeerState, new: PeerState) -> None:
        log.debug("peer %r: %s -> %s", self.peer_id, old, new)
        self._state_lot.unpark_all()
        if self._link_ok and new is not PeerState.finished:
            self._push(control(Kind.STATE, PeerStateReport(state=new.value)))

    async def wait_for_state(self, predicate: Callable[[Peer], bool], timeout: float) -> None:
        """Wait until ``predicate(peer)`` holds, e.g. ``lambda p: p.is_ready``.

        Raises :class:`TimeoutError` (trio.TooSlowError) after ``timeout`` seconds.
        """
        with trio.fail_after(timeout):
            while not predicate(self):
                if self.is_finished:
                    raise PeerkitError(f"peer {self.peer_id!r} finished while waiting")
                await self._state_lot.park()

    async def wait_finished(self) -> None:
        """Wait until the peer is finished (no error is raised here; ``run()`` raises it)."""
        await self._finished_event.wait()

    @property
    def error(self) -> BaseException | None:
        """The error that killed the peer, if any."""
        return self._error

    def create_task(self, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``async_fn(*args)`` in the peer's nursery.

        Allowed from initializing on (queued until ``run`` starts); refused with
        :class:`ShuttingDownException` once shutdown has begun. An exception escaping the
        task shuts the peer down with that error (``PanickMsg``, goodbye, ``run()`` raises).
        """
        if self.is_shutting_down:
            raise ShuttingDownException(
                f"peer {self.peer_id!r} is shutting down; create_task() is refused"
            )
        if not callable(async_fn):
            raise PeerkitError(f"create_task needs an async function, got {async_fn!r}")
        if self._user_nursery is None:
            self._queued_tasks.append((async_fn, args))
        else:
            self._user_nursery.start_soon(
                self._guarded, async_fn, *args, name=getattr(async_fn, "__qualname__", None)
            )

    async def _guarded(self, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        try:
            await async_fn(*args)
        except ShuttingDownException:
            if not self.is_shutting_down:
                raise  # not ours: a bug somewhere, let it be seen
            # the task raced the shutdown (e.g. sent a message as it began): not an error
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
            log.error("peer %r failed: %s: %s", self.peer_id, type(exc).__name__, exc, exc_info=exc)
        else:
            log.error("peer %r: another error while shutting down: %r", self.peer_id, exc)
        self._request_shutdown(f"{type(exc).__name__} in peer {self.peer_id!r}")

    def _request_shutdown(self, reason: str) -> None:
        if self.is_finished:
            return
        if not self.is_shutting_down:
            self._stop_on_shutdown = self.is_running
            self._state = PeerState.shutting_down
        self._main_scope.cancel(reason=reason)

    async def start(self) -> None:
        """ready → running (calls ``_start()``). Idempotent."""
        self._refuse_when_shutting_down("start")
        if self.is_running:
            return
        if not self.is_ready:
            raise PeerkitError(
                f"peer {self.peer_id!r} cannot start before it is ready (it is {self.state})"
            )
        async with self._lifecycle_lock:
            if self.is_running or self.is_shutting_down:
                return
            await self._start()
            if not self.is_shutting_down:
                self._state = PeerState.running

    async def stop(self) -> None:
        """running → ready (calls ``_stop()``); then shuts down if ``autoshutdown``.
        Idempotent."""
        self._refuse_when_shutting_down("stop")
        if not self.is_running:
            return
        async with self._lifecycle_lock:
            if not self.is_running:
                return
            await self._stop()
            if not self.is_shutting_down:
                self._state = PeerState.ready
        if self.autoshutdown:
            await self.async_shutdown()

    async def async_shutdown(self) -> None:
        """Shut the peer down gracefully. Idempotent; safe from the peer's own tasks.

        From outside the peer it returns when the peer is finished (bounded by the grace
        period); from inside, the calling task is cancelled with the rest.
        """
        if self.is_finished:
            await trio.lowlevel.checkpoint()
            return
        if not self._run_started:
            if not self.is_shutting_down:
                self._state = PeerState.shutting_down
            self._state = PeerState.finished
            self._finished_event.set()
            await trio.lowlevel.checkpoint()
            return
        self._request_shutdown("async_shutdown() was called")
        if self._inside():
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(self.grace_period + self.request_timeout):
            await self._finished_event.wait()

    def _inside(self) -> bool:
        task: trio.lowlevel.Task | None = trio.lowlevel.current_task()
        while task is not None:
            if task is self._run_task:
                return True
            nursery = task.parent_nursery
            task = nursery.parent_task if nursery is not None else None
        return False

    def _refuse_when_shutting_down(self, what: str) -> None:
        if self.is_shutting_down:
            raise ShuttingDownException(f"peer {self.peer_id!r} is shutting down; {what} refused")

    def _require_connected(self, what: str) -> None:
        self._refuse_when_shutting_down(what)
        if not self.is_connected:
            raise NotConnectedException(
                f"peer {self.peer_id!r} is not connected yet ({self.state}); {what} needs a "
                "connection: start the peer with nursery.start(peer.run) or `async with peer`"
            )

    # ================================================================== run
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, live, and return when finished; re-raises the error that killed the peer.

        Compatible with ``nursery.start``: started once connected.
        """
        if self._run_started:
            raise PeerkitError(
                f"Peer.run() was already called for {self.peer_id!r}; "
                "a peer runs once, create a new one"
            )
        self._run_started = True
        self._run_task = trio.lowlevel.current_task()
        try:
            # The connection tasks are shielded from outside cancellation so that a cancelled
            # peer still says goodbye within its grace period; the watcher turns outside
            # cancellation into a shutdown request instead.
            async with trio.open_nursery() as outer:
                outer.start_soon(self._watch_outer_cancel)
                with trio.CancelScope(shield=True):
                    async with trio.open_nursery() as sysn:
                        with self._main_scope:
                            await self._live(sysn, task_status)
                        self._user_nursery = None
                        await self._close_gracefully()
                        sysn.cancel_scope.cancel(reason=f"peer {self.peer_id!r} finished")
                outer.cancel_scope.cancel(reason=f"peer {self.peer_id!r} finished")
        except BaseExceptionGroup as group:
            raise_single(group)
            raise
        finally:
            self._user_nursery = None
            self._link_ok = False
            if not self.is_shutting_down:
                self._state = PeerState.shutting_down
            self._state = PeerState.finished
            for pending in self._pending.values():
                pending.error = BrokerLostError(f"peer {self.peer_id!r} finished")
                pending.event.set()
            self._finished_event.set()
            log.info(
                "peer %r finished%s",
                self.peer_id,
                f" with error {self._error!r}" if self._error else "",
            )
        if self._error is not None:
            raise self._error

    async def _watch_outer_cancel(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._request_shutdown("the nursery running the peer was cancelled")

    async def _live(self, sysn: trio.Nursery, task_status: trio.TaskStatus[None]) -> None:
        try:
            await self._connect(sysn)
        except (PeerkitError, OSError, trio.TooSlowError) as exc:
            self._fail(exc)
            return
        self._state = PeerState.connected
        self._link_ok = True
        self._push(control(Kind.STATE, PeerStateReport(state="connected")))
        sysn.start_soon(self._sys_guarded, self._reader)
        sysn.start_soon(self._sys_guarded, self._writer)
        sysn.start_soon(self._sys_guarded, self._heartbeat)
        async with trio.open_nursery() as usern:
            self._user_nursery = usern
            usern.start_soon(self._guarded, self._dispatcher)
            for _ in range(self.max_concurrent_queries):
                usern.start_soon(self._guarded, self._query_worker)
            await self._register_declared()
            queued, self._queued_tasks = self._queued_tasks, []
            for fn, args in queued:
                usern.start_soon(self._guarded, fn, *args)
            task_status.started()
            usern.start_soon(self._guarded, self._lifecycle)
            await trio.sleep_forever()

    async def _lifecycle(self) -> None:
        await self._become_ready()
        if self.is_shutting_down:
            return
        self._state = PeerState.ready
        if self.autostart:
            await self.start()

    async def _sys_guarded(self, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except trio_websocket.ConnectionClosed as exc:
            self._link_ok = False
            if not self.is_shutting_down:
                reason = exc.reason
                self._fail(
                    BrokerLostError(
                        f"the broker closed the connection of {self.peer_id!r} "
                        f"(code {getattr(reason, 'code', '?')}: {getattr(reason, 'reason', '')})"
                    )
                )
        except Exception as exc:
            self._link_ok = False
            if not self.is_shutting_down or self._error is None:
                self._fail(exc)

    async def _close_gracefully(self) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.grace_period
            if self._stop_on_shutdown:
                await self._guarded(self._stop)
            await self._guarded(self._shutting_down)
            if self._link_ok:
                error = self._error
                if error is not None:
                    panick = PanickMsg(
                        message=str(error),
                        error_type=type(error).__name__,
                        was_essential=self.is_essential,
                    )
                    self._push(
                        pack_envelope(
                            _PUB, PanickMsg.message_type(), "", 0, "", codec.encode_body(panick)
                        )
                    )
                goodbye = BrokerGoodbyeMsg(
                    error_msg=None if error is None else f"{type(error).__name__}: {error}"
                )
                self._push(control(Kind.GOODBYE, goodbye))
                await self._flush()
            if self._ws is not None:
                await self._ws.aclose()
            if scope.cancelled_caught:
                log.warning(
                    "peer %r: graceful shutdown took longer than %s s",
                    self.peer_id,
                    self.grace_period,
                )

    # ============================================================ connection
    async def _open_websocket(self, nursery: trio.Nursery) -> trio_websocket.WebSocketConnection:
        url = urllib.parse.urlsplit(self.broker_url)
        host = url.hostname or "127.0.0.1"
        port = url.port or (443 if url.scheme == "wss" else 80)
        tcp = await trio.open_tcp_stream(host, port)
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = tcp
        if url.scheme == "wss":
            context = self.ssl_context or ssl.create_default_context()
            tls = trio.SSLStream(tcp, context, server_hostname=host, https_compatible=True)
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                await trio.aclose_forcefully(tcp)
                raise BrokerConnectError(
                    f"TLS handshake with the broker at {self.broker_url} failed: "
                    f"{exc.__cause__ or exc}; pass an ssl_context that trusts the broker's "
                    "certificate"
                ) from exc
            stream = tls
        resource = (url.path or "/") + (f"?{url.query}" if url.query else "")
        return await trio_websocket.wrap_client_stream(
            nursery,
            stream,
            url.netloc,
            resource,
            max_message_size=_PEER_WS_MAX_FRAME,
            message_queue_size=4,
            receive_buffer_size=RECEIVE_BUFFER,
        )

    async def _connect(self, nursery: trio.Nursery) -> None:
        deadline = trio.current_time() + self.connect_timeout
        delay = 0.05
        with trio.move_on_at(deadline) as scope:
            while True:
                try:
                    ws = await self._open_websocket(nursery)
                    break
                except (OSError, trio_websocket.HandshakeError) as exc:
                    if isinstance(exc, trio_websocket.ConnectionRejected):
                        raise BrokerConnectError(
                            f"the server at {self.broker_url} refused the WebSocket connection "
                            f"(HTTP {exc.status_code}); is it a peerkit broker?"
                        ) from exc
                    log.debug("broker at %s not reachable yet: %s", self.broker_url, exc)
                    last_error: BaseException = exc
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)
            self._ws = ws
            hello = Hello(
                peer_id=self.peer_id, protocol_version=PROTOCOL_VERSION, token=self.token or ""
            )
            try:
                await ws.send_message(control(Kind.HELLO, hello))
                frame = await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                raise BrokerConnectError(
                    f"the broker at {self.broker_url} closed the connection during the "
                    f"handshake: {exc.reason}"
                ) from None
            envs = list(codec.iter_envelopes(frame))  # type: ignore[arg-type]
            if not envs:
                raise BrokerConnectError("empty handshake answer from the broker")
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
            self._welcome = welcome
            self._max_message_size = welcome.max_message_size
            for env in envs[1:]:
                self._handle(env)
            return
        if scope.cancelled_caught:
            detail = f": {last_error}" if "last_error" in locals() else ""
            raise BrokerConnectError(
                f"could not connect to the broker at {self.broker_url} within "
                f"{self.connect_timeout} s{detail}; is it running? (raise connect_timeout "
                "to wait longer)"
            )

    async def _register_declared(self) -> None:
        await self._subscribe(PeerControlMessage, None, self._on_control)
        for name, msg_type, sender in self._declared_subs:
            await self._subscribe(msg_type, sender, getattr(self, name))
        for name, msg_type, policy in self._declared_queries:
            await self.register_query_handler(msg_type, getattr(self, name), policy=policy)

    # ---------------------------------------------------------- outgoing
    def _push(self, data: bytes) -> None:
        self._out.append(data)
        self._enqueued += 1
        self._out_ready.set()

    async def _flush(self) -> None:
        target = self._enqueued
        while self._sent < target and self._link_ok:
            await self._progress.park()

    async def _writer(self) -> None:
        assert self._ws is not None
        ws = self._ws
        out = self._out
        limit = batch_limit(self._max_message_size)
        while True:
            await self._out_ready.wait()
            self._out_ready = trio.Event()
            while out:
                if len(out) == 1:
                    data = out.popleft()
                    count = 1
                else:
                    parts: list[bytes] = []
                    size = 0
                    while out and size < limit and len(parts) < MAX_BATCH:
                        item = out.popleft()
                        parts.append(item)
                        size += len(item)
                    data = b"".join(parts)
                    count = len(parts)
                await ws.send_message(data)
                self._sent += count
                self.msgs_out += count
                self._progress.unpark_all()

    async def _heartbeat(self) -> None:
        assert self._welcome is not None
        interval = self._welcome.heartbeat_interval
        beat = pack_envelope(int(Kind.HEARTBEAT))
        last = self._enqueued
        while True:
            await trio.sleep(interval)
            if self._enqueued == last:
                self._push(beat)
            last = self._enqueued

    # ---------------------------------------------------------- incoming
    async def _reader(self) -> None:
        assert self._ws is not None and self._welcome is not None
        ws = self._ws
        timeout = self._welcome.heartbeat_timeout
        while True:
            with trio.move_on_after(timeout) as scope:
                frame = await ws.get_message()
            if scope.cancelled_caught:
                raise BrokerLostError(
                    f"no word from the broker at {self.broker_url} for {timeout} s"
                )
            try:
                for env in codec.iter_envelopes(frame):  # type: ignore[arg-type]
                    self._handle(env)
            except DecodeError as exc:
                log.error("peer %r: bad frame from the broker: %s", self.peer_id, exc)
            if self._local_drops:
                count, self._local_drops = self._local_drops, 0
                self._messages_dropped(count)

    def _handle(self, env: Envelope) -> None:
        kind = env.kind
        if kind == _PUB:
            self.msgs_in += 1
            if self.is_shutting_down:
                return
            self._deliver((env.type, env.sender, env.body))
        elif kind in (Kind.ACK, Kind.NACK, Kind.REPLY, Kind.QERR):
            pending = self._pending.get(env.corr)
            if pending is not None:
                pending.envelope = env
                pending.event.set()
        elif kind == Kind.QUERY:
            if self.is_shutting_down:
                self._query_error(env, "handler_gone", f"peer {self.peer_id!r} is shutting down")
                return
            try:
                self._query_send.send_nowait(env)
            except trio.WouldBlock:
                self._query_error(
                    env,
                    "busy",
                    f"peer {self.peer_id!r} has too many queries "
                    "in progress; raise max_concurrent_queries or retry",
                )
        elif kind == Kind.HEARTBEAT:
            pass
        elif kind == Kind.DROPPED:
            try:
                dropped = codec.decode_body(MessagesDropped, env.body)
                assert isinstance(dropped, MessagesDropped)
                count = dropped.count
            except DecodeError:
                count = 0
            self.dropped_messages += count
            self._messages_dropped(count)
            if _DROPPED_TYPE in self._subs:
                self._deliver((_DROPPED_TYPE, "broker", env.body))
        elif kind == Kind.SHUTDOWN:
            log.info("peer %r: the broker is shutting down", self.peer_id)
            self._request_shutdown("the broker is shutting down")
        elif kind == Kind.ERROR:
            try:
                failure = codec.decode_body(RequestFailed, env.body)
                assert isinstance(failure, RequestFailed)
                text = f"{failure.code}: {failure.detail}"
            except DecodeError:
                text = "(unreadable error)"
            log.error("peer %r: the broker refused something we sent: %s", self.peer_id, text)
        else:
            log.error(
                "peer %r: unexpected envelope %s from the broker", self.peer_id, Kind(kind).name
            )

    def _deliver(self, item: tuple[str, str, bytes]) -> None:
        """Queue an incoming message for the handlers; drop and count when full."""
        if len(self._inbox) >= self.receive_queue_size:
            self.dropped_messages += 1
            self._local_drops += 1  # reported once per frame by the reader
            return
        self._inbox.append(item)
        self._inbox_ready.set()

    async def _dispatcher(self) -> None:
        """Run the handlers one message at a time, in arrival order.

        Works through whatever is queued as one batch, then yields to the scheduler.
        """
        inbox = self._inbox
        while True:
            if not inbox:
                ready = self._inbox_ready = trio.Event()
                await ready.wait()
                continue
            for _ in range(len(inbox)):
                msg_type, sender, body = inbox.popleft()
                subs = self._subs.get(msg_type)
                if subs:
                    await self._dispatch_one(subs, msg_type, sender, body)
            await trio.lowlevel.checkpoint()

    async def _dispatch_one(
        self, subs: list[_Sub], msg_type: str, sender: str, body: bytes
    ) -> None:
        try:
            msg = codec.decode_message(msg_type, body, sender)
        except DecodeError as exc:
            self.decode_errors += 1
            log.error("peer %r: dropped an undecodable message: %s", self.peer_id, exc)
            return
        for sub in tuple(subs) if len(subs) > 1 else subs:
            if sub.sender is not None and sub.sender != sender:
                continue
            if sub.channel is not None:
                try:
                    await sub.channel.send(msg)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._drop_sub(sub)
            else:
                result = sub.handler(msg)  # type: ignore[misc]
                if result is not None and inspect.isawaitable(result):
                    await result

    # ============================================================= pub/sub
    async def send_message(self, msg: Message) -> None:
        """Publish ``msg`` to every subscriber of its type (through the broker).

        Messages from one peer reach each subscriber in the order sent. Waits (up to
        ``send_timeout``) when the outgoing queue is full.
        """
        self._require_connected("send_message")
        body = codec.encode_body(msg, self._max_message_size)
        # encode_body checked the class is registered: its type name is safe to read
        data = pack_envelope(_PUB, type(msg).__message_type__, "", 0, "", body)
        if len(self._out) >= self.send_queue_size:
            try:
                with trio.fail_after(self.send_timeout):
                    while len(self._out) >= self.send_queue_size and self._link_ok:
                        await self._progress.park()
            except trio.TooSlowError:
                raise PeerkitError(
                    f"peer {self.peer_id!r}: outgoing queue full for {self.send_timeout} s "
                    "(the broker is not reading); raise send_queue_size or send less"
                ) from None
            self._require_connected("send_message")
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        self._push(data)
        if len(self._out) >= _YIELD_EVERY:
            # let the writer batch what is queued; a lone message goes out at the caller's
            # next yield (at once, in practice)
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def subscribe_for_all_msg_subtype(
        self, msg_type: type[M], handler: Callable[[M], Any]
    ) -> None:
        """Call ``handler(msg)`` for every ``msg_type`` message, from every sender.

        Returns once the broker has the subscription.
        """
        await self._subscribe(msg_type, None, handler)

    async def subscribe_for_specific_msg_subtype(
        self, msg_type: type[M], sender_id: str, handler: Callable[[M], Any]
    ) -> None:
        """Call ``handler(msg)`` for ``msg_type`` messages sent by ``sender_id`` only."""
        if not isinstance(sender_id, str) or not sender_id:
            raise PeerkitError(f"sender_id must be a peer id, got {sender_id!r}")
        await self._subscribe(msg_type, sender_id, handler)

    async def _subscribe(
        self,
        msg_type: type[Message],
        sender: str | None,
        target: Handler | trio.MemorySendChannel[Any],
    ) -> _Sub:
        self._require_connected("subscribing")
        type_name = message_type_of(msg_type)
        if isinstance(target, trio.MemorySendChannel):
            sub = _Sub(type_name, sender, channel=target)
        elif callable(target):
            sub = _Sub(type_name, sender, handler=target)
        else:
            raise PeerkitError(f"a handler must be callable, got {target!r}")
        key = (type_name, sender)
        self._subs.setdefault(type_name, []).append(sub)
        self._sub_refs[key] += 1
        if self._sub_refs[key] == 1:
            try:
                await self._request(Kind.SUB, type_name, target=sender or "")
            except BaseException:
                self._drop_sub(sub, tell_broker=False)
                raise
        return sub

    def _drop_sub(self, sub: _Sub, *, tell_broker: bool = True) -> bool:
        subs = self._subs.get(sub.msg_type)
        if subs is None or sub not in subs:
            return False
        subs.remove(sub)
        if not subs:
            del self._subs[sub.msg_type]
        key = (sub.msg_type, sub.sender)
        self._sub_refs[key] -= 1
        if self._sub_refs[key] <= 0:
            del self._sub_refs[key]
            if tell_broker and self._link_ok and not self.is_shutting_down:
                self._push(pack_envelope(int(Kind.UNSUB), sub.msg_type, "", 0, sub.sender or ""))
        return True

    async def unsubscribe(
        self, msg_type: type[Message], handler: Handler | None = None, *, sender: str | None = None
    ) -> int:
        """Remove subscriptions to ``msg_type`` (those of ``handler`` if given, for
        ``sender`` if given); returns how many were removed."""
        type_name = message_type_of(msg_type)
        removed = 0
        for sub in list(self._subs.get(type_name, ())):
            if handler is not None and sub.handler != handler:
                continue
            if sender is not None and sub.sender != sender:
                continue
            if self._drop_sub(sub):
                removed += 1
        await trio.lowlevel.checkpoint()
        return removed

    @asynccontextmanager
    async def subscription(
        self, msg_type: type[M], *, sender: str | None = None, buffer: int = 100
    ) -> AsyncIterator[trio.MemoryReceiveChannel[M]]:
        """Pull form: ``async with peer.subscription(T) as stream: async for msg in stream``.

        ``buffer`` messages wait in the stream; when it is full the peer's handlers wait
        for the consumer (and the broker drops and reports beyond its own queue).
        """
        send, recv = trio.open_memory_channel[M](buffer)
        sub = await self._subscribe(msg_type, sender, send)
        try:
            async with recv:
                yield recv
        finally:
            self._drop_sub(sub)
            send.close()

    # ============================================================== queries
    async def register_query_handler(
        self, msg_type: type[Message], handler: Handler, *, policy: str = "exclusive"
    ) -> None:
        """Answer ``msg_type`` queries with ``handler(msg) -> response message``.

        A second handler of the same type (any peer) is refused unless all use the same
        ``policy``: ``"round_robin"`` (the broker alternates) or ``"explicit"`` (queries
        raise :class:`MultiplePeersAvailable`; use :meth:`ask_peer`).
        """
        self._require_connected("register_query_handler")
        type_name = message_type_of(msg_type)
        if not callable(handler):
            raise PeerkitError(f"a query handler must be callable, got {handler!r}")
        if type_name in self._query_handlers:
            raise HandlerAlreadyRegistered(
                "already_registered",
                f"peer {self.peer_id!r} already has a handler for {type_name!r}; "
                "unregister_query_handler() first",
            )
        self._query_handlers[type_name] = handler
        try:
            await self._request(
                Kind.REG,
                "",
                body=codec.encode_body(RegisterHandler(msg_type=type_name, policy=policy)),
            )
        except BaseException:
            self._query_handlers.pop(type_name, None)
            raise

    async def unregister_query_handler(self, msg_type: type[Message]) -> None:
        """Stop answering ``msg_type`` queries."""
        type_name = message_type_of(msg_type)
        if self._query_handlers.pop(type_name, None) is None:
            raise PeerkitError(f"peer {self.peer_id!r} has no handler for {type_name!r}")
        if self._link_ok and not self.is_shutting_down:
            await self._request(Kind.UNREG, type_name)

    async def query(self, msg: Message, timeout: float | None = None) -> Message:
        """Ask whichever peer handles ``type(msg)`` and return its response.

        Raises :class:`NoHandlerError`, :class:`RemoteError`, :class:`HandlerGoneError`,
        :class:`MultiplePeersAvailable` or :class:`QueryTimeout` (all
        :class:`QueryAnswerUnknown`).
        """
        return await self._ask("", msg, timeout)

    async def ask_peer(self, peer_id: str, msg: Message, timeout: float | None = None) -> Message:
        """Ask the named peer (it answers with its query handler for ``type(msg)``)."""
        if not isinstance(peer_id, str) or not peer_id:
            raise PeerkitError(f"peer_id must be a peer id, got {peer_id!r}")
        return await self._ask(peer_id, msg, timeout)

    async def _ask(self, target: str, msg: Message, timeout: float | None) -> Message:
        if not self.is_connected and not (self.is_shutting_down and self._link_ok):
            self._require_connected("query")
        if timeout is None:
            timeout = self.query_timeout
        _check_seconds("timeout", timeout)
        type_name = msg.message_type()
        body = codec.encode_body(msg, self._max_message_size)
        env = await self._roundtrip(
            Kind.QUERY,
            type_name,
            target,
            body,
            timeout,
            what=f"query {type_name!r}" + (f" to {target!r}" if target else ""),
        )
        if env.kind == Kind.REPLY:
            return codec.decode_message(env.type, env.body, env.sender)
        try:
            failure = codec.decode_body(QueryFailed, env.body)
            assert isinstance(failure, QueryFailed)
        except DecodeError as exc:
            raise QueryAnswerUnknown(f"unreadable query error: {exc}") from None
        code, detail = failure.code, failure.detail
        if code == "no_handler":
            raise NoHandlerError(detail)
        if code == "handler_gone":
            raise HandlerGoneError(detail)
        if code == "remote_error":
            raise RemoteError(failure.peer_id, failure.error_type, detail)
        if code == "multiple":
            raise MultiplePeersAvailable(type_name, failure.peers)
        raise QueryAnswerUnknown(f"{code}: {detail}")

    async def broker_info(self) -> BrokerInfo:
        """The broker's view of every connected peer (subscriptions, handlers, state)."""
        self._require_connected("broker_info")
        env = await self._roundtrip(
            Kind.INFO, "", "", b"", self.request_timeout, what="broker info"
        )
        info = codec.decode_body(BrokerInfo, env.body)
        assert isinstance(info, BrokerInfo)
        return info

    async def _request(
        self, kind: Kind, type_name: str, *, target: str = "", body: bytes = b""
    ) -> None:
        env = await self._roundtrip(
            kind, type_name, target, body, self.request_timeout, what=f"{kind.name} request"
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

    async def _roundtrip(
        self, kind: Kind, type_name: str, target: str, body: bytes, timeout: float, *, what: str
    ) -> Envelope:
        corr = self._next_corr
        self._next_corr += 1
        pending = _Pending()
        self._pending[corr] = pending
        self._push(pack_envelope(int(kind), type_name, "", corr, target, body))
        try:
            with trio.move_on_after(timeout):
                await pending.event.wait()
        finally:
            self._pending.pop(corr, None)
            if pending.envelope is None and kind == Kind.QUERY and self._link_ok:
                self._push(pack_envelope(int(Kind.QCANCEL), "", "", corr))
        if pending.error is not None:
            raise pending.error
        if pending.envelope is None:
            if kind == Kind.QUERY:
                raise QueryTimeout(f"{what}: no answer within {timeout} s")
            raise BrokerLostError(f"{what}: the broker did not answer within {timeout} s")
        return pending.envelope

    async def _query_worker(self) -> None:
        async for env in self._query_recv:
            await self._answer(env)

    async def _answer(self, env: Envelope) -> None:
        handler = self._query_handlers.get(env.type) or self._builtin_queries.get(env.type)
        if handler is None:
            self._query_error(
                env, "no_handler", f"peer {self.peer_id!r} has no handler for {env.type!r} queries"
            )
            return
        try:
            msg = codec.decode_message(env.type, env.body, env.sender)
        except DecodeError as exc:
            self._query_error(env, "bad_request", str(exc))
            return
        try:
            result = handler(msg)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            log.warning(
                "peer %r: query handler for %r raised %s: %s",
                self.peer_id,
                env.type,
                type(exc).__name__,
                exc,
            )
            self._push(
                control(
                    Kind.QERR,
                    QueryFailed(
                        code="remote_error",
                        detail=str(exc),
                        peer_id=self.peer_id,
                        error_type=type(exc).__name__,
                    ),
                    corr=env.corr,
                )
            )
            return
        if not isinstance(result, Message):
            self._query_error(
                env,
                "bad_reply",
                f"the {env.type!r} handler of {self.peer_id!r} "
                f"returned {type(result).__name__}, not a Message",
            )
            return
        try:
            body = codec.encode_body(result, self._max_message_size)
        except PeerkitError as exc:
            self._query_error(env, "bad_reply", str(exc))
            return
        self._push(pack_envelope(int(Kind.REPLY), result.message_type(), "", env.corr, "", body))

    def _query_error(self, env: Envelope, code: str, detail: str) -> None:
        self._push(
            control(
                Kind.QERR,
                QueryFailed(code=code, detail=detail, peer_id=self.peer_id),
                corr=env.corr,
            )
        )

    # ============================================================== control
    async def _on_control(self, msg: PeerControlMessage) -> None:
        if msg.peer_id == self.peer_id:
            await self._control(msg.action)

    async def _on_control_query(self, msg: PeerControlMessage) -> Message:
        if msg.peer_id != self.peer_id:
            raise PeerkitError(f"control message for {msg.peer_id!r} sent to {self.peer_id!r}")
        if msg.action == "close":
            self._request_shutdown(f"closed by {msg.sender!r}")
        else:
            await self._control(msg.action)
        return OkMsg(detail=f"{self.peer_id} {msg.action}: {self.state}")

    async def _control(self, action: str) -> None:
        log.info("peer %r: control action %r", self.peer_id, action)
        if action == "start":
            await self.start()
        elif action == "stop":
            await self.stop()
        elif action == "close":
            await self.async_shutdown()

    # ====================================================== context manager
    async def __aenter__(self) -> Peer:
        mgr = trio.open_nursery()
        nursery = await mgr.__aenter__()
        self._cm_nursery = mgr
        try:
            await nursery.start(self.run)
        except BaseException as exc:
            self._cm_nursery = None
            try:
                await mgr.__aexit__(type(exc), exc, exc.__traceback__)
            except BaseExceptionGroup as group:
                raise_single(group)
                raise
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        mgr, self._cm_nursery = self._cm_nursery, None
        self._request_shutdown("the `async with peer` block ended")
        try:
            return await mgr.__aexit__(exc_type, exc, tb)  # type: ignore[no-any-return]
        except BaseExceptionGroup as group:
            raise_single(group)
            raise
