"""The trio peer: one nursery, a strict lifecycle, and the messaging API."""

from __future__ import annotations

import collections
import ssl
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from . import _ws, codec
from ._checks import check_positive_int, check_seconds, check_seconds_or_zero
from ._peer_base import Handler, _never_run, _Pending, _Sub, log
from ._peer_messaging import PeerMessaging
from ._util import OwnNursery, raise_single
from ._wsconf import Outgoing, Run
from .codec import Envelope, control
from .errors import (
    BrokerLostError,
    PeerkitError,
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
    SHARE_POLICIES,
    Kind,
    PeerStateReport,
    Welcome,
)
from .states import PeerState

__all__ = ["Peer", "query_handler", "subscribe"]

M = TypeVar("M", bound=Message)
F = TypeVar("F", bound=Callable[..., Any])
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


#: The longest ``busy_poll`` a peer accepts: polling longer costs more CPU than a wake-up.
MAX_BUSY_POLL = 0.1


class Peer(PeerMessaging, OwnNursery):
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
    handler answers as its query arrives), ``busy_poll`` (how long a task waiting for an
    answer, to a query or a request, polls the connection before it sleeps: 1 ms by
    default, at most 0.1 s, 0 turns polling off; see below), ``is_essential``.

    Polling: a round trip through the broker wakes four sleeping processes in turn, and
    where waking an idle CPU is slow (virtual machines above all) those wake-ups cost more
    than the work. So a lone task that waits for its answer on a plain-TCP connection checks
    the connection at every scheduling pass for up to ``busy_poll`` seconds before it
    sleeps. Each pass is a trio checkpoint (the peer's other tasks, timers and I/O carry on)
    after a ``sched_yield``; polling stops as soon as the process has other tasks to run
    (its CPU is not going idle then), and it is off under a :class:`trio.testing.MockClock`
    (virtual time could not advance). The benchmarks page gives what it saves.

    What it costs: up to ``busy_poll`` of CPU per answer awaited, spent for nothing when
    answers take longer than that. On a machine whose CPUs are all busy with other programs
    it can make round trips slower rather than faster (``sched_yield`` is only a hint to
    Linux, which tends to favour a process that has just woken up over one that keeps
    yielding). Set ``busy_poll=0`` where CPU matters more than latency, on a loaded machine,
    or when the answers you wait for take about a millisecond or more.
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
        busy_poll: float = 0.001,
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
        self.busy_poll = check_seconds_or_zero("busy_poll", busy_poll)
        if self.busy_poll > MAX_BUSY_POLL:
            raise PeerkitError(
                f"busy_poll must be at most {MAX_BUSY_POLL} s (it is CPU spent on each "
                f"answer awaited; 0.001 is the default), got {busy_poll!r}"
            )
        if is_essential is not None:
            self.is_essential = is_essential

        # statistics (read freely)
        #: published messages received from the broker
        self.msgs_in = 0
        #: published messages written to the broker
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
        self._reported_started = False
        self._start_requested = False

        self._ws: _ws.WebSocket | None = None
        self._link_ok = False
        self._can_send = False
        self._welcome: Welcome | None = None
        self._max_message_size = codec.DEFAULT_MAX_MESSAGE_SIZE
        self._out: collections.deque[Outgoing] = collections.deque()
        self._tail: Run | None = None  # the run at the end of _out, while it can grow
        self._heard = 0.0  # trio time of the last frame from the broker
        self._caller_reads = False  # a caller waiting for an answer reads the connection
        self._read_scope: trio.CancelScope | None = None  # the reader task's reads
        self._reads_back = trio.Event()  # set when that caller hands the reading back
        self._out_ready = trio.Event()
        self._progress = trio.lowlevel.ParkingLot()
        self._enqueued = 0
        self._sent = 0
        self._next_corr = 1
        self._pending: dict[int, _Pending] = {}

        self._subs: dict[str, list[_Sub]] = {}
        self._sub_refs: collections.Counter[tuple[str, str | None]] = collections.Counter()
        self._sub_acks: dict[tuple[str, str | None], _Pending] = {}
        self._query_handlers: dict[str, Handler] = {}
        self._builtin_queries: dict[str, Handler] = {
            PeerControlMessage.message_type(): self._on_control_query,
        }
        self._inbox: collections.deque[Envelope] = collections.deque()
        self._unyielded = 0  # bytes send_message queued since it last yielded
        self._inbox_count = 0  # messages queued in _inbox, and those of the run in hand
        self._run_left = 0
        self._inbox_ready = trio.Event()
        self._local_drops = 0
        self._query_send, self._query_recv = trio.open_memory_channel[
            tuple[Envelope, Awaitable[Any]]
        ](max_concurrent_queries * 4)

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

    async def _stopped(self) -> None:
        """Framework step after every running → ready (``stop()`` or a control message);
        subclasses extend it (ConfiguredPeer applies parameter changes held back)."""

    async def _become_ready(self) -> None:
        """Everything between connected and ready; subclasses extend it (ConfiguredPeer)."""
        await self._connections_established()

    # ============================================================ lifecycle
    def _state_changed(self, old: PeerState, new: PeerState) -> None:
        log.debug("peer %r: %s -> %s", self.peer_id, old, new)
        self._can_send = self.is_connected
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
            await self._connect(sysn)
        except (PeerkitError, OSError, trio.TooSlowError) as exc:
            self._fail(exc)
            return
        self._link_ok = True
        self._state = PeerState.connected  # reported to the broker by _state_changed
        sysn.start_soon(self._sys_guarded, self._reader)
        sysn.start_soon(self._sys_guarded, self._writer)
        sysn.start_soon(self._sys_guarded, self._heartbeat)
        async with trio.open_nursery() as usern:
            self._user_nursery = usern
            usern.start_soon(self._guarded, self._dispatcher)
            for _ in range(self.max_concurrent_queries):
                usern.start_soon(self._guarded, self._query_worker)
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

    async def _lifecycle(self) -> None:
        await self._become_ready()
        if self.is_shutting_down:
            return
        self._state = PeerState.ready
        if self.autostart or self._start_requested:
            await self.start()

    async def _sys_guarded(self, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except _ws.ConnectionClosed as exc:
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

    def _drop_waiting_queries(self) -> None:
        """Queries still waiting for a worker will not be answered: tell their askers."""
        while True:
            try:
                env, rest = self._query_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            _never_run(rest)
            if self._link_ok:
                self._query_error(env, "handler_gone", f"peer {self.peer_id!r} is shutting down")

    async def _close_gracefully(self) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.grace_period
            if self._stop_on_shutdown:
                await self._guarded(self._stop)
            await self._guarded(self._shutting_down)
            self._drop_waiting_queries()
            if self._link_ok:
                error = self._error
                if error is not None:
                    panick = PanickMsg(
                        message=str(error),
                        error_type=type(error).__name__,
                        was_essential=self.is_essential,
                    )
                    self._queue_publish(PanickMsg.message_type(), codec.encode_body(panick))
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

    async def _register_declared(self) -> None:
        await self._subscribe(PeerControlMessage, None, self._on_control)
        for name, msg_type, sender in self._declared_subs:
            await self._subscribe(msg_type, sender, getattr(self, name))
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
        else:
            self._request_shutdown(f"closed by {msg.sender!r}")
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

    # ====================================================== context manager
    def _end_of_block(self) -> None:
        self._request_shutdown("the `async with peer` block ended")
