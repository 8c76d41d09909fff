"""The trio peer: one nursery, a strict lifecycle, and the messaging API."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar, overload

import trio

from . import codec
from ._checks import check_positive_int, check_seconds
from ._link import Link, log
from ._queries import Handler, Queries
from ._subscriptions import Subscriptions
from ._util import OwnNursery, raise_single
from .codec import Envelope, control
from .errors import (
    BrokerLostError,
    DecodeError,
    NotConnectedException,
    PeerkitError,
    QueryAnswerUnknown,
    ShuttingDownException,
)
from .messages import (
    BrokerGoodbyeMsg,
    Message,
    OkMsg,
    PanickMsg,
    PeerControlMessage,
    message_type_of,
)
from .protocol import (
    DELIVERIES,
    PUB,
    SHARE_POLICIES,
    BrokerInfo,
    Kind,
    PeerStateReport,
    RequestFailed,
)
from .states import PeerState, State, StateMachine, base_state

__all__ = ["Peer", "query_handler", "subscribe"]

M = TypeVar("M", bound=Message)
R = TypeVar("R", bound=Message)
F = TypeVar("F", bound=Callable[..., Any])
# ------------------------------------------------------------------ decorators


def subscribe(
    msg_type: type[Message], *, sender: str | None = None, delivery: str = "drop"
) -> Callable[[F], F]:
    """Declare a method as a handler of ``msg_type`` (from ``sender``, or from everyone),
    delivered the ``delivery`` way (see :meth:`Peer.subscribe_for_all_msg_subtype`).

    The peer subscribes it once connected, before ``run()`` reports the peer started.
    """
    message_type_of(msg_type)  # fail early for an unregistered class
    _check_delivery(delivery)

    def deco(fn: F) -> F:
        fn.__dict__.setdefault("__peerkit_subscribe__", []).append((msg_type, sender, delivery))
        return fn

    return deco


def _check_delivery(delivery: str) -> None:
    if delivery not in DELIVERIES:
        raise PeerkitError(
            f"delivery must be one of {', '.join(repr(d) for d in DELIVERIES)}, not {delivery!r}"
        )


def query_handler(msg_type: type[Message], *, policy: str = "exclusive") -> Callable[[F], F]:
    """Declare a method as the query handler of ``msg_type`` (it returns the response)."""
    message_type_of(msg_type)
    if policy not in SHARE_POLICIES:
        raise PeerkitError(f"policy must be one of {', '.join(SHARE_POLICIES)}, not {policy!r}")

    def deco(fn: F) -> F:
        fn.__dict__["__peerkit_query__"] = (msg_type, policy)
        return fn

    return deco


#: send_message yields to the scheduler (and so lets the writer fill a frame) once it queued
#: this many bytes since it last did, counting each message as its body plus _YIELD_OVERHEAD
#: (about 850 messages of 100 bytes, or 60 of 8 KiB: frames of ~100-500 KiB under load)
_YIELD_BYTES = 512 * 1024
_YIELD_OVERHEAD = 512


# A peer is made of parts it holds: its Link to the broker (peerkit/_link.py: the
# trio-websocket connection, its reader, writer and heartbeat), its Subscriptions
# (peerkit/_subscriptions.py: handlers, inbox, dispatcher) and its Queries
# (peerkit/_queries.py: handlers and workers, questions asked). The peer itself keeps the
# lifecycle and the nursery.
class Peer(StateMachine, OwnNursery):
    """A peer: one trio nursery, a strict lifecycle and typed messaging through a broker.

    ``await nursery.start(peer.run)`` returns once the peer is connected; ``run()`` returns
    when the peer is finished and re-raises the error that killed it, if any.
    ``async with peer:`` owns the nursery and shuts the peer down gracefully on exit.

    Options: ``token`` (the broker's shared secret), ``ssl_context`` (for ``wss://``),
    ``connect_timeout`` (seconds to reach the broker, retrying while it is not up yet),
    ``request_timeout`` (broker acknowledgements), ``query_timeout`` (default for
    :meth:`query`), ``send_timeout`` (how long :meth:`send_message` waits for room in a full
    queue), ``grace_period`` (bound on the graceful part of shutdown), ``send_queue_size``
    (messages queued and not yet written), ``receive_queue_size`` (messages waiting for
    handlers; overflow drops and counts),
    ``max_concurrent_queries`` (async query handlers running at once; a plain-function
    handler answers as its query arrives), ``reconnect`` and ``reconnect_timeout`` (below),
    ``on_handler_error``, ``is_essential``.

    A subscription handler that raises kills the peer by default
    (``on_handler_error="raise"``): ``PanickMsg``, goodbye with the error, ``run()`` raises
    it. Peers that must survive one bad message (a recorder) pass
    ``on_handler_error="log"``: the error is counted in ``handler_errors`` and logged (at
    most once a second, with the count of those not logged) and the next message is
    handled. (A query handler's error never kills its peer: the asker gets it as a
    :class:`RemoteError`.)

    Reconnection: a peer that loses an established connection to its broker (the broker
    vanished, the network dropped) does not die with it (``reconnect=True``, the default):
    it reconnects with exponential back-off and jitter, under the same id (a secret from
    the welcome lets it replace its own stale connection at the broker, and nobody else),
    re-subscribes, re-registers its query handlers, reports its state and carries on in
    the state it was in; then the ``_reconnected()`` hook runs. Meanwhile ``link_up`` is
    False, queries waiting for an answer fail at once with :class:`BrokerLostError` (and
    new ones too), and :meth:`send_message` keeps queueing (when the queue is full the
    newest message is dropped and counted in ``unsent_dropped``). Past
    ``reconnect_timeout`` seconds without success the peer fails with
    :class:`BrokerLostError`. A clean broker shutdown (``BrokerShutdownMsg``) still shuts
    the peer down. ``reconnect=False``: the first loss fails the peer.

    """

    #: Whether the experiment stops when this peer panics (reported in ``PanickMsg``).
    is_essential: bool = True

    _declared_subs: tuple[tuple[str, type[Message], str | None, str], ...] = ()
    _declared_queries: tuple[tuple[str, type[Message], str], ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in vars(cls).items():
            base = getattr(Peer, name, None)
            if callable(base) and not name.startswith("__") and not callable(value):
                raise PeerkitError(
                    f"{cls.__name__}.{name} = {value!r} hides the method Peer.{name}; "
                    "choose another name for the attribute"
                )
        subs: list[tuple[str, type[Message], str | None, str]] = []
        queries: list[tuple[str, type[Message], str]] = []
        seen: set[str] = set()
        for klass in cls.__mro__:
            for name, value in vars(klass).items():
                if name in seen:
                    continue
                seen.add(name)
                for msg_type, sender, delivery in getattr(value, "__peerkit_subscribe__", ()):
                    subs.append((name, msg_type, sender, delivery))
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
        reconnect: bool = True,
        reconnect_timeout: float = 30.0,
        on_handler_error: str = "raise",
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
            ("reconnect_timeout", reconnect_timeout),
        ):
            check_seconds(name, value)
        for name, ivalue in (
            ("send_queue_size", send_queue_size),
            ("receive_queue_size", receive_queue_size),
            ("max_concurrent_queries", max_concurrent_queries),
        ):
            check_positive_int(name, ivalue)
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
        self._reported_started = False
        self._start_requested = False
        self._can_send = False  # connected and not shutting down: the send_message fast path
        self._unsent_dropped = 0
        self._unyielded = 0  # bytes send_message queued since it last yielded

        # the parts
        self._link = Link(
            broker_url,
            peer_id,
            self._on_envelope,
            token=token,
            ssl_context=ssl_context,
            connect_timeout=self.connect_timeout,
            grace_period=self.grace_period,
            reconnect=bool(reconnect),
            reconnect_timeout=float(reconnect_timeout),
            on_resume=self._resume,
        )
        if on_handler_error not in ("raise", "log"):
            raise PeerkitError(
                f"on_handler_error must be 'raise' (a handler's error kills the peer) or "
                f"'log' (counted, logged, the peer carries on), got {on_handler_error!r}"
            )
        self._subs = Subscriptions(
            self._link,
            peer_id,
            receive_queue_size,
            self.request_timeout,
            log_handler_errors=on_handler_error == "log",
        )
        self._link.frame_done = self._subs.report_drops
        self._link.wait_room = self._subs.wait_room
        self._queries = Queries(
            self._link,
            peer_id,
            max_concurrent_queries,
            self.request_timeout,
            builtin={PeerControlMessage.message_type(): self._on_control_query},
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.peer_id!r} {self.state}>"

    # ============================================================ statistics
    @property
    def msgs_in(self) -> int:
        """Published messages received from the broker."""
        return self._subs.msgs_in

    @property
    def msgs_out(self) -> int:
        """Published messages written to the broker."""
        return self._link.msgs_out

    @property
    def dropped_messages(self) -> int:
        """Messages lost for this peer: reported by the broker, or dropped here because
        its receive queue was full or it was shutting down."""
        return self._subs.dropped_messages

    @property
    def decode_errors(self) -> int:
        """Messages that arrived but could not be decoded (each was logged)."""
        return self._subs.decode_errors

    @property
    def handler_errors(self) -> int:
        """Exceptions subscription handlers raised (with ``on_handler_error="log"``)."""
        return self._subs.handler_errors

    @property
    def link_up(self) -> bool:
        """Whether the connection to the broker is open (after the welcome); False while a
        lost connection is being re-established."""
        return self._link.up

    @property
    def reconnects(self) -> int:
        """Completed reconnections (each after a lost connection: see ``reconnect``)."""
        return self._link.reconnects

    @property
    def unsent_dropped(self) -> int:
        """Messages :meth:`send_message` dropped because the connection was down and the
        send queue full (while connected it waits for room instead)."""
        return self._unsent_dropped

    async def _resume(self) -> None:
        """After a reconnection (in a task of the new connection): restore subscriptions,
        query handlers and the state at the broker, then the ``_reconnected`` hook."""
        await self._subs.resubscribe()
        await self._queries.reregister()
        if not self.is_finished:
            state = self.state
            report = PeerStateReport(state=str(state), base=str(base_state(state)))
            self._link.push(control(Kind.STATE, report))
        await self._reconnected()

    # ============================================================== helpers
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

    def _on_envelope(self, env: Envelope) -> None:
        """Every envelope the link does not handle itself (in the link's reader task)."""
        kind = env.kind
        if kind == PUB:
            self._subs.deliver(env)
        elif kind == Kind.QUERY:
            if self.is_shutting_down:
                self._queries.fail(env, "handler_gone", f"peer {self.peer_id!r} is shutting down")
            else:
                self._queries.answer(env)
        elif kind == Kind.DROPPED:
            self._subs.broker_dropped(env)
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

    # ================================================================ hooks
    async def _connections_established(self) -> None:
        """Called once connected (handlers declared with decorators are subscribed).

        Do set-up that talks to other peers here; the peer becomes ready afterwards.
        """

    async def _start(self) -> None:
        """Called by :meth:`start` (ready → running). Spawn the main work with create_task."""

    async def _stop(self) -> None:
        """Called by :meth:`stop` (running → ready) and when a running peer shuts down."""

    async def _reconnected(self) -> None:
        """Called after each reconnection (the peer lost its broker and found it again;
        subscriptions, query handlers and the state are restored by then)."""

    async def _shutting_down(self) -> None:
        """Called once during shutdown, after the peer's tasks were cancelled and while the
        connection is still open (queries still work); bounded by ``grace_period``."""

    async def _stopped(self) -> None:
        """Framework step after every running → ready (``stop()`` or a control message);
        subclasses extend it (ConfiguredPeer applies parameter changes held back)."""

    async def _become_ready(self) -> None:
        """Everything between connected and ready; subclasses extend it (ConfiguredPeer)."""
        await self._connections_established()

    # ============================================================ lifecycle
    def _state_changed(self, old: State, new: State) -> None:
        log.debug("peer %r: %s -> %s", self.peer_id, old, new)
        self._can_send = self.is_connected
        self._state_lot.unpark_all()
        if new is PeerState.shutting_down:
            self._subs.close()
        if self._link.up and new is not PeerState.finished:
            report = PeerStateReport(state=str(new), base=str(base_state(new)))
            self._link.push(control(Kind.STATE, report))

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
        if await self._stop_only() and self.autoshutdown:
            await self.async_shutdown()

    async def _stop_only(self) -> bool:
        """running → ready; False if the peer was not running. Waits for a start in progress."""
        self._refuse_when_shutting_down("stop")
        self._start_requested = False
        if not self.is_running and not self._lifecycle_lock.locked():
            await trio.lowlevel.checkpoint()
            return False
        async with self._lifecycle_lock:
            if not self.is_running:
                return False
            await self._stop()
            if self.is_shutting_down:
                return True
            self._state = PeerState.ready
        await self._stopped()  # outside the lock: it may run user hooks
        return True

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
        if self.is_shutting_down:
            raise ShuttingDownException(
                f"peer {self.peer_id!r} was shut down before run() was called; create a new one"
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
            if not self.is_shutting_down:
                self._state = PeerState.shutting_down
            self._state = PeerState.finished
            self._link.fail_pending(BrokerLostError(f"peer {self.peer_id!r} finished"))
            self._finished_event.set()
            log.info(
                "peer %r finished%s",
                self.peer_id,
                " after an error (logged above)" if self._error else "",
            )
        if self._error is not None:
            raise self._error
        if not self._reported_started and task_status is not trio.TASK_STATUS_IGNORED:
            # nursery.start() needs an answer: the peer never got as far as connected
            raise ShuttingDownException(
                f"peer {self.peer_id!r} was shut down before it was connected"
            )

    async def _watch_outer_cancel(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._request_shutdown("the nursery running the peer was cancelled")

    async def _live(self, sysn: trio.Nursery, task_status: trio.TaskStatus[None]) -> None:
        try:
            await sysn.start(self._run_link)
        except (PeerkitError, OSError, trio.TooSlowError) as exc:
            self._fail(exc)
            return
        self._state = PeerState.connected  # reported to the broker by _state_changed
        async with trio.open_nursery() as usern:
            self._user_nursery = usern
            usern.start_soon(self._guarded, self._subs.dispatcher)
            for _ in range(self.max_concurrent_queries):
                usern.start_soon(self._guarded, self._queries.worker)
            try:
                await self._register_declared()
            except Exception as exc:  # e.g. a declared query handler another peer holds
                self._fail(exc)
                return
            queued, self._queued_tasks = self._queued_tasks, []
            for fn, args in queued:
                usern.start_soon(self._guarded, fn, *args)
            task_status.started()
            self._reported_started = True
            usern.start_soon(self._guarded, self._lifecycle)
            await trio.sleep_forever()

    async def _run_link(self, *, task_status: trio.TaskStatus[Any]) -> None:
        """The link's life, in the peer's system nursery: an error before the welcome
        comes out of ``nursery.start`` in :meth:`_live`; after it, it fails the peer."""
        try:
            await self._link.run(task_status=task_status)
        except Exception as exc:
            if self._link.welcome is None:
                raise
            if not self.is_shutting_down or self._error is None:
                self._fail(exc)

    async def _lifecycle(self) -> None:
        await self._become_ready()
        if self.is_shutting_down:
            return
        self._state = PeerState.ready
        if self.autostart or self._start_requested:
            await self.start()

    async def _close_gracefully(self) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.grace_period
            if self._stop_on_shutdown:
                await self._guarded(self._stop)
            await self._guarded(self._shutting_down)
            self._queries.drop_waiting()
            if self._link.up:
                error = self._error
                if error is not None:
                    panick = PanickMsg(
                        message=str(error),
                        error_type=type(error).__name__,
                        was_essential=self.is_essential,
                    )
                    self._link.publish(PanickMsg.message_type(), codec.encode_body(panick))
                goodbye = BrokerGoodbyeMsg(
                    error_msg=None if error is None else f"{type(error).__name__}: {error}"
                )
                self._link.push(control(Kind.GOODBYE, goodbye))
            await self._link.aclose()
            if scope.cancelled_caught:
                log.warning(
                    "peer %r: graceful shutdown took longer than %s s",
                    self.peer_id,
                    self.grace_period,
                )

    async def _register_declared(self) -> None:
        await self._subs.add(PeerControlMessage, None, self._on_control)
        for name, msg_type, sender, delivery in self._declared_subs:
            await self._subs.add(msg_type, sender, getattr(self, name), delivery)
        for name, msg_type, policy in self._declared_queries:
            await self.register_query_handler(msg_type, getattr(self, name), policy=policy)

    # ============================================================== control
    async def _on_control(self, msg: PeerControlMessage) -> None:
        if msg.peer_id == self.peer_id:
            await self._control(msg.action)

    async def _on_control_query(self, msg: PeerControlMessage) -> Message:
        if msg.peer_id != self.peer_id:
            raise PeerkitError(f"control message for {msg.peer_id!r} sent to {self.peer_id!r}")
        log.info("peer %r: control action %r from %r", self.peer_id, msg.action, msg.sender)
        if msg.action == "start":
            await self._control_start()
        elif msg.action == "stop":
            # answer first, then shut down (autoshutdown): the asker gets its OkMsg
            if await self._stop_only() and self.autoshutdown:
                self._request_shutdown(f"stopped by {msg.sender!r} (autoshutdown)")
        elif msg.action == "close":
            self._request_shutdown(f"closed by {msg.sender!r}")
        else:  # the asker gets what the hook raises, as a RemoteError
            await self._control_action(msg.action)
        return OkMsg(detail=f"{self.peer_id} {msg.action}: {self.state}")

    async def _control_start(self) -> None:
        if self.is_ready:
            await self.start()
        else:  # still getting ready: start as soon as it is
            self._start_requested = True
            await trio.lowlevel.checkpoint()

    async def _control(self, action: str) -> None:
        log.info("peer %r: control action %r", self.peer_id, action)
        if action == "start":
            await self._control_start()
        elif action == "stop":
            await self.stop()
        elif action == "close":
            await self.async_shutdown()
        else:  # published, so nobody to answer: a refused action must not kill the peer
            try:
                await self._control_action(action)
            except PeerkitError as exc:
                log.warning("peer %r: control action %r refused: %s", self.peer_id, action, exc)

    async def _control_action(self, action: str) -> None:
        """Called for a :class:`PeerControlMessage` action other than start, stop and close.

        Override it to give a peer actions of its own (call ``super()`` for those it does not
        know); what it raises reaches an asker (``peerkit ctl``) as a RemoteError, and the
        peer answers once it returns.
        """
        raise PeerkitError(
            f"peer {self.peer_id!r} has no control action {action!r}; it knows start, stop "
            "and close, and its class can add more by overriding _control_action"
        )

    # ====================================================== context manager
    def _end_of_block(self) -> None:
        self._request_shutdown("the `async with peer` block ended")

    # ============================================================ messaging
    async def send_message(self, msg: Message) -> None:
        """Publish ``msg`` to every subscriber of its type (through the broker).

        Messages from one peer reach each subscriber in the order sent. Waits (up to
        ``send_timeout``) when the outgoing queue is full.
        """
        if not self._can_send:  # one flag for the common case (kept by _state_changed)
            self._require_connected("send_message")
        link = self._link
        body = codec.encode_body(msg, link.max_message_size)
        if link.backlog >= self.send_queue_size:
            if not link.up:  # reconnecting: nobody drains the queue, so the newest go
                self._unsent_dropped += 1
                await trio.lowlevel.checkpoint()
                return
            try:
                with trio.fail_after(self.send_timeout):
                    await link.wait_for_room(self.send_queue_size)
            except trio.TooSlowError:
                raise PeerkitError(
                    f"peer {self.peer_id!r}: outgoing queue full for {self.send_timeout} s "
                    "(the broker is not reading); raise send_queue_size or send less"
                ) from None
            self._require_connected("send_message")
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        # encode_body checked the class is registered: its type name is safe to read
        link.publish(type(msg).__message_type__, body)
        self._unyielded += len(body) + _YIELD_OVERHEAD
        if self._unyielded >= _YIELD_BYTES:
            # let the writer batch what is queued; a lone message goes out at the caller's
            # next yield (at once, in practice)
            self._unyielded = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def subscribe_for_all_msg_subtype(
        self, msg_type: type[M], handler: Callable[[M], Any], *, delivery: str = "drop"
    ) -> None:
        """Call ``handler(msg)`` for every ``msg_type`` message, from every sender.

        Returns once the broker has the subscription. Handlers (sync or async) run one at a
        time, in arrival order; an exception escaping one shuts the peer down with it.

        ``delivery`` says what happens when this peer cannot keep up: ``"drop"`` (the
        default) drops the newest messages and counts them (``dropped_messages``,
        ``MessagesDropped``); ``"latest"`` keeps the newest and drops the oldest (counted),
        for live displays; ``"lossless"`` drops nothing: the broker slows the publishers
        down instead (their ``send_message`` waits), and disconnects this peer if it takes
        nothing for the broker's ``stall_timeout``. See "Failures and recovery".
        """
        self._require_connected("subscribing")
        await self._subs.add(msg_type, None, handler, delivery)

    async def subscribe_for_specific_msg_subtype(
        self,
        msg_type: type[M],
        sender_id: str,
        handler: Callable[[M], Any],
        *,
        delivery: str = "drop",
    ) -> None:
        """Call ``handler(msg)`` for ``msg_type`` messages sent by ``sender_id`` only
        (``delivery`` as for :meth:`subscribe_for_all_msg_subtype`)."""
        if not isinstance(sender_id, str) or not sender_id:
            raise PeerkitError(f"sender_id must be a peer id, got {sender_id!r}")
        self._require_connected("subscribing")
        await self._subs.add(msg_type, sender_id, handler, delivery)

    async def unsubscribe(
        self, msg_type: type[Message], handler: Handler | None = None, *, sender: str | None = None
    ) -> int:
        """Remove subscriptions to ``msg_type`` (those of ``handler`` if given, for
        ``sender`` if given); returns how many were removed."""
        removed = self._subs.remove(msg_type, handler, sender)
        await trio.lowlevel.checkpoint()
        return removed

    @asynccontextmanager
    async def subscription(
        self,
        msg_type: type[M],
        *,
        sender: str | None = None,
        buffer: int = 100,
        delivery: str = "drop",
    ) -> AsyncIterator[trio.MemoryReceiveChannel[M]]:
        """Pull form: ``async with peer.subscription(T) as stream: async for msg in stream``.

        ``buffer`` messages wait in the stream; when it is full the peer's handlers wait
        for the consumer (and the broker drops and reports beyond its own queue).
        """
        self._require_connected("subscribing")
        async with self._subs.stream(msg_type, sender, buffer, delivery) as stream:
            yield stream

    async def register_query_handler(
        self, msg_type: type[Message], handler: Handler, *, policy: str = "exclusive"
    ) -> None:
        """Answer ``msg_type`` queries with ``handler(msg) -> response message``.

        An ``async`` handler runs in one of the ``max_concurrent_queries`` query workers. A
        plain function answers at once, in the peer's reader task as the query arrives:
        keep it short and non-blocking, as any code that runs in the reader.

        A second handler of the same type (any peer) is refused unless all use the same
        ``policy``: ``"round_robin"`` (the broker alternates) or ``"explicit"`` (queries
        raise :class:`MultiplePeersAvailable`; use :meth:`ask_peer`).
        """
        self._require_connected("register_query_handler")
        await self._queries.register(msg_type, handler, policy)

    async def unregister_query_handler(self, msg_type: type[Message]) -> None:
        """Stop answering ``msg_type`` queries."""
        await self._queries.unregister(msg_type, tell_broker=not self.is_shutting_down)

    @overload
    async def query(self, msg: Message, timeout: float | None = None) -> Message: ...

    @overload
    async def query(self, msg: Message, timeout: float | None = None, *, reply: type[R]) -> R: ...

    async def query(
        self, msg: Message, timeout: float | None = None, *, reply: type[Message] | None = None
    ) -> Message:
        """Ask whichever peer handles ``type(msg)`` and return its response.

        With ``reply=ResponseType`` the response is checked to be one (else
        :class:`QueryAnswerUnknown`), and a type checker knows the result's type.

        Raises :class:`NoHandlerError`, :class:`RemoteError`, :class:`HandlerGoneError`,
        :class:`MultiplePeersAvailable` or :class:`QueryTimeout` (all
        :class:`QueryAnswerUnknown`), or :class:`BrokerLostError` when the connection to the
        broker is lost meanwhile.
        """
        return self._check_reply(await self._ask("", msg, timeout), reply)

    @overload
    async def ask_peer(
        self, peer_id: str, msg: Message, timeout: float | None = None
    ) -> Message: ...

    @overload
    async def ask_peer(
        self, peer_id: str, msg: Message, timeout: float | None = None, *, reply: type[R]
    ) -> R: ...

    async def ask_peer(
        self,
        peer_id: str,
        msg: Message,
        timeout: float | None = None,
        *,
        reply: type[Message] | None = None,
    ) -> Message:
        """Ask the named peer (it answers with its query handler for ``type(msg)``);
        ``reply`` as for :meth:`query`."""
        if not isinstance(peer_id, str) or not peer_id:
            raise PeerkitError(f"peer_id must be a peer id, got {peer_id!r}")
        return self._check_reply(await self._ask(peer_id, msg, timeout), reply)

    @staticmethod
    def _check_reply(answer: Message, reply: type[Message] | None) -> Message:
        if reply is not None and not isinstance(answer, reply):
            raise QueryAnswerUnknown(
                f"{answer.sender!r} answered with {type(answer).__name__}, not the "
                f"{reply.__name__} the caller expects (reply={reply.__name__})"
            )
        return answer

    async def _ask(self, target: str, msg: Message, timeout: float | None) -> Message:
        if not self.is_connected and not (self.is_shutting_down and self._link.up):
            self._require_connected("query")
        return await self._queries.ask(
            target, msg, self.query_timeout if timeout is None else timeout
        )

    async def broker_info(self) -> BrokerInfo:
        """The broker's view of every connected peer (subscriptions, handlers, state)."""
        self._require_connected("broker_info")
        env = await self._link.call(Kind.INFO, timeout=self.request_timeout)
        info = codec.decode_body(BrokerInfo, env.body)
        assert isinstance(info, BrokerInfo)
        return info
