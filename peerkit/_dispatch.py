"""How the broker handles each envelope a peer sends: publish, subscriptions, query
handlers and query routing (internal). It decides and queues; the connections write."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

import attrs

from . import codec
from ._admission import BROKER_ID
from ._batching import MAX_BATCH
from ._connection import Connection
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
)
from .protocol import PUB as _PUB
from .routing import RoutingTable

log = logging.getLogger("peerkit.broker")

_STATE_CHANGED = PeerStateChanged.message_type()
_BROKER_TIME = BrokerTime.message_type()
#: longest state name a peer may report
MAX_STATE_LEN = 100


@attrs.define(eq=False)
class Dispatcher:
    """The broker's envelope handling, over its routing table and its connections."""

    routing: RoutingTable
    conns: dict[str, Connection]
    info: Callable[[], BrokerInfo]
    max_message_size: int
    send_queue_size: int
    overflow: Literal["drop", "disconnect"]

    def dispatch(self, conn: Connection, env: Envelope) -> None:
        """Handle one envelope from ``conn`` (in its reader task)."""
        kind = env.kind
        if kind == _PUB:
            count = env.corr
            if len(env.body) > self.max_message_size:
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
        elif kind == Kind.HEARTBEAT:
            pass
        elif kind == Kind.QUERY:
            self._route_query(conn, env)
        elif kind == Kind.REPLY or kind == Kind.QERR:
            pq = self.routing.close_query(env.corr, conn.peer_id)
            if pq is not None:
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
            info = self.info()
            conn.push(
                control(Kind.REPLY, info, corr=env.corr, type=info.message_type(), sender=BROKER_ID)
            )
        elif kind == Kind.TIME:
            now = BrokerTime(time=time.time())
            conn.push(control(Kind.REPLY, now, corr=env.corr, type=_BROKER_TIME, sender=BROKER_ID))
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
        if old != state:
            event = PeerStateChanged(peer_id=conn.peer_id, old=old, new=state, base=base)
            self.publish(conn.peer_id, _STATE_CHANGED, codec.encode_body(event))

    def publish(self, sender: str, msg_type: str, body: bytes, count: int = 1) -> None:
        """Deliver a run of ``count`` messages (one body if 1) to the subscribers.

        Each subscriber's queue takes what fits; the rest is dropped and counted.
        """
        subscribers = self.routing.subscribers(msg_type, sender)
        if not subscribers:
            return
        head = envelope_head(_PUB, msg_type, sender, count, "", len(body))
        conns = self.conns
        for pid in subscribers:
            target = conns.get(pid)
            if target is None:
                continue
            if count > target.limit - target.queued and target.delivery:
                mode = target.mode_for(msg_type, sender)
                if mode == "lossless":  # queue it all; the publisher waits (see Connection)
                    target.push_run(head, body, count)
                    source = conns.get(sender)
                    if source is not None and source is not target:
                        source.backpressure.add(target)
                    continue
                if mode == "latest":  # room for the newest: the oldest of the type go
                    target.evict_oldest(msg_type, min(count, target.limit))
                    part, kept = codec.fit_run(
                        body, count, target.limit - target.queued, newest=True
                    )
                    if kept:
                        part_head = envelope_head(_PUB, msg_type, sender, kept, "", len(part))
                        target.push_run(part_head, part, kept)
                    if kept < count:
                        target.lost(count - kept)
                    continue
            part, kept = codec.fit_run(body, count, target.limit - target.queued)
            if kept == count:
                target.push_run(head, body, count)
                continue
            if kept:
                part_head = envelope_head(_PUB, msg_type, sender, kept, "", len(part))
                target.push_run(part_head, part, kept)
            target.lost(count - kept)
            if self.overflow == "disconnect":
                target.kick(
                    f"its outgoing queue overflowed (send_queue_size={self.send_queue_size}): "
                    "it reads too slowly"
                )

    def _refuse_too_large(self, conn: Connection, env: Envelope) -> None:
        what = f"message {env.type!r}" if env.corr == 1 else f"run of {env.corr} {env.type!r}"
        detail = (
            f"{what} is {len(env.body)} bytes, over the broker's "
            f"max_message_size of {self.max_message_size} bytes; it was not delivered"
        )
        log.warning("from %r: %s", conn.peer_id, detail)
        self._error(conn, "too_large", detail)

    def _error(self, conn: Connection, code: str, detail: str) -> None:
        conn.push(control(Kind.ERROR, RequestFailed(code=code, detail=detail)))

    def _ack(self, conn: Connection, corr: int) -> None:
        conn.push(pack_envelope(int(Kind.ACK), "", BROKER_ID, corr))

    def _nack(self, conn: Connection, corr: int, code: str, detail: str) -> None:
        conn.push(control(Kind.NACK, RequestFailed(code=code, detail=detail), corr=corr))

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
            self.routing.subscribe(conn.peer_id, env.type, sender)
            if delivery == "drop":
                conn.delivery.pop((env.type, sender), None)
            else:
                conn.delivery[(env.type, sender)] = delivery
        else:
            self.routing.unsubscribe(conn.peer_id, env.type, sender)
            conn.delivery.pop((env.type, sender), None)
        self._ack(conn, env.corr)

    def _handler_registration(self, conn: Connection, env: Envelope) -> None:
        try:
            if env.kind == Kind.REG:
                reg = codec.decode_body(RegisterHandler, env.body)
                assert isinstance(reg, RegisterHandler)
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
        if len(env.body) > self.max_message_size:
            self.query_failed(
                conn.peer_id,
                env.corr,
                QueryFailed(
                    code="too_large",
                    detail=f"query {env.type!r} is {len(env.body)} bytes, over max_message_size "
                    f"{self.max_message_size}",
                ),
            )
            return
        if env.target:
            handler = env.target
            if handler not in self.conns:
                self.query_failed(
                    conn.peer_id,
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
                self.query_failed(
                    conn.peer_id, env.corr, QueryFailed(code="no_handler", detail=str(exc))
                )
                return
            except MultiplePeersAvailable as exc:
                self.query_failed(
                    conn.peer_id,
                    env.corr,
                    QueryFailed(code="multiple", detail=str(exc), peers=list(exc.peers)),
                )
                return
        corr = self.routing.open_query(conn.peer_id, env.corr, handler, env.type)
        self.conns[handler].push(
            pack_envelope(int(Kind.QUERY), env.type, conn.peer_id, corr, "", env.body)
        )

    def query_failed(self, asker: str, corr: int, failure: QueryFailed) -> None:
        target = self.conns.get(asker)
        if target is not None:
            target.push(control(Kind.QERR, failure, corr=corr, sender=BROKER_ID))
