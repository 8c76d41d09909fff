"""Wire protocol vocabulary (sans-IO): envelope kinds and the control messages.

A WebSocket binary frame holds one or more *envelopes* back to back, each a msgpack array
``[kind, type, sender, corr, target, body]``:

====== ======================================================================
kind   integer, one of :class:`Kind`
type   message type name (routing key); "" where unused
sender peer id of the sender, stamped by the broker; "" from peers
corr   correlation id of requests/queries (0 where unused); for PUB, the number of messages
target peer id for ``ask_peer`` queries; "" otherwise
body   the encoded message (msgpack bytes), opaque to the broker for PUB/QUERY/REPLY
====== ======================================================================

A PUB envelope carries a *run*: ``corr`` (at least 1) message bodies of the one ``type``,
packed back to back in ``body``, which is never larger than the broker's
``max_message_size``. A publisher's writer puts consecutive messages of one type in one run,
so the broker routes, stamps and queues a run at the cost of one message, and a subscriber
decodes a run with one msgpack unpacker. Order is kept: a run only joins neighbours.

The broker routes on the header only; it decodes bodies of control envelopes alone.
"""

from __future__ import annotations

import enum

import attrs

from .messages import Message, message

PROTOCOL_VERSION = 2


class Kind(enum.IntEnum):
    """What an envelope is."""

    HELLO = 1  #: peer → broker, first envelope; body :class:`Hello`
    WELCOME = 2  #: broker → peer; body :class:`Welcome`
    REJECT = 3  #: broker → peer, then close; body :class:`Reject`
    PUB = 4  #: publish (peer → broker) / deliver (broker → peer); corr = messages in the run
    SUB = 5  #: subscribe; type, target = sender ("" = all); body SubscribeOptions or none
    UNSUB = 6  #: unsubscribe; as SUB
    REG = 7  #: register query handler; body :class:`RegisterHandler`; corr → ACK
    UNREG = 8  #: unregister query handler for ``type``; corr → ACK
    ACK = 9  #: positive answer to a request (corr)
    NACK = 10  #: negative answer to a request (corr); body :class:`RequestFailed`
    QUERY = 11  #: query; target = peer id for ask_peer, "" = by handler registry
    REPLY = 12  #: answer to a query (corr); type/body = the response message
    QERR = 13  #: query failed (corr); body :class:`QueryFailed`
    QCANCEL = 14  #: asker gave up on a query (corr)
    DROPPED = 15  #: broker → subscriber; body :class:`~peerkit.messages.MessagesDropped`
    HEARTBEAT = 16  #: either direction, empty body
    GOODBYE = 17  #: peer → broker, last word; body :class:`~peerkit.messages.BrokerGoodbyeMsg`
    SHUTDOWN = 18  #: broker → peer; body :class:`~peerkit.messages.BrokerShutdownMsg`
    ERROR = 19  #: broker → peer: something the peer sent was refused; body :class:`RequestFailed`
    INFO = 20  #: introspection request to the broker (corr) → REPLY with :class:`BrokerInfo`
    STATE = 21  #: peer → broker: lifecycle state report; body :class:`PeerStateReport`
    TIME = 22  #: clock request to the broker (corr) → REPLY with :class:`BrokerTime`


KIND_VALUES = frozenset(int(k) for k in Kind)

#: ``Kind.PUB`` as a plain int, for the hot paths that compare kinds
PUB = int(Kind.PUB)


@message(type="peerkit.Hello")
class Hello(Message):
    peer_id: str
    protocol_version: int
    token: str = ""
    #: from the welcome of the peer's previous connection, when it comes back after losing
    #: it: the broker lets it replace that connection if the broker still holds it
    resume_token: str = ""


@message(type="peerkit.Welcome")
class Welcome(Message):
    peer_id: str
    heartbeat_interval: float
    heartbeat_timeout: float
    max_message_size: int
    #: a secret the peer presents in its hello if it has to reconnect (see Hello)
    resume_token: str = ""


@message(type="peerkit.Reject")
class Reject(Message):
    #: duplicate_id | bad_token | bad_version | bad_id | too_many_peers | bad_hello |
    #: too_many_handshakes | shutting_down
    reason: str
    detail: str


SHARE_POLICIES = ("exclusive", "round_robin", "explicit")

#: How a subscription is delivered when its subscriber is slower than the publishers:
#: ``drop`` the newest (counted), keep the ``latest`` (the oldest dropped, counted), or
#: ``lossless`` (the publishers are slowed down instead).
DELIVERIES = ("drop", "latest", "lossless")
#: the order in which a subscriber's several subscriptions to one stream win
DELIVERY_RANK = {"drop": 0, "latest": 1, "lossless": 2}


@message(type="peerkit.SubscribeOptions")
class SubscribeOptions(Message):
    """The body of a ``SUB`` envelope (none: the defaults)."""

    delivery: str = "drop"


@message(type="peerkit.RegisterHandler")
class RegisterHandler(Message):
    msg_type: str
    policy: str = "exclusive"


@message(type="peerkit.RequestFailed")
class RequestFailed(Message):
    code: str
    detail: str


@message(type="peerkit.QueryFailed")
class QueryFailed(Message):
    #: no_handler | handler_gone | remote_error | multiple | too_large | bad_reply |
    #: bad_request | busy (the broker, or the handler, cannot take it now: retry later) |
    #: timeout (no answer within the broker's ``query_deadline``)
    code: str
    detail: str
    peer_id: str = ""
    error_type: str = ""
    peers: list[str] = attrs.field(factory=list)


@message(type="peerkit.PeerInfo")
class PeerInfo(Message):
    peer_id: str
    subscriptions: list[str] = attrs.field(factory=list)
    query_handlers: list[str] = attrs.field(factory=list)
    queued: int = 0  #: published messages waiting in the broker to go to this peer
    #: bytes waiting in the broker to go to this peer (published messages and control
    #: envelopes)
    queued_bytes: int = 0
    dropped: int = 0  #: published messages meant for this peer that the broker dropped
    msgs_in: int = 0  #: messages this peer published
    msgs_out: int = 0  #: published messages the broker sent to this peer
    state: str = ""
    base: str = ""  #: the base state ``state`` counts as (a custom state's)
    connected_at: float = 0.0  #: when the broker welcomed it (seconds since the epoch)


@message(type="peerkit.TypeInfo")
class TypeInfo(Message):
    """Traffic of one message type through the broker, since it started."""

    msg_type: str
    published: int = 0  #: messages of the type peers published
    routed: int = 0  #: copies the broker routed to subscribers (before any drop)
    queries: int = 0  #: queries of the type the broker routed to a handler
    answered: int = 0  #: of those, answered (a reply or an error from the handler)
    #: mean time from the broker routing a query to the handler's answer, in ms
    answer_ms: float = 0.0


@message(type="peerkit.BrokerInfo")
class BrokerInfo(Message):
    peers: list[PeerInfo] = attrs.field(factory=list)
    #: per message type (at most ``MAX_TYPE_STATS`` types; the rest as ``"(other)"``)
    types: list[TypeInfo] = attrs.field(factory=list)


@message(type="peerkit.BrokerTime")
class BrokerTime(Message):
    """The broker's clock (seconds since the epoch), for peers that measure their offset
    to it (the JavaScript client does, NTP style)."""

    time: float


@message(type="peerkit.PeerStateReport")
class PeerStateReport(Message):
    """A peer tells the broker its lifecycle state: the broker shows it and publishes a
    :class:`~peerkit.messages.PeerStateChanged` for each change. ``base`` is the base state
    a custom state counts as (empty: the state is a base state)."""

    state: str
    base: str = ""
