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
from .errors import BrokerRequestError, DecodeError, PeerkitError, UnknownMessageType
from .messages import Message, MessagesDropped, get_message_class, message_type_of
from .protocol import PUB, Kind

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

    _subs: dict[str, list[Sub]] = attrs.field(factory=dict)
    _refs: collections.Counter[tuple[str, str | None]] = attrs.field(factory=collections.Counter)
    _acks: dict[tuple[str, str | None], Pending] = attrs.field(factory=dict)
    _inbox: collections.deque[Envelope] = attrs.field(factory=collections.deque)
    _inbox_count: int = 0  # messages queued in _inbox, and those of the run in hand
    _run_left: int = 0
    _inbox_ready: trio.Event = attrs.field(factory=trio.Event)
    _local_drops: int = 0  # dropped since the last report
    _closed: bool = False  # no more dispatching (the peer shuts down)
    #: undecodable runs are logged at most once an interval per (type, sender)
    _bad_log: RateLog = attrs.field(factory=lambda: RateLog(DEFAULT_INTERVAL, trio.current_time))

    # ------------------------------------------------------------------ arrivals
    def deliver(self, env: Envelope) -> None:
        """Queue an incoming run of messages; what does not fit is dropped and counted
        (reported once per incoming frame, by :meth:`report_drops`)."""
        count = env.corr
        self.msgs_in += count
        if self._closed:  # shutting down: nothing will handle them, so they are lost
            self.dropped_messages += count
            return
        body, kept = codec.fit_run(env.body, count, self.receive_queue_size - self._inbox_count)
        if kept < count:
            self._lose(count - kept)
            if not kept:
                return
            env = env._replace(corr=kept, body=body)
        self._inbox_count += kept
        self._inbox.append(env)
        self._inbox_ready.set()

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

    def report_drops(self) -> None:
        """Log what was dropped locally since the last report (once per incoming frame)."""
        if self._local_drops:
            count, self._local_drops = self._local_drops, 0
            self._warn_lost(count)

    def _warn_lost(self, count: int) -> None:
        log.warning(
            "peer %r lost %d messages: they came faster than it took them in (its queue at "
            "the broker or its own receive queue was full; total %d, see "
            "peer.dropped_messages)",
            self.peer_id,
            count,
            self.dropped_messages,
        )

    def close(self) -> None:
        """Stop dispatching: what is queued, and what arrives from now on, counts as lost."""
        self._closed = True
        lost = self._inbox_count
        self._inbox.clear()
        self._inbox_count = self._run_left = 0
        self.report_drops()  # what was dropped before, with its own explanation
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
                    result = first.handler(msg)
                    if result is not None and inspect.isawaitable(result):
                        self._release_run(handled, count)
                        await result
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
                result = sub.handler(msg)  # type: ignore[misc]
                if result is not None and inspect.isawaitable(result):
                    await result

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
    ) -> Sub:
        """Subscribe ``target``; returns once the broker has the subscription."""
        type_name = message_type_of(msg_type)
        if isinstance(target, trio.MemorySendChannel):
            sub = Sub(type_name, sender, channel=target)
        else:
            check_handler(target, f"subscribing to {type_name!r}")
            sub = Sub(type_name, sender, handler=target)
        key = (type_name, sender)
        self._subs.setdefault(type_name, []).append(sub)
        self._refs[key] += 1
        waiting = self._acks.get(key)
        if self._refs[key] == 1:
            # the first subscriber of this (type, sender) asks the broker; later ones wait
            # for that answer, so every subscribe returns once the broker has it
            ack = self._acks[key] = Pending()
            try:
                await self.link.call(
                    Kind.SUB, type_name, target=sender or "", timeout=self.request_timeout
                )
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
        return sub

    def drop(self, sub: Sub, *, tell_broker: bool = True) -> bool:
        """Remove ``sub``; the broker is told when it was the last of its (type, sender)."""
        subs = self._subs.get(sub.msg_type)
        if subs is None or sub not in subs:
            return False
        subs.remove(sub)
        if not subs:
            del self._subs[sub.msg_type]
        key = (sub.msg_type, sub.sender)
        self._refs[key] -= 1
        if self._refs[key] <= 0:
            del self._refs[key]
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
        self, msg_type: type[M], sender: str | None, buffer: int
    ) -> AsyncIterator[trio.MemoryReceiveChannel[M]]:
        """A subscription whose messages wait in a channel of ``buffer`` messages."""
        send, recv = trio.open_memory_channel[M](buffer)
        sub = await self.add(msg_type, sender, send)
        try:
            async with recv:
                yield recv
        finally:
            self.drop(sub)
            send.close()
