"""A peer for code that is not trio: a Qt GUI thread, a notebook, a plain script.

This is peerkit's one deliberate thread. :class:`SyncPeer` runs a :class:`~peerkit.Peer` in a
thread of its own, under its own ``trio.run``, and the caller sends, queries and subscribes
with plain blocking calls, each bounded by a timeout. Handlers run where the caller chooses:
in the bridge's thread as messages arrive (``handlers="bridge"``, the default), or queued for
the caller, who runs them in its own thread with :meth:`SyncPeer.poll`
(``handlers="poll"``: for GUI toolkits and anything else that must stay on one thread).

Starting and closing are explicit (``start()``/``close()``, or ``with SyncPeer(...) as
peer:``); closing shuts the peer down gracefully and joins the thread. An error that kills
the peer is raised by every later call and by ``close()``. :class:`SyncBroker` runs a
:class:`~peerkit.Broker` the same way, for scripts and notebooks that need one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import inspect
import logging
import queue
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import trio

from ._checks import check_positive_int, check_seconds
from ._handlers import check_handler
from ._util import raise_single
from .broker import Broker
from .errors import PeerkitError, ShuttingDownException
from .messages import Message, message_type_of
from .peer import Peer

__all__ = ["BridgeTimeout", "SyncBroker", "SyncPeer"]

log = logging.getLogger("peerkit.sync")

T = TypeVar("T")
M = TypeVar("M", bound=Message)

#: put in the poll queue when the bridge ends, to wake a caller blocked in poll()
_WAKE = object()


class BridgeTimeout(PeerkitError, TimeoutError):
    """A call into the bridge's thread did not finish within its timeout."""


class _Bridge:
    """A trio object run by ``trio.run`` in a thread of its own, with calls into it.

    Subclasses give ``_run`` (run the object, ``task_status.started()`` once it is up) and
    ``_stop`` (ask it, gracefully, to end).
    """

    def __init__(self, name: str, timeout: float) -> None:
        self.timeout = check_seconds("timeout", timeout)
        self._name = name
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None  # calls into the bridge run here
        self._scope = trio.CancelScope()
        self._up = threading.Event()  # set once started, or once the thread ends
        self._error: BaseException | None = None
        self._error_raised = False
        self._closed = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ for subclasses
    async def _run(self, *, task_status: trio.TaskStatus[Any]) -> None:
        raise NotImplementedError  # pragma: no cover

    async def _stop(self) -> None:
        raise NotImplementedError  # pragma: no cover

    def _close_timeout(self) -> float:
        return self.timeout

    # ------------------------------------------------------------------ the thread
    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # anything: it is the caller's to see
            self._error = exc
        finally:
            self._nursery = None
            self._up.set()
            self._ended()

    def _ended(self) -> None:
        """Called in the bridge's thread after ``trio.run`` returned."""

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[Any]) -> None:
            try:
                await self._run(task_status=task_status)
            finally:
                done.set()

        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(run)
                    self._nursery = nursery
                    self._up.set()
                    await done.wait()
                    # what is still running are calls: the object they call is finished
                    nursery.cancel_scope.cancel(reason=f"{self._name} finished")
        except BaseExceptionGroup as group:
            raise_single(group)
            raise
        finally:
            self._nursery = None

    def _in_bridge_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    # ------------------------------------------------------------------ start / close
    def start(self, timeout: float | None = None) -> Self:
        """Start the thread and return once the object is up (the peer connected, the broker
        listening), or raise what stopped it; :class:`BridgeTimeout` after ``timeout``
        seconds (default: the bridge's ``timeout``)."""
        wait = self.timeout if timeout is None else check_seconds("timeout", timeout)
        with self._lock:
            if self._closed:
                raise ShuttingDownException(f"{self._name} is closed; create a new one")
            if self._thread is not None:
                raise PeerkitError(f"{self._name} was already started; it starts once")
            self._thread = threading.Thread(target=self._thread_main, name=self._name, daemon=True)
            self._thread.start()
        if not self._up.wait(wait):
            self._cancel()
            self._thread.join(self._close_timeout())
            self._closed = True
            raise BridgeTimeout(
                f"{self._name} was not up within {wait} s; is the broker running? "
                "(raise start()'s timeout for a slow start)"
            )
        if self._error is not None:
            self._thread.join(self._close_timeout())
            self._closed = True
            self._error_raised = True
            raise self._error
        return self

    def _cancel(self) -> None:
        token = self._token
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._scope.cancel)

    def close(self, timeout: float | None = None) -> None:
        """End gracefully (the peer says goodbye) and join the thread. Idempotent.

        Raises the error that killed the object, if any (once), and
        :class:`BridgeTimeout` if the thread did not end within ``timeout`` seconds.
        """
        wait = self._close_timeout() if timeout is None else check_seconds("timeout", timeout)
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        if thread.is_alive():
            token, nursery = self._token, self._nursery
            if token is not None and nursery is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(nursery.start_soon, self._stop)
            thread.join(wait)
            if thread.is_alive():
                self._cancel()  # no longer gracefully
                thread.join(wait)
            if thread.is_alive():
                raise BridgeTimeout(
                    f"{self._name} did not end within {wait} s of close() (a handler "
                    "running in its thread may be blocked); its thread is a daemon thread"
                )
        if self._error is not None and not self._error_raised:
            self._error_raised = True
            raise self._error

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:  # an exception is on its way out: do not hide it behind the bridge's
            self.close()
        except Exception as close_error:
            log.error("%s: closing after %r failed: %r", self._name, exc, close_error)

    def wait_finished(self, timeout: float | None = None) -> bool:
        """Wait until it has finished by itself or by :meth:`close` (its thread ended);
        False if it is still running after ``timeout`` seconds (default: ``timeout``)."""
        if self._thread is None:
            raise PeerkitError(f"{self._name} was not started; call start() first")
        self._thread.join(self.timeout if timeout is None else check_seconds("timeout", timeout))
        return not self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """The error that ended the object, if any."""
        return self._error

    @property
    def running(self) -> bool:
        """Started, and its thread has not ended."""
        return self._thread is not None and self._thread.is_alive() and self._up.is_set()

    # ------------------------------------------------------------------ calls
    def _require_running(self, what: str) -> tuple[trio.lowlevel.TrioToken, trio.Nursery]:
        token, nursery = self._token, self._nursery
        if self._thread is None:
            raise PeerkitError(
                f"{self._name}: {what} needs the bridge started: call start() first, or use "
                "`with ... as peer:`"
            )
        if self._error is not None:
            raise self._error
        if self._closed or token is None or nursery is None or not self._thread.is_alive():
            raise ShuttingDownException(f"{self._name} is closed; {what} refused")
        return token, nursery

    def _call(
        self, what: str, async_fn: Callable[..., Awaitable[T]], *args: Any, timeout: float
    ) -> T:
        """Run ``await async_fn(*args)`` in the bridge's thread and return its result (or
        raise its error) here; cancelled and :class:`BridgeTimeout` after ``timeout``."""
        if self._in_bridge_thread():
            raise PeerkitError(
                f"{self._name}: {what} was called from a handler running in the bridge's "
                "thread, where it would wait for itself; use handlers='poll' and poll() to "
                "run handlers in your own thread"
            )
        token, nursery = self._require_running(what)
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        scopes: list[trio.CancelScope] = []

        async def call() -> None:
            with trio.CancelScope() as scope:
                scopes.append(scope)
                try:
                    result = await async_fn(*args)
                except Exception as exc:
                    future.set_exception(exc)
                    return
                except BaseException:  # cancelled: the bridge is ending
                    future.set_exception(ShuttingDownException(f"{self._name} ended; {what}"))
                    raise
                future.set_result(result)
            if scope.cancelled_caught and not future.done():
                future.set_exception(BridgeTimeout(f"{self._name}: {what} was cancelled"))

        def spawn() -> None:
            if self._nursery is None:
                future.set_exception(ShuttingDownException(f"{self._name} ended; {what}"))
            else:
                nursery.start_soon(call)

        try:
            token.run_sync_soon(spawn)
        except trio.RunFinishedError:
            self._require_running(what)
            raise
        # not future.result(timeout): its TimeoutError could not be told from the call's own
        # (QueryTimeout is a TimeoutError too)
        concurrent.futures.wait([future], timeout)
        if not future.done():
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(lambda: scopes and scopes[0].cancel())
            raise BridgeTimeout(
                f"{self._name}: {what} did not finish within {timeout} s (pass a larger "
                "timeout=; a handler running in the bridge's thread may be blocking it)"
            )
        try:
            return future.result()
        except ShuttingDownException:
            if self._error is not None and self._thread is not None:
                self._thread.join(self._close_timeout())
                raise self._error from None
            raise


class SyncPeer(_Bridge):
    """A :class:`~peerkit.Peer` for code that is not trio, run in a thread of its own.

    ``SyncPeer(broker_url, peer_id, **options)`` makes ``peer_class(broker_url, peer_id,
    **options)`` (a :class:`~peerkit.Peer` by default); ``start()`` or ``with`` runs it.

    ``handlers`` says where subscription handlers run: ``"bridge"`` (default) in the
    bridge's thread as messages arrive, one at a time, in order, like a Peer's handlers (keep
    them short: the peer waits for them, and they must guard whatever they share with your
    thread); ``"poll"`` queues each message with its handler for you to run in your own
    thread with :meth:`poll` (at most ``poll_queue_size`` wait; beyond that messages are
    dropped and counted in ``dropped_messages``). ``wakeup``, if given, is called from the
    bridge's thread when the queue stops being empty: post an event to your GUI loop there.

    ``timeout`` bounds every blocking call that has no ``timeout=`` of its own.
    """

    def __init__(
        self,
        broker_url: str,
        peer_id: str | None = None,
        *,
        peer_class: type[Peer] = Peer,
        handlers: Literal["bridge", "poll"] = "bridge",
        timeout: float = 10.0,
        poll_queue_size: int = 10_000,
        wakeup: Callable[[], object] | None = None,
        **peer_options: Any,
    ) -> None:
        if handlers not in ("bridge", "poll"):
            raise PeerkitError(
                f"handlers must be 'bridge' (run in the bridge's thread) or 'poll' (queued "
                f"for poll() in yours), got {handlers!r}"
            )
        if not (isinstance(peer_class, type) and issubclass(peer_class, Peer)):
            raise PeerkitError(f"peer_class must be Peer or a subclass, got {peer_class!r}")
        if wakeup is not None and not callable(wakeup):
            raise PeerkitError(f"wakeup must be callable with no arguments, got {wakeup!r}")
        #: the peer itself: read its state and statistics freely; call its methods only
        #: through the bridge (:meth:`call`)
        self.peer = peer_class(broker_url, peer_id, **peer_options)
        super().__init__(f"peerkit SyncPeer {self.peer.peer_id!r}", timeout)
        self.handlers = handlers
        self.wakeup = wakeup
        #: messages for poll() dropped because its queue was full
        self.dropped_messages = 0
        #: messages sent from handlers in the bridge's thread that could not be sent
        self.send_errors = 0
        self._inbox: queue.Queue[Any] = queue.Queue(
            check_positive_int("poll_queue_size", poll_queue_size)
        )
        self._woken = False
        self._relays: dict[tuple[str, str | None, Any], list[Callable[[Any], object]]] = {}
        self._outbox: trio.MemorySendChannel[Message] | None = None

    def __repr__(self) -> str:
        return f"<SyncPeer {self.peer_id!r} {self.peer.state}>"

    @property
    def peer_id(self) -> str:
        return self.peer.peer_id

    # ------------------------------------------------------------------ bridge hooks
    async def _run(self, *, task_status: trio.TaskStatus[Any]) -> None:
        await self.peer.run(task_status=task_status)

    async def _stop(self) -> None:
        await self.peer.async_shutdown()

    def _close_timeout(self) -> float:
        return self.peer.grace_period + self.peer.request_timeout + self.timeout

    def _ended(self) -> None:
        # a queue that is full is not empty: nobody is blocked in poll() then
        with contextlib.suppress(queue.Full):
            self._inbox.put_nowait(_WAKE)

    # ------------------------------------------------------------------ the API
    def send_message(self, msg: Message, timeout: float | None = None) -> None:
        """Publish ``msg`` (as :meth:`Peer.send_message <peerkit.Peer.send_message>`).

        From a handler running in the bridge's thread it queues ``msg`` and returns at once
        (messages keep their order; one that cannot be sent is logged and counted in
        ``send_errors``).
        """
        if self._in_bridge_thread():
            self._send_later(msg)
            return
        self._call("send_message()", self.peer.send_message, msg, timeout=self._t(timeout))

    def query(self, msg: Message, timeout: float | None = None) -> Message:
        """Ask whichever peer handles ``type(msg)``; returns its response or raises what
        :meth:`Peer.query <peerkit.Peer.query>` raises (a :class:`~peerkit.QueryTimeout`
        after ``timeout``)."""
        t = self._t(timeout)
        return self._call("query()", self.peer.query, msg, t, timeout=t + self.timeout)

    def ask_peer(self, peer_id: str, msg: Message, timeout: float | None = None) -> Message:
        """Ask the named peer (as :meth:`Peer.ask_peer <peerkit.Peer.ask_peer>`)."""
        t = self._t(timeout)
        return self._call(
            "ask_peer()", self.peer.ask_peer, peer_id, msg, t, timeout=t + self.timeout
        )

    def subscribe(
        self,
        msg_type: type[M],
        handler: Callable[[M], object],
        *,
        sender: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Call ``handler(msg)`` for every ``msg_type`` message (from ``sender`` only, if
        given), where ``handlers`` says; returns once the broker has the subscription."""
        what = f"SyncPeer.subscribe({getattr(msg_type, '__qualname__', msg_type)})"
        type_name = message_type_of(msg_type)
        if inspect.iscoroutinefunction(handler):
            raise PeerkitError(
                f"{what}: {handler!r} is async; a SyncPeer's handlers are plain functions "
                "(write a Peer subclass for async handlers and pass it as peer_class)"
            )
        check_handler(handler, what)
        relay: Callable[[Any], object] = (
            handler if self.handlers == "bridge" else self._poll_relay(handler)
        )
        if sender is None:
            self._call(
                "subscribe()",
                self.peer.subscribe_for_all_msg_subtype,
                msg_type,
                relay,
                timeout=self._t(timeout),
            )
        else:
            self._call(
                "subscribe()",
                self.peer.subscribe_for_specific_msg_subtype,
                msg_type,
                sender,
                relay,
                timeout=self._t(timeout),
            )
        self._relays.setdefault((type_name, sender, handler), []).append(relay)

    def unsubscribe(
        self,
        msg_type: type[Message],
        handler: Callable[[Any], object],
        *,
        sender: str | None = None,
        timeout: float | None = None,
    ) -> int:
        """Remove the subscriptions :meth:`subscribe` made for ``handler``; how many."""
        relays = self._relays.pop((message_type_of(msg_type), sender, handler), [])
        removed = 0
        for relay in relays:
            removed += self._call(
                "unsubscribe()",
                functools.partial(self.peer.unsubscribe, sender=sender),
                msg_type,
                relay,
                timeout=self._t(timeout),
            )
        return removed

    def call(
        self, async_fn: Callable[..., Awaitable[T]], *args: Any, timeout: float | None = None
    ) -> T:
        """Run ``await async_fn(*args)`` in the bridge's thread and return its result: the
        way to reach the rest of the peer's API, e.g.
        ``sync_peer.call(sync_peer.peer.register_query_handler, Ask, answer)``."""
        name = getattr(async_fn, "__name__", "call")
        return self._call(f"{name}()", async_fn, *args, timeout=self._t(timeout))

    def poll(self, timeout: float = 0.0, *, max_messages: int | None = None) -> int:
        """Run queued handlers in this thread (``handlers="poll"``); how many ran.

        Waits up to ``timeout`` seconds for the first message, then runs what is queued
        (at most ``max_messages``) without waiting. A handler's exception comes out here
        (the messages after it stay queued). Once the peer has died of an error, raises it.
        """
        if self.handlers != "poll":
            raise PeerkitError(
                f"{self._name}: poll() runs queued handlers, and this bridge runs them in its "
                "own thread; create it with handlers='poll' to run them in yours"
            )
        if timeout != 0:
            check_seconds("timeout", timeout)
        if max_messages is not None:
            check_positive_int("max_messages", max_messages)
        ran = 0
        block = timeout > 0
        while max_messages is None or ran < max_messages:
            try:
                item = self._inbox.get(timeout=timeout) if block else self._inbox.get_nowait()
            except queue.Empty:
                break
            block = False
            if item is _WAKE:
                break
            handler, msg = item
            ran += 1
            handler(msg)
        if self._inbox.empty():
            self._woken = False
            if ran == 0 and self._error is not None and self._thread is not None:
                self._thread.join(self._close_timeout())
                raise self._error
        return ran

    # ------------------------------------------------------------------ internals
    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else check_seconds("timeout", timeout)

    def _poll_relay(self, handler: Callable[[Any], object]) -> Callable[[Any], None]:
        def relay(msg: Message) -> None:  # runs in the bridge's thread
            try:
                self._inbox.put_nowait((handler, msg))
            except queue.Full:
                if self.dropped_messages == 0 or not self._woken:
                    log.warning(
                        "%s: poll() queue full (%d messages): dropping messages until "
                        "poll() runs (see dropped_messages)",
                        self._name,
                        self._inbox.maxsize,
                    )
                self.dropped_messages += 1
                return
            if not self._woken:
                self._woken = True
                if self.wakeup is not None:
                    self.wakeup()

        return relay

    def _send_later(self, msg: Message) -> None:
        """In the bridge's thread: queue ``msg`` for an ordered sender task."""
        if self._outbox is None:
            nursery = self._nursery
            if nursery is None:
                raise ShuttingDownException(f"{self._name} is ending; send_message() refused")
            send, recv = trio.open_memory_channel[Message](self.peer.send_queue_size)
            self._outbox = send
            nursery.start_soon(self._send_queued, recv)
        try:
            self._outbox.send_nowait(msg)
        except trio.WouldBlock:
            raise PeerkitError(
                f"{self._name}: {self.peer.send_queue_size} messages sent from handlers are "
                "still waiting to go out; send less from handlers, or raise send_queue_size"
            ) from None

    async def _send_queued(self, recv: trio.MemoryReceiveChannel[Message]) -> None:
        async with recv:
            async for msg in recv:
                try:
                    await self.peer.send_message(msg)
                except ShuttingDownException:
                    return
                except Exception as exc:
                    self.send_errors += 1
                    log.error("%s: a message sent from a handler was lost: %r", self._name, exc)


class SyncBroker(_Bridge):
    """A :class:`~peerkit.Broker` run in a thread of its own, for scripts and notebooks.

    ``with SyncBroker(**options) as broker:`` starts it (``broker.url`` is its address) and
    shuts it down cleanly at the end of the block.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 10.0, **options: Any
    ) -> None:
        #: the broker itself: read ``url`` and ``info()`` freely
        self.broker = Broker(host, port, **options)
        super().__init__("peerkit SyncBroker", timeout)

    @property
    def url(self) -> str:
        """``ws://host:port``, once started."""
        return self.broker.url

    async def _run(self, *, task_status: trio.TaskStatus[Any]) -> None:
        await self.broker.run(task_status=task_status)

    async def _stop(self) -> None:
        await self.broker.shutdown()

    def _close_timeout(self) -> float:
        return self.broker.grace_period + 5.0 + self.timeout
