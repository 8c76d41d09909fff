"""The peer's subscriptions: which handlers want which messages, the inbox of runs that
arrived for them, and the dispatcher task that calls the handlers (internal).

The peer's link hands every incoming run of published messages to :meth:`Subscriptions.deliver`
(in the link's reader task); what does not fit in ``receive_queue_size`` messages is dropped
and counted. The :meth:`~Subscriptions.dispatcher` task decodes the runs and calls the
handlers one message at a time, in arrival order.
"""

from __future__ import annotations

import collections
import inspect
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import attrs
import trio

from . import codec
from ._handlers import check_handler
from ._link import Link, Pending
from ._ratelog import DEFAULT_INTERVAL, RateLog
from .codec import Envelope, pack_envelope
from .errors import (
    BrokerRequestError,
    DecodeError,
    PeerkitError,
    ShuttingDownException,
    UnknownMessageType,
)
from .messages import Message, MessagesDropped, get_message_class, message_type_of
from .protocol import DELIVERY_RANK, PUB, Kind, SubscribeOptions

log = logging.getLogger("peerkit.peer")

M = TypeVar("M", bound=Message)
Handler = Callable[[Any], Any]

_DROPPED_TYPE = MessagesDropped.message_type()


@attrs.define(eq=False)
class Sub:
    """One subscription: a handler, or the send end of a :meth:`Subscriptions.stream`."""

    msg_type: str
    sender: str | None
    handler: Handler | None = None
    channel: trio.MemorySendChannel[Any] | None = None
    delivery: str = "drop"


@attrs.define(eq=False)
class Subscriptions:
    """The peer's subscription table, its inbox and its dispatcher (see the module)."""

    link: Link
    peer_id: str
    receive_queue_size: int
    request_timeout: float

    #: published messages received from the broker
    msgs_in: int = 0
    #: messages lost for this peer: reported by the broker or dropped locally
    dropped_messages: int = 0
    #: messages that arrived but could not be decoded
    decode_errors: int = 0
    #: handler errors are counted and logged, not fatal (``on_handler_error="log"``)
    log_handler_errors: bool = False
    #: exceptions subscription handlers raised (counted with ``log_handler_errors``)
    handler_errors: int = 0
    _errors_unlogged: int = 0
    _last_error_log: float = -math.inf

    _subs: dict[str, list[Sub]] = attrs.field(factory=dict)
    _refs: collections.Counter[tuple[str, str | None]] = attrs.field(factory=collections.Counter)
    _acks: dict[tuple[str, str | None], Pending] = attrs.field(factory=dict)
    _inbox: collections.deque[Envelope] = attrs.field(factory=collections.deque)
    _inbox_count: int = 0  # messages queued in _inbox, and those of the run in hand
    _run_left: int = 0
    _inbox_ready: trio.Event = attrs.field(factory=trio.Event)
    _local_drops: int = 0  # dropped since the last report
    _closed: bool = False  # no more dispatching (the peer shuts down)
    #: the delivery the broker has for each (type, sender): the strongest asked for
    _modes: dict[tuple[str, str | None], str] = attrs.field(factory=dict)
    #: the strongest delivery of each type's local subscriptions (absent: "drop")
    _type_modes: dict[str, str] = attrs.field(factory=dict)
    _room: trio.Event | None = None  # set by the dispatcher when the inbox has room again
    #: undecodable runs are logged at most once an interval per (type, sender)
    _bad_log: RateLog = attrs.field(factory=lambda: RateLog(DEFAULT_INTERVAL, trio.current_time))
    #: losses are logged at most once an interval
    _lost_log: RateLog = attrs.field(factory=lambda: RateLog(DEFAULT_INTERVAL, trio.current_time))

    # ------------------------------------------------------------------ arrivals
    def deliver(self, env: Envelope) -> None:
        """Queue an incoming run of messages; what does not fit is dropped and counted
        (reported once per incoming frame, by :meth:`report_drops`)."""
        count = env.corr
        self.msgs_in += count
        if self._closed:  # shutting down: nothing will handle them, so they are lost
            self.dropped_messages += count
            return
        room = self.receive_queue_size - self._inbox_count
        if count > room and self._type_modes:
            mode = self._type_modes.get(env.type, "drop")
            if mode == "lossless":  # kept whole; the reader waits for room (needs_room)
                self._inbox_count += count
                self._inbox.append(env)
                self._inbox_ready.set()
                return
            if mode == "latest":  # the oldest queued go, and the run keeps its newest
                room += self._evict_oldest(env.type, count - room)
                body, kept = codec.fit_run(env.body, count, room, newest=True)
                self._keep(env, body, kept, count)
                return
        body, kept = codec.fit_run(env.body, count, room)
        self._keep(env, body, kept, count)

    def _keep(self, env: Envelope, body: bytes, kept: int, count: int) -> None:
        if kept < count:
            self._lose(count - kept)
            if not kept:
                return
            env = env._replace(corr=kept, body=body)
        self._inbox_count += kept
        self._inbox.append(env)
        self._inbox_ready.set()

    def _evict_oldest(self, msg_type: str, wanted: int) -> int:
        """``latest`` delivery: drop queued runs of ``msg_type``, oldest first, until
        ``wanted`` messages were freed (or none is left); returns how many were."""
        freed = 0
        kept: collections.deque[Envelope] = collections.deque()
        for env in self._inbox:
            if freed < wanted and env.type == msg_type:
                freed += env.corr
                continue
            kept.append(env)
        if freed:
            self._inbox.clear()
            self._inbox.extend(kept)
            self._inbox_count -= freed
            self._lose(freed)
        return freed

    async def wait_room(self) -> bool:
        """Wait until the handlers took a message while the inbox was over
        ``receive_queue_size`` (lossless runs took it over): the link's reader reads
        nothing meanwhile, which slows the broker down, which slows the publishers down.
        Returns whether the inbox is still over its bound."""
        if self._inbox_count > self.receive_queue_size and not self._closed:
            self._room = room = trio.Event()
            await room.wait()
        return self._inbox_count > self.receive_queue_size and not self._closed

    def _lose(self, count: int) -> None:
        self.dropped_messages += count
        self._local_drops += count

    def broker_dropped(self, env: Envelope) -> None:
        """The broker reports messages it dropped for this peer (a DROPPED envelope)."""
        try:
            dropped = codec.decode_body(MessagesDropped, env.body)
            assert isinstance(dropped, MessagesDropped)
            count = dropped.count
        except DecodeError:
            count = 0
        self.dropped_messages += count
        self._warn_lost(count)
        if _DROPPED_TYPE in self._subs:
            self.deliver(env._replace(kind=PUB, type=_DROPPED_TYPE, sender="broker", corr=1))

    def report_drops(self) -> bool:
        """Log what was dropped locally since the last report (once per incoming frame);
        True when the reader should wait for room (see :meth:`needs_room`)."""
        if self._local_drops:
            count, self._local_drops = self._local_drops, 0
            self._warn_lost(count)
        return self._inbox_count > self.receive_queue_size

    def _warn_lost(self, count: int) -> None:
        """Log a loss: at most once an interval, with what was held back since."""
        report = self._lost_log.hit("lost", count)
        if report is None:
            return
        log.warning(
            "peer %r lost %d messages: they came faster than it took them in (its queue at "
            "the broker or its own receive queue was full; total %d, see "
            "peer.dropped_messages)%s",
            self.peer_id,
            count,
            self.dropped_messages,
            report.more(),
        )

    def close(self) -> None:
        """Stop dispatching: what is queued, and what arrives from now on, counts as lost."""
        self._closed = True
        lost = self._inbox_count
        self._inbox.clear()
        self._inbox_count = self._run_left = 0
        self.report_drops()  # what was dropped before, with its own explanation
        for report in self._lost_log.drain():
            log.warning(
                "peer %r lost %d more messages since the last report, %.0f s ago (total %d, "
                "see peer.dropped_messages)",
                self.peer_id,
                report.held,
                report.since,
                self.dropped_messages,
            )
        for report in self._bad_log.drain():
            msg_type, sender = report.key if type(report.key) is tuple else ("?", "?")
            log.error(
                "peer %r: %d more undecodable %r messages from %r were dropped since the last "
                "report, %.0f s ago (total %d, see peer.decode_errors)",
                self.peer_id,
                report.held,
                msg_type,
                sender,
                report.since,
                self.decode_errors,
            )
        if lost:
            self.dropped_messages += lost
            log.info(
                "peer %r is shutting down: %d messages that had arrived were not handled "
                "(counted in peer.dropped_messages)",
                self.peer_id,
                lost,
            )

    # ------------------------------------------------------------------ dispatch
    async def dispatcher(self) -> None:
        """Run the handlers one message at a time, in arrival order.

        Works through whatever is queued as one batch, then yields to the scheduler.
        """
        inbox = self._inbox
        while True:
            if not inbox:
                ready = self._inbox_ready = trio.Event()
                await ready.wait()
                continue
            all_subs = self._subs
            for _ in range(len(inbox)):
                env = inbox.popleft()
                # a run's messages count as queued until handled (see _release_run)
                self._run_left = env.corr
                try:
                    await self._dispatch_run(env, all_subs)
                finally:
                    self._inbox_count -= self._run_left
                    self._run_left = 0
                    if self._room is not None:  # the reader waits for progress
                        self._room.set()
                        self._room = None
            await trio.lowlevel.checkpoint()

    def _release_run(self, handled: int, count: int) -> None:
        """``handled`` messages of the run in hand are done: give their room back."""
        left = count - handled if handled < count else 0
        self._inbox_count -= self._run_left - left
        self._run_left = left

    async def _dispatch_run(self, env: Envelope, all_subs: dict[str, list[Sub]]) -> None:
        """Hand the messages of one run to their handlers, in order. The room of handled
        messages is given back before a handler waits (nothing can arrive while none does)."""
        msg_type = env.type
        if msg_type not in all_subs:
            return
        try:
            cls = get_message_class(msg_type)
        except UnknownMessageType:  # pragma: no cover - subscribing registered it
            return
        count = env.corr
        bad = 0  # undecodable messages in this run: reported once, at its end
        try:
            for handled, msg in enumerate(codec.decode_run(cls, env.body, env.sender, count), 1):
                if type(msg) is DecodeError:
                    if not bad:
                        first_error = msg
                    bad += 1
                    self.decode_errors += 1
                    continue
                # looked up again per message: a handler may (un)subscribe
                subs = all_subs.get(msg_type)
                if not subs:
                    return
                first = subs[0]
                if len(subs) == 1 and first.handler is not None and first.sender is None:
                    # the common case without a coroutine per message: one handler
                    try:
                        result = first.handler(msg)
                        if result is not None and inspect.isawaitable(result):
                            self._release_run(handled, count)
                            await result
                    except Exception as exc:
                        self._handler_failed(msg, exc)  # type: ignore[arg-type]
                else:
                    self._release_run(handled, count)
                    await self._dispatch_one(subs, msg)  # type: ignore[arg-type]
        finally:
            if bad:
                self._report_undecodable(env, bad, first_error)

    def _report_undecodable(self, env: Envelope, bad: int, first: DecodeError) -> None:
        """Log the undecodable messages of one run: one line, at most once an interval per
        (type, sender); the ones held back are counted in the next line."""
        report = self._bad_log.hit((env.type, env.sender), bad)
        if report is None:
            return
        log.error(
            "peer %r: dropped %d undecodable message%s of the %d in a run; the first: %s "
            "(total %d, see peer.decode_errors)%s",
            self.peer_id,
            bad,
            "" if bad == 1 else "s",
            env.corr,
            first,
            self.decode_errors,
            report.more(),
        )

    async def _dispatch_one(self, subs: list[Sub], msg: Message) -> None:
        for sub in tuple(subs) if len(subs) > 1 else subs:
            if sub.sender is not None and sub.sender != msg.sender:
                continue
            if sub.channel is not None:
                try:
                    await sub.channel.send(msg)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.drop(sub)
            else:
                try:
                    result = sub.handler(msg)  # type: ignore[misc]
                    if result is not None and inspect.isawaitable(result):
                        await result
                except Exception as exc:
                    self._handler_failed(msg, exc)

    def _handler_failed(self, msg: Message, exc: Exception) -> None:
        """A subscription handler raised: by default the peer dies of it (re-raised); with
        ``on_handler_error="log"`` it is counted and logged (once per second at most, with
        the count of the others) and the peer carries on."""
        if not self.log_handler_errors or isinstance(exc, ShuttingDownException):
            raise exc
        self.handler_errors += 1
        self._errors_unlogged += 1
        now = trio.current_time()
        if now - self._last_error_log >= 1.0:
            log.error(
                "peer %r: a handler of %s raised %s: %s (%d handler error(s) since the last "
                "report, %d in all; the peer carries on: on_handler_error='log')",
                self.peer_id,
                msg.message_type(),
                type(exc).__name__,
                exc,
                self._errors_unlogged,
                self.handler_errors,
                exc_info=exc,
            )
            self._last_error_log = now
            self._errors_unlogged = 0

    # ------------------------------------------------------------------ the table
    @property
    def keys(self) -> list[tuple[str, str | None]]:
        """Every (type, sender) the broker has a subscription for."""
        return list(self._refs)

    async def add(
        self,
        msg_type: type[Message],
        sender: str | None,
        target: Handler | trio.MemorySendChannel[Any],
        delivery: str = "drop",
    ) -> Sub:
        """Subscribe ``target``; returns once the broker has the subscription."""
        type_name = message_type_of(msg_type)
        if delivery not in DELIVERY_RANK:
            raise PeerkitError(
                f"delivery must be one of {', '.join(DELIVERY_RANK)}, not {delivery!r}"
            )
        if isinstance(target, trio.MemorySendChannel):
            sub = Sub(type_name, sender, channel=target, delivery=delivery)
        else:
            check_handler(target, f"subscribing to {type_name!r}")
            sub = Sub(type_name, sender, handler=target, delivery=delivery)
        key = (type_name, sender)
        self._subs.setdefault(type_name, []).append(sub)
        self._refs[key] += 1
        self._note_modes(type_name)
        waiting = self._acks.get(key)
        if self._refs[key] == 1:
            # the first subscriber of this (type, sender) asks the broker; later ones wait
            # for that answer, so every subscribe returns once the broker has it
            ack = self._acks[key] = Pending()
            self._modes[key] = delivery
            try:
                await self._sub_request(type_name, sender, delivery)
            except BaseException as exc:
                ack.error = exc
                # the request may have reached the broker: undo it there too
                self.drop(sub, tell_broker=not isinstance(exc, BrokerRequestError))
                raise
            finally:
                del self._acks[key]
                ack.event.set()
        elif waiting is not None:
            try:
                await waiting.event.wait()
            except BaseException:
                self.drop(sub)
                raise
            if waiting.error is not None:
                self.drop(sub)
                raise PeerkitError(
                    f"subscribing to {type_name!r} failed: {waiting.error!r}"
                ) from waiting.error
        if DELIVERY_RANK[delivery] > DELIVERY_RANK[self._modes.get(key, "drop")]:
            # a stronger delivery than the broker has for this (type, sender): upgrade it
            self._modes[key] = delivery
            await self._sub_request(type_name, sender, delivery)
        return sub

    async def _sub_request(self, type_name: str, sender: str | None, delivery: str) -> None:
        body = b"" if delivery == "drop" else codec.encode_body(SubscribeOptions(delivery=delivery))
        await self.link.call(
            Kind.SUB, type_name, target=sender or "", body=body, timeout=self.request_timeout
        )

    def _note_modes(self, type_name: str) -> None:
        """Recompute the strongest delivery of ``type_name``'s local subscriptions."""
        best = max(
            (sub.delivery for sub in self._subs.get(type_name, ())),
            key=DELIVERY_RANK.__getitem__,
            default="drop",
        )
        if best == "drop":
            self._type_modes.pop(type_name, None)
        else:
            self._type_modes[type_name] = best

    async def resubscribe(self) -> None:
        """Tell a new broker connection every (type, sender) this peer subscribes to."""
        for type_name, sender in list(self._refs):
            delivery = self._modes.get((type_name, sender), "drop")
            await self._sub_request(type_name, sender, delivery)

    def drop(self, sub: Sub, *, tell_broker: bool = True) -> bool:
        """Remove ``sub``; the broker is told when it was the last of its (type, sender)."""
        subs = self._subs.get(sub.msg_type)
        if subs is None or sub not in subs:
            return False
        subs.remove(sub)
        if not subs:
            del self._subs[sub.msg_type]
        self._note_modes(sub.msg_type)
        key = (sub.msg_type, sub.sender)
        self._refs[key] -= 1
        if self._refs[key] <= 0:
            del self._refs[key]
            self._modes.pop(key, None)
            if tell_broker and self.link.up and not self._closed:
                self.link.push(
                    pack_envelope(int(Kind.UNSUB), sub.msg_type, "", 0, sub.sender or "")
                )
        return True

    def remove(
        self, msg_type: type[Message], handler: Handler | None = None, sender: str | None = None
    ) -> int:
        """Remove the subscriptions to ``msg_type`` (of ``handler``, for ``sender``, when
        given); returns how many were removed."""
        type_name = message_type_of(msg_type)
        removed = 0
        for sub in list(self._subs.get(type_name, ())):
            if handler is not None and sub.handler != handler:
                continue
            if sender is not None and sub.sender != sender:
                continue
            if self.drop(sub):
                removed += 1
        return removed

    @asynccontextmanager
    async def stream(
        self, msg_type: type[M], sender: str | None, buffer: int, delivery: str = "drop"
    ) -> AsyncIterator[trio.MemoryReceiveChannel[M]]:
        """A subscription whose messages wait in a channel of ``buffer`` messages."""
        send, recv = trio.open_memory_channel[M](buffer)
        sub = await self.add(msg_type, sender, send, delivery)
        try:
            async with recv:
                yield recv
        finally:
            self.drop(sub)
            send.close()
