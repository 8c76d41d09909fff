"""What the parts of :class:`~peerkit.Peer` share: its attributes and small helpers
(internal)."""

from __future__ import annotations

import collections
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from . import _ws
from ._wsconf import Outgoing, Run
from .codec import Envelope
from .errors import NotConnectedException, ShuttingDownException
from .messages import MessagesDropped
from .protocol import Welcome
from .states import PeerState, StateMachine

log = logging.getLogger("peerkit.peer")

Handler = Callable[[Any], Any]

#: How large a frame the peer accepts from the broker (the broker enforces message sizes).
_PEER_WS_MAX_FRAME = 256 * 1024 * 1024
_DROPPED_TYPE = MessagesDropped.message_type()
#: send_message yields to the scheduler (and so lets the writer fill a frame) once it queued
#: this many bytes since it last did, counting each message as its body plus _YIELD_OVERHEAD
#: (about 850 messages of 100 bytes, or 60 of 8 KiB: frames of ~100-500 KiB under load)
_YIELD_BYTES = 512 * 1024
_YIELD_OVERHEAD = 512


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


def _never_run(awaitable: object) -> None:
    """Close a query handler's coroutine that will not be awaited (no "never awaited"
    warning)."""
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()


class PeerBase(StateMachine):
    """Attributes every part of the peer uses; :class:`~peerkit.Peer` initialises them."""

    peer_id: str
    broker_url: str
    ssl_context: ssl.SSLContext | None
    token: str | None
    connect_timeout: float
    request_timeout: float
    query_timeout: float
    send_timeout: float
    grace_period: float
    send_queue_size: int
    receive_queue_size: int
    max_concurrent_queries: int
    busy_poll: float
    msgs_in: int
    msgs_out: int
    dropped_messages: int
    decode_errors: int

    _error: BaseException | None
    _main_scope: trio.CancelScope
    _stop_on_shutdown: bool
    _ws: _ws.WebSocket | None
    _link_ok: bool
    _can_send: bool
    _welcome: Welcome | None
    _heard: float
    _caller_reads: bool
    _read_scope: trio.CancelScope | None
    _reads_back: trio.Event
    _max_message_size: int
    _out: collections.deque[Outgoing]
    _tail: Run | None
    _out_ready: trio.Event
    _progress: trio.lowlevel.ParkingLot
    _enqueued: int
    _unyielded: int
    _sent: int
    _next_corr: int
    _pending: dict[int, _Pending]
    _subs: dict[str, list[_Sub]]
    _sub_refs: collections.Counter[tuple[str, str | None]]
    _sub_acks: dict[tuple[str, str | None], _Pending]
    _query_handlers: dict[str, Handler]
    _builtin_queries: dict[str, Handler]
    _inbox: collections.deque[Envelope]
    _inbox_count: int
    _run_left: int
    _inbox_ready: trio.Event
    _local_drops: int
    _query_send: trio.MemorySendChannel[tuple[Envelope, Awaitable[Any]]]
    _query_recv: trio.MemoryReceiveChannel[tuple[Envelope, Awaitable[Any]]]
    _queued_tasks: list[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]]

    def _messages_dropped(self, count: int) -> None:
        """Called when ``count`` messages meant for this peer were lost (queue overflow)."""
        log.warning(
            "peer %r lost %d messages: they came faster than it took them in (its queue at "
            "the broker or its own receive queue was full; total %d, see "
            "peer.dropped_messages)",
            self.peer_id,
            count,
            self.dropped_messages,
        )

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
