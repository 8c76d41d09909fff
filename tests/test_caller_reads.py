"""A caller waiting for an answer reads the broker connection itself (``_read_until``).

Nothing else may be lost or reordered by that, the reading must always go back to the
reader task, and the connection must still answer what the broker sends meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import ssl

import pytest
import trio

from peerkit import Broker, BrokerLostError, Message, Peer, PeerkitError, QueryTimeout, message
from peerkit.messages import OkMsg
from peerkit.testing import wait_for_condition


@message
class CAdd(Message):
    a: int


@message
class CSum(Message):
    value: int


@message
class CTick(Message):
    seq: int


@message
class CSlow(Message):
    pass


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="peerkit")


async def never(msg: CSlow) -> OkMsg:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def test_what_arrives_while_a_query_waits_is_delivered_in_order(broker: Broker) -> None:
    with trio.fail_after(10):
        got: list[int] = []
        sent = 0
        async with Peer(broker.url, "h") as h, Peer(broker.url, "asker") as asker:

            async def add(msg: CAdd) -> CSum:  # publishes to the asker before it answers
                nonlocal sent
                for _ in range(msg.a):
                    sent += 1
                    await h.send_message(CTick(seq=sent))
                return CSum(value=msg.a)

            await h.register_query_handler(CAdd, add)
            await asker.subscribe_for_all_msg_subtype(CTick, lambda m: got.append(m.seq))
            for n in (1, 50, 0, 3, 400):
                assert await asker.query(CAdd(a=n)) == CSum(value=n, sender="h")
            await wait_for_condition(lambda: len(got) >= sent)
            assert got == list(range(1, sent + 1))


async def test_a_query_that_times_out_hands_the_reading_back(
    broker: Broker, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        got: list[int] = []
        async with Peer(broker.url, "h") as h, Peer(broker.url, "asker") as asker:
            await h.register_query_handler(CSlow, never)
            await asker.subscribe_for_all_msg_subtype(CTick, lambda m: got.append(m.seq))
            with pytest.raises(QueryTimeout):
                await asker.query(CSlow(), timeout=1)
            await h.send_message(CTick(seq=1))  # only the reader task is left to read it
            await wait_for_condition(lambda: got == [1])
            assert asker.is_running


async def test_a_query_waiting_behind_a_reading_caller_that_times_out(broker: Broker) -> None:
    with trio.fail_after(15):
        async with Peer(broker.url, "h") as h, Peer(broker.url, "asker") as asker:

            async def slow(m: CAdd) -> CSum:
                await trio.sleep(m.a / 10)
                return CSum(value=m.a)

            await h.register_query_handler(CAdd, slow)
            out: dict[str, object] = {}

            async def first() -> None:
                with pytest.raises(QueryTimeout):
                    await asker.query(CAdd(a=50), timeout=0.2)  # reads, then times out
                out["first"] = "timed out"

            async def second() -> None:
                await trio.sleep(0.05)  # finds the first reading: waits for its event
                out["second"] = await asker.query(CAdd(a=5), timeout=5)

            async with trio.open_nursery() as n:
                n.start_soon(first)
                n.start_soon(second)
            assert out == {"first": "timed out", "second": CSum(value=5, sender="h")}


async def test_concurrent_queries_from_one_peer_all_get_their_own_answer(
    broker: Broker,
) -> None:
    with trio.fail_after(10):

        async def add(msg: CAdd) -> CSum:  # answers out of order
            await trio.sleep((msg.a % 4) / 1000)
            return CSum(value=msg.a + 1000)

        answers: dict[int, Message] = {}
        async with Peer(broker.url, "h", max_concurrent_queries=64) as h:
            await h.register_query_handler(CAdd, add)
            async with Peer(broker.url, "asker") as asker:

                async def ask(i: int) -> None:
                    answers[i] = await asker.query(CAdd(a=i))

                async with trio.open_nursery() as nursery:
                    for i in range(40):
                        nursery.start_soon(ask, i)
        assert answers == {i: CSum(value=i + 1000, sender="h") for i in range(40)}


async def test_handlers_that_ask_each_other_back_and_forth(broker: Broker) -> None:
    with trio.fail_after(20):
        async with (
            Peer(broker.url, "a", max_concurrent_queries=64) as a,
            Peer(broker.url, "b", max_concurrent_queries=64) as b,
        ):

            def handler(me: Peer, other: str):  # type: ignore[no-untyped-def]
                async def on_add(m: CAdd) -> CSum:  # asks the other, which asks back ...
                    if m.a <= 0:
                        return CSum(value=0)
                    r = await me.ask_peer(other, CAdd(a=m.a - 1))
                    assert isinstance(r, CSum)
                    return CSum(value=r.value + 1)

                return on_add

            await a.register_query_handler(CAdd, handler(a, "b"), policy="explicit")
            await b.register_query_handler(CAdd, handler(b, "a"), policy="explicit")
            results: dict[int, int] = {}

            async def ask(i: int) -> None:
                who, other = (a, "b") if i % 2 else (b, "a")
                r = await who.ask_peer(other, CAdd(a=i % 7))
                assert isinstance(r, CSum)
                results[i] = r.value

            async with trio.open_nursery() as n:
                for i in range(30):
                    n.start_soon(ask, i)
            assert results == {i: i % 7 for i in range(30)}


async def test_a_subscription_handler_that_queries_keeps_the_order(broker: Broker) -> None:
    with trio.fail_after(20):
        got: list[int] = []
        async with Peer(broker.url, "h") as h, Peer(broker.url, "sub") as sub:
            await h.register_query_handler(CAdd, lambda m: CSum(value=m.a))

            async def on_tick(m: CTick) -> None:
                got.append(m.seq)
                if m.seq % 10 == 0:
                    await sub.query(CAdd(a=m.seq))

            await sub.subscribe_for_all_msg_subtype(CTick, on_tick)
            for i in range(1, 501):
                await h.send_message(CTick(seq=i))
            await wait_for_condition(lambda: len(got) == 500, timeout=10)
            assert got == list(range(1, 501)) and sub.dropped_messages == 0


async def test_a_query_from_the_shutting_down_hook_is_answered(broker: Broker) -> None:
    answers: list[object] = []

    class Asker(Peer):
        async def _shutting_down(self) -> None:
            answers.append(await self.query(CAdd(a=1), timeout=1.5))

    with trio.fail_after(15):
        async with Peer(broker.url, "h") as h:
            await h.register_query_handler(CAdd, lambda m: CSum(value=m.a))
            async with Asker(broker.url, "asker") as asker:
                await asker.wait_for_state(lambda p: p.is_running, 5)
            await asker.wait_finished()
    assert answers == [CSum(value=1, sender="h")]
    assert asker.error is None


async def test_a_long_query_keeps_the_heartbeats_going(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(120):
        broker = Broker(heartbeat_interval=1, heartbeat_timeout=3)
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.run)
            async with Peer(broker.url, "h") as h, Peer(broker.url, "asker") as asker:

                async def slow(m: CAdd) -> CSum:
                    await trio.sleep(20)  # much longer than the heartbeat timeout
                    return CSum(value=1)

                await h.register_query_handler(CAdd, slow)
                assert await asker.query(CAdd(a=1), timeout=60) == CSum(value=1, sender="h")
                assert asker.is_running and h.is_running
            await broker.shutdown()


async def test_a_query_waiting_when_the_broker_vanishes_ends_the_peer(
    vanishing_broker: tuple[Broker, trio.CancelScope], autojump_clock: trio.abc.Clock
) -> None:
    broker, broker_scope = vanishing_broker
    with trio.fail_after(60):
        outcome: list[str] = []
        async with trio.open_nursery() as outer:
            h = Peer(broker.url, "h")
            asker = Peer(broker.url, "asker")
            asking = trio.Event()

            async def waits(msg: CSlow) -> OkMsg:
                asking.set()
                return await never(msg)

            async def ask() -> None:
                try:
                    await asker.query(CSlow(), timeout=30)
                    outcome.append("answered")
                except trio.Cancelled:
                    outcome.append("cancelled")
                    raise

            async def run(peer: Peer) -> None:
                with pytest.raises(BrokerLostError):
                    await peer.run()

            outer.start_soon(run, h)
            outer.start_soon(run, asker)
            await h.wait_for_state(lambda p: p.is_running, timeout=5)
            await h.register_query_handler(CSlow, waits)
            await asker.wait_for_state(lambda p: p.is_running, timeout=5)
            asker.create_task(ask)
            await asking.wait()
            broker_scope.cancel()  # abrupt: the connections just close
        assert outcome == ["cancelled"]
        assert asker.is_finished and isinstance(asker.error, BrokerLostError)


async def test_the_brokers_close_is_answered_even_as_a_query_takes_the_reading_over(
    nursery: trio.Nursery,
) -> None:
    """The broker closes a connection (a kick, its shutdown) just as the peer starts a
    query: the reader task has the close frame ready to read when the query cancels its
    read. The close must still be answered (a race: tried many times)."""
    broker = Broker(grace_period=1.0)
    await nursery.start(broker.run)
    unanswered = 0
    with trio.fail_after(120):
        async with Peer(broker.url, "h") as h:
            await h.register_query_handler(CAdd, lambda m: CSum(value=m.a))
            for i in range(20):
                asker = Peer(broker.url, f"asker{i}", grace_period=1.0)
                async with trio.open_nursery() as n:

                    async def run(peer: Peer = asker) -> None:
                        with pytest.raises(BrokerLostError):
                            await peer.run()

                    n.start_soon(run)
                    await asker.wait_for_state(lambda p: p.is_running, 5)
                    ws = broker._conns[f"asker{i}"].ws  # what Broker's aclose(1008) writes
                    ws._c.proto.send_close(1008, "kicked")
                    ws._c.generated()
                    ws._write_nowait()
                    await trio.lowlevel.cancel_shielded_checkpoint()  # the reader can run
                    with contextlib.suppress(PeerkitError), trio.move_on_after(1):
                        await asker.query(CAdd(a=1))  # its start cancels the reader's read
                    try:
                        await wait_for_condition(
                            lambda w=ws: w._c.proto.close_rcvd is not None, 0.5
                        )
                    except trio.TooSlowError:
                        unanswered += 1
                    await asker.wait_finished()
    assert unanswered == 0


async def test_many_queries_and_messages_over_tls(
    nursery: trio.Nursery, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """Over TLS a caller does not take the reading over (a cancelled TLS read may break the
    stream): queries and messages still all arrive."""
    server_ctx, client_ctx = tls
    with trio.fail_after(60):
        broker = Broker(ssl_context=server_ctx)
        await nursery.start(broker.run)
        got: list[int] = []
        async with (
            Peer(broker.url, "h", ssl_context=client_ctx, max_concurrent_queries=64) as h,
            Peer(broker.url, "asker", ssl_context=client_ctx) as asker,
        ):

            async def add(m: CAdd) -> CSum:
                await h.send_message(CTick(seq=m.a))
                return CSum(value=m.a)

            await h.register_query_handler(CAdd, add)
            await asker.subscribe_for_all_msg_subtype(CTick, lambda m: got.append(m.seq))

            async def ask(base: int) -> None:
                for i in range(200):
                    assert await asker.query(CAdd(a=base + i)) == CSum(value=base + i, sender="h")

            async with trio.open_nursery() as n:
                for k in range(5):
                    n.start_soon(ask, k * 1000)
            await wait_for_condition(lambda: len(got) == 1000)
            assert sorted(got) == sorted(k * 1000 + i for k in range(5) for i in range(200))
        await broker.shutdown()
