"""Queries through the broker and every way they can fail."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.lowlevel

from peerkit import (
    Broker,
    HandlerAlreadyRegistered,
    HandlerGoneError,
    Message,
    MultiplePeersAvailable,
    NoHandlerError,
    Peer,
    QueryAnswerUnknown,
    QueryTimeout,
    RemoteError,
    message,
    query_handler,
)
from peerkit.messages import OkMsg
from peerkit.testing import wait_for_condition


@message
class Add(Message):
    a: int
    b: int


@message
class Sum(Message):
    value: int


@message
class Who(Message):
    pass


@message
class Slow(Message):
    pass


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="peerkit")


async def test_query_sync_and_async_handlers(broker: Broker) -> None:
    with trio.fail_after(10):
        askers: list[str] = []

        def add(msg: Add) -> Sum:
            askers.append(msg.sender)
            return Sum(value=msg.a + msg.b)

        async def who(msg: Who) -> OkMsg:
            await trio.lowlevel.checkpoint()
            return OkMsg(detail="calc")

        async with Peer(broker.url, "calc") as calc, Peer(broker.url, "asker") as asker:
            await calc.register_query_handler(Add, add)
            await calc.register_query_handler(Who, who)
            answer = await asker.query(Add(a=2, b=3))
            assert answer == Sum(value=5, sender="calc")
            assert (await asker.query(Who())).detail == "calc"  # type: ignore[attr-defined]
            assert askers == ["asker"]
            assert await asker.ask_peer("calc", Add(a=1, b=1)) == Sum(value=2, sender="calc")


async def test_plain_handlers_answer_while_async_ones_fill_the_workers(broker: Broker) -> None:
    """A plain-function handler answers as its query arrives; async handlers wait for one
    of the ``max_concurrent_queries`` workers, and past their queue the asker hears busy."""
    with trio.fail_after(10):
        release = trio.Event()
        entered = trio.Event()

        async def hang(msg: Slow) -> OkMsg:
            entered.set()
            await release.wait()
            return OkMsg(detail="slow")

        async with (
            Peer(broker.url, "calc", max_concurrent_queries=1) as calc,
            Peer(broker.url, "asker") as asker,
        ):
            await calc.register_query_handler(Slow, hang)
            await calc.register_query_handler(Add, lambda m: Sum(value=m.a + m.b))
            async with trio.open_nursery() as nursery:
                for _ in range(5):  # one runs, four wait in the queue (4 per worker)
                    nursery.start_soon(asker.query, Slow())
                await entered.wait()
                assert await asker.query(Add(a=2, b=2)) == Sum(value=4, sender="calc")
                with pytest.raises(QueryAnswerUnknown, match="busy"):
                    await asker.query(Slow())
                release.set()


async def test_no_handler_fails_at_once(broker: Broker) -> None:
    with trio.fail_after(2):
        async with Peer(broker.url, "asker", query_timeout=60) as asker:
            with pytest.raises(NoHandlerError, match="'Add'"):
                await asker.query(Add(a=1, b=2))
            with pytest.raises(NoHandlerError, match="not connected"):
                await asker.ask_peer("nobody", Add(a=1, b=2))
            async with Peer(broker.url, "idle") as _idle:
                with pytest.raises(NoHandlerError, match="no handler"):
                    await asker.ask_peer("idle", Add(a=1, b=2))


async def test_second_handler_is_refused_unless_shared(broker: Broker) -> None:
    with trio.fail_after(10):
        async with (
            Peer(broker.url, "h1") as h1,
            Peer(broker.url, "h2") as h2,
            Peer(broker.url, "asker") as asker,
        ):
            await h1.register_query_handler(Add, lambda m: Sum(value=1))
            with pytest.raises(HandlerAlreadyRegistered, match="already handled by h1"):
                await h2.register_query_handler(Add, lambda m: Sum(value=2))
            # the refusal left h2 without a local handler either: it can register later
            await h1.unregister_query_handler(Add)
            await h2.register_query_handler(Add, lambda m: Sum(value=2))
            assert await asker.query(Add(a=0, b=0)) == Sum(value=2, sender="h2")
            with pytest.raises(NoHandlerError):
                await asker.query(Who())


async def test_round_robin_sharing(broker: Broker) -> None:
    with trio.fail_after(10):
        async with (
            Peer(broker.url, "h1") as h1,
            Peer(broker.url, "h2") as h2,
            Peer(broker.url, "asker") as asker,
        ):
            await h1.register_query_handler(Who, lambda m: OkMsg(), policy="round_robin")
            await h2.register_query_handler(Who, lambda m: OkMsg(), policy="round_robin")
            senders = [(await asker.query(Who())).sender for _ in range(4)]
            assert senders == ["h1", "h2", "h1", "h2"]


async def test_explicit_sharing_asks_the_caller_to_choose(broker: Broker) -> None:
    with trio.fail_after(10):
        async with (
            Peer(broker.url, "h1") as h1,
            Peer(broker.url, "h2") as h2,
            Peer(broker.url, "asker") as asker,
        ):
            await h1.register_query_handler(Who, lambda m: OkMsg(), policy="explicit")
            await h2.register_query_handler(Who, lambda m: OkMsg(), policy="explicit")
            with pytest.raises(MultiplePeersAvailable) as info:
                await asker.query(Who())
            assert info.value.peers == ("h1", "h2")
            assert (await asker.ask_peer("h2", Who())).sender == "h2"


async def test_remote_error_names_peer_type_and_message(broker: Broker) -> None:
    with trio.fail_after(10):

        def broken(msg: Add) -> Sum:
            raise ZeroDivisionError("division by zero in the calculator")

        async with Peer(broker.url, "calc") as calc, Peer(broker.url, "asker") as asker:
            await calc.register_query_handler(Add, broken)
            with pytest.raises(RemoteError) as info:
                await asker.query(Add(a=1, b=0))
            err = info.value
            assert (err.peer_id, err.error_type) == ("calc", "ZeroDivisionError")
            assert "division by zero in the calculator" in str(err)
            assert "calc" in str(err) and "ZeroDivisionError" in str(err)
            assert isinstance(err, QueryAnswerUnknown)
            assert calc.is_running  # a failing query handler does not kill its peer


async def test_handler_returning_garbage_is_reported(broker: Broker) -> None:
    with trio.fail_after(10):
        async with Peer(broker.url, "calc") as calc, Peer(broker.url, "asker") as asker:
            await calc.register_query_handler(Add, lambda m: 42)
            with pytest.raises(QueryAnswerUnknown, match="returned int, not a Message"):
                await asker.query(Add(a=1, b=0))


async def test_handler_gone_fails_pending_queries_at_once(broker: Broker) -> None:
    with trio.fail_after(5):
        entered = trio.Event()

        async def hang(msg: Slow) -> OkMsg:
            entered.set()
            await trio.sleep_forever()
            raise AssertionError("unreachable")  # pragma: no cover

        async with Peer(broker.url, "asker", query_timeout=60) as asker:
            async with Peer(broker.url, "handler") as handler:
                await handler.register_query_handler(Slow, hang)
                async with trio.open_nursery() as nursery:

                    async def ask() -> None:
                        with pytest.raises(HandlerGoneError, match="'handler' left"):
                            await asker.query(Slow())

                    nursery.start_soon(ask)
                    await entered.wait()
                    await handler.async_shutdown()
            assert asker.is_running


async def test_queries_waiting_for_a_worker_fail_at_shutdown(broker: Broker) -> None:
    with trio.fail_after(10):
        entered = trio.Event()
        failures: list[BaseException] = []

        async def hang(msg: Slow) -> OkMsg:
            entered.set()
            await trio.sleep_forever()
            raise AssertionError("unreachable")  # pragma: no cover

        async def ask(asker: Peer) -> None:
            try:
                await asker.query(Slow())
            except HandlerGoneError as exc:
                failures.append(exc)

        async with Peer(broker.url, "asker", query_timeout=60) as asker:
            async with Peer(broker.url, "handler", max_concurrent_queries=1) as handler:
                await handler.register_query_handler(Slow, hang)
                async with trio.open_nursery() as nursery:
                    for _ in range(3):  # one runs, two wait for the worker
                        nursery.start_soon(ask, asker)
                    await entered.wait()
                    await wait_for_condition(
                        lambda: handler._queries._recv.statistics().current_buffer_used == 2
                    )
                    await handler.async_shutdown()
            assert len(failures) == 3  # none left to time out


async def test_timeout_then_late_reply_is_dropped(
    broker: Broker, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        release = trio.Event()
        answered = trio.Event()

        async def slow(msg: Slow) -> OkMsg:
            await release.wait()
            answered.set()
            return OkMsg(detail="late")

        async with Peer(broker.url, "h") as h, Peer(broker.url, "asker") as asker:
            await h.register_query_handler(Slow, slow)
            await h.register_query_handler(Add, lambda m: Sum(value=m.a + m.b))
            with pytest.raises(QueryTimeout, match="within 2"):
                await asker.query(Slow(), timeout=2)
            release.set()
            await answered.wait()
            # the late answer does not confuse the next query
            assert await asker.query(Add(a=20, b=22)) == Sum(value=42, sender="h")
            assert broker.routing.pending_count() == 0


async def test_asker_gone_late_reply_dropped_quietly(broker: Broker) -> None:
    with trio.fail_after(10):
        release = trio.Event()
        replied = trio.Event()

        async def slow(msg: Slow) -> OkMsg:
            await release.wait()
            return OkMsg()

        async with Peer(broker.url, "h") as h:
            await h.register_query_handler(Slow, slow)
            asker = Peer(broker.url, "asker")
            async with trio.open_nursery() as nursery:
                await nursery.start(asker.run)

                async def ask() -> None:
                    await asker.query(Slow())

                asker.create_task(ask)
                await trio.testing.wait_all_tasks_blocked()
                await asker.async_shutdown()
            assert broker.routing.pending_count() == 0
            release.set()
            await h.register_query_handler(Add, lambda m: (replied.set(), Sum(value=0))[1])
            async with Peer(broker.url, "asker2") as asker2:
                await asker2.query(Add(a=0, b=0))
            assert replied.is_set()
            assert h.is_running


class Chain(Peer):
    """A query handler that itself queries (needs concurrent query handling)."""

    @query_handler(Add)
    async def add(self, msg: Add) -> Sum:
        if msg.b == 0:
            return Sum(value=msg.a)
        inner = await self.query(Add(a=msg.a + 1, b=msg.b - 1))
        assert isinstance(inner, Sum)
        return inner


async def test_handler_may_query_itself_recursively(broker: Broker) -> None:
    with trio.fail_after(10):
        async with Chain(broker.url, "chain"), Peer(broker.url, "asker") as asker:
            assert await asker.query(Add(a=0, b=5)) == Sum(value=5, sender="chain")
