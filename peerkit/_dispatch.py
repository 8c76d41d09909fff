"""How the broker handles each envelope a peer sends: publish, subscriptions, query
handlers and query routing (internal). It decides and queues; the connections write.

It also enforces the limits that concern envelopes (:class:`~peerkit._limits.Limits`): the
size of every body and name, the queries waiting for answers (per asker, in total, and to a
handler whose connection is filling up, with a deadline), and the rate of broker-info
requests. Whatever it refuses gets one answer, addressed to whoever sent it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import attrs
import trio

from . import _connection, codec
from ._admission import BROKER_ID
from ._batching import MAX_BATCH
from ._connection import Connection
from ._limits import Limits, TokenBucket, fit_bytes
from .codec import Envelope, control, envelope_head, pack_envelope
from .errors import BrokerRequestError, DecodeError, MultiplePeersAvailable, NoHandlerError
from .messages import BrokerGoodbyeMsg, PeerStateChanged
from .protocol import (
    DELIVERY_RANK,
    BrokerInfo,
    BrokerTime,
    Kind,
    PeerStateReport,
    QueryFailed,
    RegisterHandler,
    RequestFailed,
    SubscribeOptions,
    TypeInfo,
)
from .protocol import PUB as _PUB
from .routing import RoutingTable

log = logging.getLogger("peerkit.broker")

_STATE_CHANGED = PeerStateChanged.message_type()
_BROKER_TIME = BrokerTime.message_type()
_BROKER_INFO = BrokerInfo.message_type()
#: longest state name a peer may report
MAX_STATE_LEN = 100
#: message types whose traffic broker info reports one by one (the rest: "(other)")
MAX_TYPE_STATS = 1000

#: Kinds of the requests answered with ACK/NACK (or, for INFO and TIME, REPLY/NACK).
_REQUESTS = frozenset(
    int(k) for k in (Kind.SUB, Kind.UNSUB, Kind.REG, Kind.UNREG, Kind.INFO, Kind.TIME)
)
_ANSWERS = frozenset({int(Kind.REPLY), int(Kind.QERR)})


@attrs.define(eq=False)
class Dispatcher:
    """The broker's envelope handling, over its routing table and its connections."""

    routing: RoutingTable
    conns: dict[str, Connection]
    info: Callable[[], BrokerInfo]
    limits: Limits
    #: the encoded broker info of the frame being read: (connection, (its frame, routing
    #: changes), body)
    _info_cache: tuple[Connection, tuple[int, int], bytes] | None = attrs.field(
        init=False, default=None
    )
    _info_busy: bytes = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._info_busy = codec.encode_body(
            RequestFailed(
                code="busy",
                detail=f"more than info_rate={self.limits.info_rate:g} broker-info requests a "
                "second from this peer; ask less often (or raise the broker's info_rate)",
            )
        )

    @property
    def max_message_size(self) -> int:
        return self.limits.max_message_size

    #: per message type: [published, routed, queries, answered, answer µs in all]
    types: dict[str, list[int]] = attrs.field(factory=dict)

    def _count(self, msg_type: str) -> list[int]:
        row = self.types.get(msg_type)
        if row is None:
            # bounded: invented type names cannot grow it without end
            key = msg_type if len(self.types) < MAX_TYPE_STATS else "(other)"
            row = self.types.setdefault(key, [0, 0, 0, 0, 0])
        return row

    def type_stats(self) -> list[TypeInfo]:
        """Traffic per message type, for broker info (the dashboard shows it)."""
        return [
            TypeInfo(
                msg_type=t,
                published=p,
                routed=r,
                queries=q,
                answered=a,
                answer_ms=round(us / a / 1000, 3) if a else 0.0,
            )
            for t, (p, r, q, a, us) in sorted(self.types.items())
        ]

    def dispatch(self, conn: Connection, env: Envelope) -> None:
        """Handle one envelope from ``conn`` (in its reader task)."""
        kind = env.kind
        limits = self.limits
        if len(env.type) > limits.max_type_length or len(env.target) > limits.max_id_length:
            self._refuse(conn, env, "bad_request", self._bad_names(env))
        elif kind == _PUB:
            count = env.corr
            if len(env.body) > limits.max_message_size:
                self._refuse_too_large(conn, env)
            elif not 1 <= count <= min(MAX_BATCH, len(env.body)):
                self._error(
                    conn,
                    "bad_request",
                    f"a PUB envelope carries 1 to {MAX_BATCH} messages of at least one byte "
                    f"each; this one announced {count} in {len(env.body)} bytes",
                )
            else:
                conn.msgs_in += count
                self.publish(conn.peer_id, env.type, env.body, count)
        elif len(env.body) > limits.max_message_size:  # every other kind, too
            self._refuse_too_large(conn, env)
        elif kind == Kind.HEARTBEAT:
            pass
        elif kind == Kind.QUERY:
            self._route_query(conn, env)
        elif kind == Kind.REPLY or kind == Kind.QERR:
            pq = self.routing.close_query(env.corr, conn.peer_id)
            if pq is not None:
                row = self._count(pq.msg_type)
                row[3] += 1  # answered: its round trip through the handler, in µs
                row[4] += round(
                    1e6 * (trio.current_time() - pq.deadline + self.limits.query_deadline)
                )
                target = self.conns.get(pq.asker)
                if target is not None:
                    target.push(
                        pack_envelope(kind, env.type, conn.peer_id, pq.asker_corr, "", env.body)
                    )
        elif kind == Kind.QCANCEL:
            self.routing.cancel_query(conn.peer_id, env.corr)
        elif kind == Kind.SUB or kind == Kind.UNSUB:
            self._subscription(conn, env)
        elif kind == Kind.REG or kind == Kind.UNREG:
            self._handler_registration(conn, env)
        elif kind == Kind.INFO:
            self._answer_info(conn, env.corr)
        elif kind == Kind.TIME:
            now = BrokerTime(time=time.time())
            conn.answer(
                control(Kind.REPLY, now, corr=env.corr, type=_BROKER_TIME, sender=BROKER_ID)
            )
        elif kind == Kind.STATE:
            try:
                report = codec.decode_body(PeerStateReport, env.body)
                assert isinstance(report, PeerStateReport)
            except DecodeError as exc:
                self._error(conn, "bad_state", str(exc))
            else:
                self.state_changed(conn, report.state, report.base or report.state)
        elif kind == Kind.GOODBYE:
            try:
                goodbye = codec.decode_body(BrokerGoodbyeMsg, env.body, conn.peer_id)
                assert isinstance(goodbye, BrokerGoodbyeMsg)
            except DecodeError:
                goodbye = BrokerGoodbyeMsg(error_msg="(unreadable goodbye)")
            conn.goodbye = goodbye
        else:
            self._error(conn, "unexpected", f"unexpected envelope kind {Kind(kind).name}")

    def state_changed(self, conn: Connection, state: str, base: str) -> None:
        """Note a peer's new state and publish the change (on the peer's behalf)."""
        if len(state) > MAX_STATE_LEN or len(base) > MAX_STATE_LEN:
            self._error(conn, "bad_state", f"a state name has at most {MAX_STATE_LEN} characters")
            return
        old, conn.state, conn.base = conn.state, state, base
        self._info_cache = None
        if old != state:
            event = PeerStateChanged(peer_id=conn.peer_id, old=old, new=state, base=base)
            self.publish(conn.peer_id, _STATE_CHANGED, codec.encode_body(event))

    def publish(self, sender: str, msg_type: str, body: bytes, count: int = 1) -> None:
        """Deliver a run of ``count`` messages (one body if 1) to the subscribers.

        Each subscriber's queue takes what fits; the rest is dropped and counted.
        """
        subscribers = self.routing.subscribers(msg_type, sender)
        row = self._count(msg_type)
        row[0] += count
        if not subscribers:
            return
        row[1] += count * len(subscribers)
        head = envelope_head(_PUB, msg_type, sender, count, "", len(body))
        size = len(head) + len(body)
        conns = self.conns
        for pid in subscribers:
            target = conns.get(pid)
            if target is None:
                continue
            room, room_bytes = target.room()
            if count <= room and size <= room_bytes:
                target.push_run(head, body, count)
                continue
            if target.delivery:
                mode = target.mode_for(msg_type, sender)
                if mode == "lossless":  # queue it all; the publisher waits (see Connection)
                    target.push_run(head, body, count)
                    source = conns.get(sender)
                    if source is not None and source is not target:
                        source.backpressure.add(target)
                    continue
                if mode == "latest":  # room for the newest: the oldest of the type go
                    target.evict_oldest(
                        msg_type, min(count, target.limit), min(size, target.max_bytes)
                    )
                    room, room_bytes = target.room()
                    part, kept = codec.fit_run(body, count, room, newest=True)
                    part, kept = fit_bytes(part, kept, room_bytes - len(head), newest=True)
                    if kept:
                        part_head = envelope_head(_PUB, msg_type, sender, kept, "", len(part))
                        target.push_run(part_head, part, kept)
                    if kept < count:
                        target.lost(count - kept)
                    continue
            # cut the run where the room ends, in messages and in bytes (the head of the
            # shorter run is no longer than this one's)
            part, kept = codec.fit_run(body, count, room)
            part, kept = fit_bytes(part, kept, room_bytes - len(head))
            if kept:
                part_head = envelope_head(_PUB, msg_type, sender, kept, "", len(part))
                target.push_run(part_head, part, kept)
            target.lost(count - kept)
            if self.limits.overflow == "disconnect":
                limits = self.limits
                target.kick(
                    f"its outgoing queue overflowed (send_queue_size={limits.send_queue_size}, "
                    f"send_queue_bytes={limits.send_queue_bytes}): it reads too slowly"
                )

    def _refuse_too_large(self, conn: Connection, env: Envelope) -> None:
        kind = env.kind
        if kind == _PUB:
            what = f"message {env.type!r}" if env.corr == 1 else f"run of {env.corr} {env.type!r}"
        elif kind == Kind.QUERY:
            what = f"query {env.type!r}"
        elif kind == Kind.REPLY:
            what = f"reply {env.type!r}"
        else:
            what = f"{Kind(kind).name} envelope"
        detail = (
            f"{what} is {len(env.body)} bytes, over the broker's "
            f"max_message_size of {self.max_message_size} bytes; it was not delivered"
        )
        report = conn.bad_frames.hit(("too_large", env.type))
        if report is not None:
            log.warning("from %r: %s%s", conn.peer_id, detail, report.more())
        self._refuse(conn, env, "too_large", detail)

    def _bad_names(self, env: Envelope) -> str:
        limits = self.limits
        if len(env.type) > limits.max_type_length:
            return (
                f"a message type name of {len(env.type)} characters is over the broker's "
                f"max_type_length of {limits.max_type_length}; choose a shorter name "
                "(@message(type=...))"
            )
        return (
            f"a peer id of {len(env.target)} characters is over the broker's max_id_length "
            f"of {limits.max_id_length}"
        )

    def _refuse(self, conn: Connection, env: Envelope, code: str, detail: str) -> None:
        """Refuse an envelope: one answer, to whoever waits for one."""
        kind = env.kind
        if kind == Kind.QUERY:
            self._query_refused(conn, env.corr, QueryFailed(code=code, detail=detail))
        elif kind in _ANSWERS:
            # the asker waits for this answer: it gets the failure instead; the handler is
            # told what was wrong with its answer
            pq = self.routing.close_query(env.corr, conn.peer_id)
            if pq is not None:
                failure = QueryFailed(
                    code=code,
                    detail=f"the answer of {conn.peer_id!r} to the {pq.msg_type!r} query was "
                    f"refused by the broker: {detail}",
                    peer_id=conn.peer_id,
                )
                self.query_failed(pq.asker, pq.asker_corr, failure)
            self._error(conn, code, detail)
        elif kind in _REQUESTS:
            self._nack(conn, env.corr, code, detail)
        elif kind == Kind.GOODBYE:
            conn.goodbye = BrokerGoodbyeMsg(error_msg=f"(unreadable goodbye: {code})")
        else:
            self._error(conn, code, detail)

    # The answers to what ``conn`` sent go through conn.answer(): its reader waits for the
    # writer when they pile up (see peerkit._connection).
    def _error(self, conn: Connection, code: str, detail: str) -> None:
        conn.answer(control(Kind.ERROR, RequestFailed(code=code, detail=detail)))

    def _ack(self, conn: Connection, corr: int) -> None:
        conn.answer(pack_envelope(int(Kind.ACK), "", BROKER_ID, corr))

    def _nack(self, conn: Connection, corr: int, code: str, detail: str) -> None:
        conn.answer(control(Kind.NACK, RequestFailed(code=code, detail=detail), corr=corr))

    def _query_refused(self, conn: Connection, corr: int, failure: QueryFailed) -> None:
        """The query ``corr`` that ``conn`` just sent fails at once."""
        conn.answer(control(Kind.QERR, failure, corr=corr, sender=BROKER_ID))

    def _subscription(self, conn: Connection, env: Envelope) -> None:
        if not env.type:
            self._nack(conn, env.corr, "bad_request", "subscription without a message type")
            return
        sender = env.target or None
        if env.kind == Kind.SUB:
            delivery = "drop"
            if env.body:
                try:
                    options = codec.decode_body(SubscribeOptions, env.body)
                    assert isinstance(options, SubscribeOptions)
                except DecodeError as exc:
                    self._nack(conn, env.corr, "bad_request", str(exc))
                    return
                delivery = options.delivery
                if delivery not in DELIVERY_RANK:
                    self._nack(
                        conn,
                        env.corr,
                        "bad_request",
                        f"delivery must be one of {', '.join(DELIVERY_RANK)}, not {delivery!r}",
                    )
                    return
            try:
                self.routing.subscribe(conn.peer_id, env.type, sender)
            except BrokerRequestError as exc:
                self._nack(conn, env.corr, exc.code, str(exc))
                return
            if delivery == "drop":
                conn.delivery.pop((env.type, sender), None)
            else:
                conn.delivery[(env.type, sender)] = delivery
        else:
            self.routing.unsubscribe(conn.peer_id, env.type, sender)
            conn.delivery.pop((env.type, sender), None)
        self._ack(conn, env.corr)

    def _answer_info(self, conn: Connection, corr: int) -> None:
        """Broker info, at most ``info_rate`` a second per connection, computed at most once
        per incoming frame (while nothing changes): a frame of many requests costs one."""
        now = trio.current_time()
        bucket = conn.info_bucket
        if bucket is None:
            bucket = conn.info_bucket = TokenBucket(self.limits.info_rate, now)
        if not bucket.take(now):
            conn.answer(pack_envelope(int(Kind.NACK), "", "", corr, "", self._info_busy))
            return
        key = (conn.frames_in, self.routing.changes)
        cache = self._info_cache
        if cache is not None and cache[0] is conn and cache[1] == key:
            body = cache[2]
        else:
            body = codec.encode_body(self.info())
            self._info_cache = (conn, key, body)
        conn.answer(pack_envelope(int(Kind.REPLY), _BROKER_INFO, BROKER_ID, corr, "", body))

    def _handler_registration(self, conn: Connection, env: Envelope) -> None:
        try:
            if env.kind == Kind.REG:
                reg = codec.decode_body(RegisterHandler, env.body)
                assert isinstance(reg, RegisterHandler)
                if len(reg.msg_type) > self.limits.max_type_length:
                    raise BrokerRequestError(
                        "bad_request", self._bad_names(env._replace(type=reg.msg_type))
                    )
                self.routing.register_handler(conn.peer_id, reg.msg_type, reg.policy)
            elif not self.routing.unregister_handler(conn.peer_id, env.type):
                raise BrokerRequestError(
                    "not_registered", f"{conn.peer_id!r} does not handle {env.type!r} queries"
                )
        except BrokerRequestError as exc:
            self._nack(conn, env.corr, exc.code, str(exc))
        except DecodeError as exc:
            self._nack(conn, env.corr, "bad_request", str(exc))
        else:
            self._ack(conn, env.corr)

    def _route_query(self, conn: Connection, env: Envelope) -> None:
        if env.target:
            handler = env.target
            if handler not in self.conns:
                self._query_refused(
                    conn,
                    env.corr,
                    QueryFailed(
                        code="no_handler",
                        detail=f"peer {handler!r} is not connected",
                        peer_id=handler,
                    ),
                )
                return
        else:
            try:
                handler = self.routing.handler_for(env.type)
            except NoHandlerError as exc:
                self._query_refused(conn, env.corr, QueryFailed(code="no_handler", detail=str(exc)))
                return
            except MultiplePeersAvailable as exc:
                self._query_refused(
                    conn,
                    env.corr,
                    QueryFailed(code="multiple", detail=str(exc), peers=list(exc.peers)),
                )
                return
        target = self.conns[handler]
        busy = self._busy(conn.peer_id, target)
        if busy is not None:
            self._query_refused(
                conn, env.corr, QueryFailed(code="busy", detail=busy, peer_id=handler)
            )
            return
        deadline = trio.current_time() + self.limits.query_deadline
        corr = self.routing.open_query(conn.peer_id, env.corr, handler, env.type, deadline)
        self._count(env.type)[2] += 1
        target.push(pack_envelope(int(Kind.QUERY), env.type, conn.peer_id, corr, "", env.body))

    def _busy(self, asker: str, handler: Connection) -> str | None:
        """Why a query from ``asker`` to ``handler`` cannot wait for its answer now, if it
        cannot: the asker has too many waiting, the broker has, or the handler's connection
        is filling up (a peer is never given up for the queries others send it)."""
        limits = self.limits
        routing = self.routing
        if routing.pending_of(asker) >= limits.max_pending_queries:
            return (
                f"{asker!r} already has max_pending_queries={limits.max_pending_queries} "
                "queries waiting for answers; wait for some of them (or raise the broker's "
                "max_pending_queries)"
            )
        if routing.pending_count() >= limits.max_pending_queries_total:
            return (
                "the broker already has max_pending_queries_total="
                f"{limits.max_pending_queries_total} queries waiting for answers; retry later"
            )
        if (
            handler.controls >= _connection.CONTROL_BACKLOG // 2
            or handler.control_bytes >= handler.max_bytes // 2
        ):
            return (
                f"peer {handler.peer_id!r} has {handler.controls} envelopes "
                f"({handler.control_bytes} bytes) waiting at the broker: it reads too slowly "
                "to take more queries now; retry later"
            )
        return None

    def query_failed(self, asker: str, corr: int, failure: QueryFailed) -> None:
        target = self.conns.get(asker)
        if target is not None:
            target.push(control(Kind.QERR, failure, corr=corr, sender=BROKER_ID))

    def expire_queries(self, now: float) -> int:
        """Fail the queries past the broker's ``query_deadline`` (the asker gets a
        ``timeout`` outcome; a late answer is dropped quietly); returns how many."""
        expired = self.routing.expire(now)
        for pq in expired:
            self.query_failed(
                pq.asker,
                pq.asker_corr,
                QueryFailed(
                    code="timeout",
                    detail=f"peer {pq.handler!r} did not answer the {pq.msg_type!r} query "
                    f"within the broker's query_deadline of {self.limits.query_deadline:g} s",
                    peer_id=pq.handler,
                ),
            )
        return len(expired)
