"""The peer's queries, both ways: the handlers it registered and the workers that run them,
and the questions it asks other peers (internal).

A query reaches :meth:`Queries.answer` in the link's reader task. A plain-function handler
answers there and then; an ``async`` one is handed to one of ``max_concurrent_queries``
worker tasks, so a handler may itself ask a query. Every query gets exactly one outcome: the
reply, or a :class:`~peerkit.protocol.QueryFailed` naming why.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from . import codec
from ._admission import BROKER_ID
from ._checks import check_seconds
from ._handlers import check_handler
from ._link import Link
from .codec import Envelope, control, pack_envelope
from .errors import (
    BrokerBusyError,
    BrokerLostError,
    BrokerRequestError,
    DecodeError,
    HandlerAlreadyRegistered,
    HandlerGoneError,
    MultiplePeersAvailable,
    NoHandlerError,
    PeerkitError,
    QueryAnswerUnknown,
    QueryTimeout,
    RemoteError,
)
from .messages import Message, message_type_of
from .protocol import Kind, QueryFailed, RegisterHandler

log = logging.getLogger("peerkit.peer")

Handler = Callable[[Any], Any]


def _never_run(awaitable: object) -> None:
    """Close a handler's coroutine that will not be awaited (no "never awaited" warning)."""
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()


@attrs.define(eq=False)
class Queries:
    """Query handlers and workers, and :meth:`ask` (see the module docstring)."""

    link: Link
    peer_id: str
    max_concurrent: int
    request_timeout: float
    #: handlers of built-in queries (control messages), beside the user's
    builtin: dict[str, Handler] = attrs.field(factory=dict)

    _handlers: dict[str, Handler] = attrs.field(factory=dict)
    _policies: dict[str, str] = attrs.field(factory=dict)
    _send: trio.MemorySendChannel[tuple[Envelope, Awaitable[Any], int]] = attrs.field(init=False)
    _recv: trio.MemoryReceiveChannel[tuple[Envelope, Awaitable[Any], int]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[tuple[Envelope, Awaitable[Any], int]](
            self.max_concurrent * 4
        )

    @property
    def types(self) -> list[str]:
        """The message types this peer answers."""
        return list(self._handlers)

    # ------------------------------------------------------------------ answering
    def answer(self, env: Envelope) -> None:
        """Answer a query at once if its handler is a plain function; hand an awaitable
        result to a worker (or refuse with ``busy`` when all are taken and the queue is
        full)."""
        handler = self._handlers.get(env.type) or self.builtin.get(env.type)
        if handler is None:
            self.fail(
                env, "no_handler", f"peer {self.peer_id!r} has no handler for {env.type!r} queries"
            )
            return
        try:
            msg = codec.decode_message(env.type, env.body, env.sender)
        except DecodeError as exc:
            self.fail(env, "bad_request", str(exc))
            return
        try:
            result = handler(msg)
        except Exception as exc:
            self._remote_error(env, exc)
            return
        if isinstance(result, Message) or not inspect.isawaitable(result):
            self._reply(env, result)
            return
        try:
            self._send.send_nowait((env, result, self.link.session))
        except trio.WouldBlock:
            _never_run(result)
            self.fail(
                env,
                "busy",
                f"peer {self.peer_id!r} has too many queries in progress; raise "
                "max_concurrent_queries or retry",
            )

    async def worker(self) -> None:
        """Run async handlers' answers, one at a time (the peer starts several)."""
        async for env, pending, session in self._recv:
            try:
                result = await pending
            except Exception as exc:
                if self.link.session == session:
                    self._remote_error(env, exc)
            else:
                # an answer to a query that came over a connection since lost is dropped:
                # its correlation id means nothing (or something else) to the new one
                if self.link.session == session:
                    self._reply(env, result)

    def drop_waiting(self) -> None:
        """Queries still waiting for a worker will not be answered: tell their askers."""
        while True:
            try:
                env, rest, session = self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            _never_run(rest)
            if self.link.up and self.link.session == session:
                self.fail(env, "handler_gone", f"peer {self.peer_id!r} is shutting down")

    def fail(self, env: Envelope, code: str, detail: str) -> None:
        """Answer the query ``env`` with a failure."""
        self.link.push(
            control(
                Kind.QERR,
                QueryFailed(code=code, detail=detail, peer_id=self.peer_id),
                corr=env.corr,
            )
        )

    def _remote_error(self, env: Envelope, exc: Exception) -> None:
        log.warning(
            "peer %r: query handler for %r raised %s: %s",
            self.peer_id,
            env.type,
            type(exc).__name__,
            exc,
        )
        failure = QueryFailed(
            code="remote_error",
            detail=str(exc),
            peer_id=self.peer_id,
            error_type=type(exc).__name__,
        )
        self.link.push(control(Kind.QERR, failure, corr=env.corr))

    def _reply(self, env: Envelope, result: object) -> None:
        if not isinstance(result, Message):
            self.fail(
                env,
                "bad_reply",
                f"the {env.type!r} handler of {self.peer_id!r} "
                f"returned {type(result).__name__}, not a Message",
            )
            return
        try:
            body = codec.encode_body(result, self.link.max_message_size)
        except PeerkitError as exc:
            self.fail(env, "bad_reply", str(exc))
            return
        self.link.push(
            pack_envelope(int(Kind.REPLY), result.message_type(), "", env.corr, "", body)
        )

    # ------------------------------------------------------------------ registering
    async def register(self, msg_type: type[Message], handler: Handler, policy: str) -> None:
        type_name = message_type_of(msg_type)
        check_handler(handler, f"the query handler of {type_name!r}")
        if type_name in self._handlers:
            raise HandlerAlreadyRegistered(
                "already_registered",
                f"peer {self.peer_id!r} already has a handler for {type_name!r}; "
                "unregister_query_handler() first",
            )
        self._handlers[type_name] = handler
        self._policies[type_name] = policy
        try:
            await self.link.call(
                Kind.REG,
                body=codec.encode_body(RegisterHandler(msg_type=type_name, policy=policy)),
                timeout=self.request_timeout,
            )
        except BaseException as exc:
            self._handlers.pop(type_name, None)
            if not isinstance(exc, BrokerRequestError) and self.link.up:
                # cancelled or timed out: the broker may have registered us; undo that
                self.link.push(pack_envelope(int(Kind.UNREG), type_name))
            raise

    async def reregister(self) -> None:
        """Tell a new broker connection every type this peer answers."""
        for type_name in list(self._handlers):
            body = codec.encode_body(
                RegisterHandler(
                    msg_type=type_name, policy=self._policies.get(type_name, "exclusive")
                )
            )
            await self.link.call(Kind.REG, body=body, timeout=self.request_timeout)

    async def unregister(self, msg_type: type[Message], *, tell_broker: bool) -> None:
        type_name = message_type_of(msg_type)
        if self._handlers.pop(type_name, None) is None:
            raise PeerkitError(f"peer {self.peer_id!r} has no handler for {type_name!r}")
        if tell_broker and self.link.up:
            await self.link.call(Kind.UNREG, type_name, timeout=self.request_timeout)

    # ------------------------------------------------------------------ asking
    async def ask(self, target: str, msg: Message, timeout: float) -> Message:
        """Ask ``target`` (or whichever peer handles the type, for "") and return the
        response; raises a :class:`QueryAnswerUnknown` subclass otherwise."""
        check_seconds("timeout", timeout)
        type_name = msg.message_type()
        body = codec.encode_body(msg, self.link.max_message_size)
        what = f"query {type_name!r}" + (f" to {target!r}" if target else "")
        if not self.link.up:
            raise BrokerLostError(
                f"{what}: the peer has no connection to the broker (it was lost; the peer is "
                "reconnecting)"
            )
        env = await self.link.request(Kind.QUERY, type_name, target, body, timeout)
        if env is None:
            raise QueryTimeout(f"{what}: no answer within {timeout:g} s")
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
        if code == "timeout":
            raise QueryTimeout(f"{what}: {detail}")
        if code == "busy" and env.sender == BROKER_ID:
            raise BrokerBusyError(f"{what}: {detail}")
        raise QueryAnswerUnknown(f"{code}: {detail}")
