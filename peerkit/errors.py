"""Every exception peerkit raises on purpose.

All of them derive from :class:`PeerkitError`. This module has no I/O and no trio import.
"""

from __future__ import annotations

from collections.abc import Sequence


class PeerkitError(Exception):
    """Base class of every error peerkit raises on purpose."""


class HandlerSignatureError(PeerkitError, TypeError):
    """A handler cannot be called the way peerkit calls it: with the message alone."""


class InvalidStateTransition(PeerkitError, AssertionError):
    """A peer was asked to move between two states the lifecycle table does not connect.

    It is an :class:`AssertionError` too (as in OBCI), raised explicitly so that it survives
    ``python -O``.
    """

    def __init__(self, old: object, new: object) -> None:
        super().__init__(f"invalid peer state transition {old} -> {new}")
        self.old = old
        self.new = new


class ShuttingDownException(PeerkitError):
    """The peer is shutting down (or finished): no new tasks, messages or subscriptions."""


class NotConnectedException(PeerkitError):
    """The operation needs a connection to the broker and the peer is not connected yet."""


class ProtocolError(PeerkitError):
    """The other side broke the wire protocol (bad frame, bad envelope, bad handshake)."""


class DecodeError(ProtocolError):
    """Bytes could not be turned into an envelope or a message.

    Raised for garbage, truncated data, unknown message types and fields of the wrong type.
    """


class UnknownMessageType(DecodeError):
    """A message type name that no registered :class:`~peerkit.Message` class carries."""


class MessageTooLarge(PeerkitError):
    """A message body is bigger than the configured ``max_message_size``."""

    def __init__(self, size: int, limit: int, msg_type: str = "") -> None:
        what = f"message {msg_type!r}" if msg_type else "message"
        super().__init__(
            f"{what} is {size} bytes, over the limit of {limit} bytes; "
            "send smaller messages or raise max_message_size on the broker and the peers"
        )
        self.size = size
        self.limit = limit


class HandshakeRejected(PeerkitError):
    """The broker refused this peer's hello (duplicate id, bad token, wrong version, full)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class DuplicatePeerId(HandshakeRejected):
    """Another connected peer already uses this peer id."""


class BrokerLostError(PeerkitError):
    """The connection to the broker was lost (closed, or silent past the heartbeat deadline)."""


class BrokerRequestError(PeerkitError):
    """The broker refused a request (subscription, handler registration, ...)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


class HandlerAlreadyRegistered(BrokerRequestError):
    """A query handler for this message type is already registered by another peer."""


class QueryAnswerUnknown(PeerkitError):
    """A query did not produce a response message.

    The subclasses say why: no handler, the handler left, the handler raised, a timeout.
    """


class NoHandlerError(QueryAnswerUnknown):
    """No peer handles this query type (or the named peer is not connected)."""


class HandlerGoneError(QueryAnswerUnknown):
    """The peer handling the query disconnected before answering."""


class QueryTimeout(QueryAnswerUnknown, TimeoutError):
    """No answer arrived within the query's timeout (or the broker's ``query_deadline``)."""


class BrokerBusyError(QueryAnswerUnknown):
    """The broker refused the query at once, without forwarding it: too many queries are
    waiting for answers (the asker's ``max_pending_queries``, or all peers'), or the handler
    has too much waiting at the broker. Nothing was asked: retry later."""


class RemoteError(QueryAnswerUnknown):
    """The remote query handler raised an exception.

    ``peer_id``, ``error_type`` and ``error_message`` describe it.
    """

    def __init__(self, peer_id: str, error_type: str, error_message: str) -> None:
        super().__init__(f"peer {peer_id!r} raised {error_type}: {error_message}")
        self.peer_id = peer_id
        self.error_type = error_type
        self.error_message = error_message


class MultiplePeersAvailable(QueryAnswerUnknown):
    """Several peers handle this query type with the ``"explicit"`` policy.

    Pick one of ``peers`` and use :meth:`Peer.ask_peer`.
    """

    def __init__(self, msg_type: str, peers: Sequence[str]) -> None:
        super().__init__(
            f"{len(peers)} peers handle {msg_type!r}: {', '.join(peers)}; "
            "choose one and call ask_peer(peer_id, msg)"
        )
        self.peers = tuple(peers)


class PeerPanicked(PeerkitError):
    """Raised by ``run()`` when a peer is shut down by an error that is not an Exception."""


class BrokerConnectError(PeerkitError):
    """The peer could not reach the broker or complete the WebSocket handshake."""
