"""The broker's view of one peer connection, and how the server is started (internal)."""

from __future__ import annotations

import collections
import ipaddress
import logging

import trio

from ._ws import WebSocket
from .errors import PeerkitError
from .messages import BrokerGoodbyeMsg, PanickMsg, PeerLeft

log = logging.getLogger("peerkit.broker")

#: The sender id the broker uses for messages it publishes itself.
BROKER_ID = "broker"
_RESERVED_IDS = frozenset({BROKER_ID, ""})
_MAX_ID_LEN = 200

_PANICK_TYPE = PanickMsg.message_type()
_PEER_LEFT_TYPE = PeerLeft.message_type()

#: Control envelopes (answers, queries, notices) a connection may have waiting beside its
#: published messages before the broker gives the peer up as not reading.
CONTROL_BACKLOG = 4096


class Changes:
    """The connections with something new to send, while the broker's reader handles an
    incoming frame (``holding``).

    Their writers are not woken during the frame: at its end the reader writes at once what
    the kernel takes (``Broker._send_inline``) and wakes only the writers with work left, so
    a query or a lone message costs no writer pass. Outside a frame (a heartbeat, a peer
    leaving) a change wakes the writer straight away.
    """

    __slots__ = ("conns", "holding")

    def __init__(self) -> None:
        self.conns: set[_Conn] = set()
        self.holding = False


class _Conn:
    """One authenticated peer connection, seen from the broker."""

    __slots__ = (
        "changes",
        "close_reason",
        "dropped_pending",
        "dropped_total",
        "goodbye",
        "last_seen",
        "last_sent",
        "limit",
        "msgs_in",
        "msgs_out",
        "out",
        "peer_id",
        "queued",
        "scope",
        "state",
        "wakeup",
        "ws",
    )

    def __init__(self, peer_id: str, ws: WebSocket, limit: int, changes: Changes) -> None:
        self.peer_id = peer_id
        self.changes = changes  # the broker's
        self.ws = ws
        self.limit = limit
        #: envelopes as (head, body, published messages): a control envelope is all head and
        #: carries none; a PUB run's body is shared by every subscriber's queue
        self.out: collections.deque[tuple[bytes, bytes, int]] = collections.deque()
        self.queued = 0  # published messages in ``out``: at most ``limit``
        self.wakeup = trio.Event()
        self.dropped_pending = 0
        self.dropped_total = 0
        self.close_reason: str | None = None
        self.goodbye: BrokerGoodbyeMsg | None = None
        self.last_seen = trio.current_time()
        self.last_sent = self.last_seen
        self.scope = trio.CancelScope()
        self.msgs_in = 0
        self.msgs_out = 0
        self.state = "connected"

    def kick(self, reason: str) -> None:
        """Close this connection (the first reason given is the one reported)."""
        if self.close_reason is None:
            self.close_reason = reason
            log.warning("disconnecting %r: %s", self.peer_id, reason)
        self.scope.cancel(reason=reason)

    def push(self, data: bytes) -> None:
        """Queue a control envelope. These are never dropped; a peer that lets more than
        :data:`CONTROL_BACKLOG` of them (beside its published messages) pile up does not
        read what it asked for, and is disconnected."""
        out = self.out
        out.append((data, b"", 0))
        self._changed()
        if len(out) > self.limit + CONTROL_BACKLOG:
            self.kick(
                f"it does not read the broker's answers ({len(out)} envelopes waiting; "
                "a peer must keep reading its connection)"
            )

    def push_run(self, head: bytes, body: bytes, count: int) -> None:
        """Queue a PUB envelope of ``count`` messages (the caller checked the room)."""
        self.queued += count
        self.out.append((head, body, count))
        self._changed()

    def lost(self, count: int) -> None:
        """Count published messages that did not fit (reported in the next frame)."""
        self.dropped_pending += count
        self.dropped_total += count
        self._changed()

    def _changed(self) -> None:
        """Something new to send: the reader may write it at once, else the writer will."""
        changes = self.changes
        if changes.holding:
            changes.conns.add(self)
        else:
            self.wakeup.set()


def _check_bind(host: str, token: str | None) -> None:
    if not isinstance(host, str) or not host:
        raise PeerkitError(f"host must be a non-empty string, got {host!r}")
    if token is not None and (not isinstance(token, str) or not token):
        raise PeerkitError("token must be a non-empty string (or None on loopback)")
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and token is None:
        raise PeerkitError(
            f"binding the broker to {host!r} exposes it beyond this machine; pass token='...' "
            "(a shared secret every peer must present) or bind 127.0.0.1"
        )
