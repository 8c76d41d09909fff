"""The peer's messaging API: publish, subscribe, queries and the handler dispatch
(internal; the methods are documented on :class:`~peerkit.Peer`)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from . import codec
from ._checks import check_seconds
from ._peer_base import _YIELD_BYTES, _YIELD_OVERHEAD, Handler, _Pending, _Sub, log
from ._peer_link import PeerLink
from .codec import Envelope, control, pack_envelope
from .errors import (
    BrokerRequestError,
    DecodeError,
    HandlerAlreadyRegistered,
    HandlerGoneError,
    MultiplePeersAvailable,
    NoHandlerError,
    PeerkitError,
    QueryAnswerUnknown,
    RemoteError,
    UnknownMessageType,
)
from .messages import Message, get_message_class, message_type_of
from .protocol import BrokerInfo, Kind, QueryFailed, RegisterHandler

M = TypeVar("M", bound=Message)


class PeerMessaging(PeerLink):
    """Publish/subscribe and queries on top of :class:`PeerLink`."""

    async def _dispatcher(self) -> None:
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

    async def _dispatch_run(self, env: Envelope, all_subs: dict[str, list[_Sub]]) -> None:
        """Hand the messages of one PUB run to their handlers, in order.

        The room of handled messages is given back before a handler waits (nothing can
        arrive while none does).
        """
        msg_type = env.type
        if msg_type not in all_subs:
            return
        try:
            cls = get_message_class(msg_type)
        except UnknownMessageType:  # pragma: no cover - subscribing registered it
            return
        count = env.corr
        for handled, msg in enumerate(codec.decode_run(cls, env.body, env.sender, count), 1):
            if type(msg) is DecodeError:
                self.decode_errors += 1
                log.error("peer %r: dropped an undecodable message: %s", self.peer_id, msg)
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

    async def _dispatch_one(self, subs: list[_Sub], msg: Message) -> None:
        for sub in tuple(subs) if len(subs) > 1 else subs:
            if sub.sender is not None and sub.sender != msg.sender:
                continue
            if sub.channel is not None:
                try:
                    await sub.channel.send(msg)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._drop_sub(sub)
            else:
                result = sub.handler(msg)  # type: ignore[misc]
                if result is not None and inspect.isawaitable(result):
                    await result

    async def send_message(self, msg: Message) -> None:
        """Publish ``msg`` to every subscriber of its type (through the broker).

        Messages from one peer reach each subscriber in the order sent. Waits (up to
        ``send_timeout``) when the outgoing queue is full.
        """
        if not self._can_send:  # one flag for the common case (kept by _state_changed)
            self._require_connected("send_message")
        body = codec.encode_body(msg, self._max_message_size)
        if self._enqueued - self._sent >= self.send_queue_size:
            try:
                with trio.fail_after(self.send_timeout):
                    while self._enqueued - self._sent >= self.send_queue_size and self._link_ok:
                        await self._progress.park()
            except trio.TooSlowError:
                raise PeerkitError(
                    f"peer {self.peer_id!r}: outgoing queue full for {self.send_timeout} s "
                    "(the broker is not reading); raise send_queue_size or send less"
                ) from None
            self._require_connected("send_message")
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        # encode_body checked the class is registered: its type name is safe to read
        self._queue_publish(type(msg).__message_type__, body)
        self._unyielded += len(body) + _YIELD_OVERHEAD
        if self._unyielded >= _YIELD_BYTES:
            # let the writer batch what is queued; a lone message goes out at the caller's
            # next yield (at once, in practice)
            self._unyielded = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def subscribe_for_all_msg_subtype(
        self, msg_type: type[M], handler: Callable[[M], Any]
    ) -> None:
        """Call ``handler(msg)`` for every ``msg_type`` message, from every sender.

        Returns once the broker has the subscription.
        """
        await self._subscribe(msg_type, None, handler)

    async def subscribe_for_specific_msg_subtype(
        self, msg_type: type[M], sender_id: str, handler: Callable[[M], Any]
    ) -> None:
        """Call ``handler(msg)`` for ``msg_type`` messages sent by ``sender_id`` only."""
        if not isinstance(sender_id, str) or not sender_id:
            raise PeerkitError(f"sender_id must be a peer id, got {sender_id!r}")
        await self._subscribe(msg_type, sender_id, handler)

    async def _subscribe(
        self,
        msg_type: type[Message],
        sender: str | None,
        target: Handler | trio.MemorySendChannel[Any],
    ) -> _Sub:
        self._require_connected("subscribing")
        type_name = message_type_of(msg_type)
        if isinstance(target, trio.MemorySendChannel):
            sub = _Sub(type_name, sender, channel=target)
        elif callable(target):
            sub = _Sub(type_name, sender, handler=target)
        else:
            raise PeerkitError(f"a handler must be callable, got {target!r}")
        key = (type_name, sender)
        self._subs.setdefault(type_name, []).append(sub)
        self._sub_refs[key] += 1
        waiting = self._sub_acks.get(key)
        if self._sub_refs[key] == 1:
            # the first subscriber of this (type, sender) asks the broker; later ones wait
            # for that answer, so every subscribe returns once the broker has it
            ack = self._sub_acks[key] = _Pending()
            try:
                await self._request(Kind.SUB, type_name, target=sender or "")
            except BaseException as exc:
                ack.error = exc
                # the request may have reached the broker: undo it there too
                self._drop_sub(sub, tell_broker=not isinstance(exc, BrokerRequestError))
                raise
            finally:
                del self._sub_acks[key]
                ack.event.set()
        elif waiting is not None:
            try:
                await waiting.event.wait()
            except BaseException:
                self._drop_sub(sub)
                raise
            if waiting.error is not None:
                self._drop_sub(sub)
                raise PeerkitError(
                    f"subscribing to {type_name!r} failed: {waiting.error!r}"
                ) from waiting.error
        return sub

    def _drop_sub(self, sub: _Sub, *, tell_broker: bool = True) -> bool:
        subs = self._subs.get(sub.msg_type)
        if subs is None or sub not in subs:
            return False
        subs.remove(sub)
        if not subs:
            del self._subs[sub.msg_type]
        key = (sub.msg_type, sub.sender)
        self._sub_refs[key] -= 1
        if self._sub_refs[key] <= 0:
            del self._sub_refs[key]
            if tell_broker and self._link_ok and not self.is_shutting_down:
                self._push(pack_envelope(int(Kind.UNSUB), sub.msg_type, "", 0, sub.sender or ""))
        return True

    async def unsubscribe(
        self, msg_type: type[Message], handler: Handler | None = None, *, sender: str | None = None
    ) -> int:
        """Remove subscriptions to ``msg_type`` (those of ``handler`` if given, for
        ``sender`` if given); returns how many were removed."""
        type_name = message_type_of(msg_type)
        removed = 0
        for sub in list(self._subs.get(type_name, ())):
            if handler is not None and sub.handler != handler:
                continue
            if sender is not None and sub.sender != sender:
                continue
            if self._drop_sub(sub):
                removed += 1
        await trio.lowlevel.checkpoint()
        return removed

    @asynccontextmanager
    async def subscription(
        self, msg_type: type[M], *, sender: str | None = None, buffer: int = 100
    ) -> AsyncIterator[trio.MemoryReceiveChannel[M]]:
        """Pull form: ``async with peer.subscription(T) as stream: async for msg in stream``.

        ``buffer`` messages wait in the stream; when it is full the peer's handlers wait
        for the consumer (and the broker drops and reports beyond its own queue).
        """
        send, recv = trio.open_memory_channel[M](buffer)
        sub = await self._subscribe(msg_type, sender, send)
        try:
            async with recv:
                yield recv
        finally:
            self._drop_sub(sub)
            send.close()

    async def register_query_handler(
        self, msg_type: type[Message], handler: Handler, *, policy: str = "exclusive"
    ) -> None:
        """Answer ``msg_type`` queries with ``handler(msg) -> response message``.

        An ``async`` handler runs in one of the ``max_concurrent_queries`` query workers. A
        plain function answers at once, in whichever task is reading the broker connection
        when the query arrives (the peer's reader, or a task of this peer that waits for an
        answer of its own): keep it short and non-blocking, as any code that runs in the
        reader.

        A second handler of the same type (any peer) is refused unless all use the same
        ``policy``: ``"round_robin"`` (the broker alternates) or ``"explicit"`` (queries
        raise :class:`MultiplePeersAvailable`; use :meth:`ask_peer`).
        """
        self._require_connected("register_query_handler")
        type_name = message_type_of(msg_type)
        if not callable(handler):
            raise PeerkitError(f"a query handler must be callable, got {handler!r}")
        if type_name in self._query_handlers:
            raise HandlerAlreadyRegistered(
                "already_registered",
                f"peer {self.peer_id!r} already has a handler for {type_name!r}; "
                "unregister_query_handler() first",
            )
        self._query_handlers[type_name] = handler
        try:
            await self._request(
                Kind.REG,
                "",
                body=codec.encode_body(RegisterHandler(msg_type=type_name, policy=policy)),
            )
        except BaseException as exc:
            self._query_handlers.pop(type_name, None)
            if not isinstance(exc, BrokerRequestError) and self._link_ok:
                # cancelled or timed out: the broker may have registered us; undo that
                self._push(pack_envelope(int(Kind.UNREG), type_name))
            raise

    async def unregister_query_handler(self, msg_type: type[Message]) -> None:
        """Stop answering ``msg_type`` queries."""
        type_name = message_type_of(msg_type)
        if self._query_handlers.pop(type_name, None) is None:
            raise PeerkitError(f"peer {self.peer_id!r} has no handler for {type_name!r}")
        if self._link_ok and not self.is_shutting_down:
            await self._request(Kind.UNREG, type_name)

    async def query(self, msg: Message, timeout: float | None = None) -> Message:
        """Ask whichever peer handles ``type(msg)`` and return its response.

        Raises :class:`NoHandlerError`, :class:`RemoteError`, :class:`HandlerGoneError`,
        :class:`MultiplePeersAvailable` or :class:`QueryTimeout` (all
        :class:`QueryAnswerUnknown`).
        """
        return await self._ask("", msg, timeout)

    async def ask_peer(self, peer_id: str, msg: Message, timeout: float | None = None) -> Message:
        """Ask the named peer (it answers with its query handler for ``type(msg)``)."""
        if not isinstance(peer_id, str) or not peer_id:
            raise PeerkitError(f"peer_id must be a peer id, got {peer_id!r}")
        return await self._ask(peer_id, msg, timeout)

    async def _ask(self, target: str, msg: Message, timeout: float | None) -> Message:
        if not self.is_connected and not (self.is_shutting_down and self._link_ok):
            self._require_connected("query")
        if timeout is None:
            timeout = self.query_timeout
        check_seconds("timeout", timeout)
        type_name = msg.message_type()
        body = codec.encode_body(msg, self._max_message_size)
        env = await self._roundtrip(
            Kind.QUERY,
            type_name,
            target,
            body,
            timeout,
            what=f"query {type_name!r}" + (f" to {target!r}" if target else ""),
        )
        if env.kind == Kind.REPLY:
            return codec.decode_message(env.type, env.body, env.sender)
        try:
            failure = codec.decode_body(QueryFailed, env.body)
            assert isinstance(failure, QueryFailed)
        except DecodeError as exc:
            raise QueryAnswerUnknown(f"unreadable query error: {exc}") from None
        code, detail = failure.code, failure.detail
        if code == "no_handler":
            raise NoHandlerError(detail)
        if code == "handler_gone":
            raise HandlerGoneError(detail)
        if code == "remote_error":
            raise RemoteError(failure.peer_id, failure.error_type, detail)
        if code == "multiple":
            raise MultiplePeersAvailable(type_name, failure.peers)
        raise QueryAnswerUnknown(f"{code}: {detail}")

    async def broker_info(self) -> BrokerInfo:
        """The broker's view of every connected peer (subscriptions, handlers, state)."""
        self._require_connected("broker_info")
        env = await self._roundtrip(
            Kind.INFO, "", "", b"", self.request_timeout, what="broker info"
        )
        info = codec.decode_body(BrokerInfo, env.body)
        assert isinstance(info, BrokerInfo)
        return info

    async def _query_worker(self) -> None:
        async for env, pending in self._query_recv:
            try:
                result = await pending
            except Exception as exc:
                self._remote_error(env, exc)
            else:
                self._reply(env, result)

    def _start_answer(self, env: Envelope) -> Awaitable[Any] | None:
        """Answer a query at once if its handler is a plain function; if the handler
        returned an awaitable, return it (a query worker awaits it and replies)."""
        handler = self._query_handlers.get(env.type) or self._builtin_queries.get(env.type)
        if handler is None:
            self._query_error(
                env, "no_handler", f"peer {self.peer_id!r} has no handler for {env.type!r} queries"
            )
            return None
        try:
            msg = codec.decode_message(env.type, env.body, env.sender)
        except DecodeError as exc:
            self._query_error(env, "bad_request", str(exc))
            return None
        try:
            result = handler(msg)
        except Exception as exc:
            self._remote_error(env, exc)
            return None
        if not isinstance(result, Message) and inspect.isawaitable(result):
            return result
        self._reply(env, result)
        return None

    def _remote_error(self, env: Envelope, exc: Exception) -> None:
        log.warning(
            "peer %r: query handler for %r raised %s: %s",
            self.peer_id,
            env.type,
            type(exc).__name__,
            exc,
        )
        self._push(
            control(
                Kind.QERR,
                QueryFailed(
                    code="remote_error",
                    detail=str(exc),
                    peer_id=self.peer_id,
                    error_type=type(exc).__name__,
                ),
                corr=env.corr,
            )
        )

    def _reply(self, env: Envelope, result: object) -> None:
        if not isinstance(result, Message):
            self._query_error(
                env,
                "bad_reply",
                f"the {env.type!r} handler of {self.peer_id!r} "
                f"returned {type(result).__name__}, not a Message",
            )
            return
        try:
            body = codec.encode_body(result, self._max_message_size)
        except PeerkitError as exc:
            self._query_error(env, "bad_reply", str(exc))
            return
        self._push(pack_envelope(int(Kind.REPLY), result.message_type(), "", env.corr, "", body))

    def _query_error(self, env: Envelope, code: str, detail: str) -> None:
        self._push(
            control(
                Kind.QERR,
                QueryFailed(code=code, detail=detail, peer_id=self.peer_id),
                corr=env.corr,
            )
        )
