"""A lone caller waiting for its answer polls the connection for ``busy_poll`` seconds
before it sleeps (``Peer(busy_poll=...)``).

The polling must be cooperative (the process's other tasks, timers and I/O carry on), it
must end when its time is up or the process has other work, a cancelled poll must read
nothing and hand the reading back, and ``busy_poll=0`` or a mock clock must not poll at all.
"""

from __future__ import annotations

import logging
import math
import random
import ssl
import subprocess
import sys
from collections.abc import Iterator

import pytest
import trio
import trio.testing

import peerkit._peer_link
import peerkit._ws
from peerkit import Broker, Message, Peer, PeerkitError, QueryTimeout, message
from peerkit.testing import wait_for_condition


@message
class PAsk(Message):
    n: int


@message
class PAnswer(Message):
    n: int


@message
class PTick(Message):
    seq: int


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="peerkit")


async def later(msg: PAsk) -> PAnswer:
    """Answers after 50 ms."""
    await trio.sleep(0.05)
    return PAnswer(n=msg.n)


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the poll passes made (one item: the count)."""
    count = [0]
    real = peerkit._ws._poll_pass

    async def counted() -> None:
        count[0] += 1
        await real()

    monkeypatch.setattr(peerkit._ws, "_poll_pass", counted)
    yield count


async def test_the_process_runs_on_while_a_caller_polls(broker: Broker, passes: list[int]) -> None:
    """The handler lives in the same process as the asker, and answers after a timer, while
    another task ticks on a timer of its own: both timers fire while the caller polls."""
    with trio.fail_after(10):
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.sleep(0.001)

        async with (
            Peer(broker.url, "h") as h,
            Peer(broker.url, "asker", busy_poll=0.1) as asker,
            trio.open_nursery() as nursery,
        ):
            await h.register_query_handler(PAsk, later)
            nursery.start_soon(ticker)
            before = ticks
            start = trio.current_time()
            assert await asker.query(PAsk(n=7)) == PAnswer(n=7, sender="h")
            assert trio.current_time() - start < 5
            assert passes[0] > 0  # it did poll
            assert ticks - before >= 5  # and the timers of other tasks fired meanwhile
            nursery.cancel_scope.cancel()


async def test_polling_ends_after_busy_poll_and_the_caller_sleeps(
    broker: Broker, passes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a clock that moves 1 ms per reading, a 10 ms budget allows about ten passes;
    then the caller must sleep, or the other tasks would never all be blocked. (The budget
    starts at 1 ms and passes until it is reached, so nine of them.)"""
    with trio.fail_after(10):
        now = [0.0]

        def fake_clock() -> float:
            now[0] += 0.001
            return now[0]

        release = trio.Event()
        async with Peer(broker.url, "h") as h, Peer(broker.url, "asker", busy_poll=0.01) as asker:

            async def held(msg: PAsk) -> PAnswer:
                await release.wait()
                return PAnswer(n=msg.n)

            await h.register_query_handler(PAsk, held)
            await trio.testing.wait_all_tasks_blocked()  # the peers' own requests are done
            passes[0] = 0
            monkeypatch.setattr(peerkit._ws, "perf_counter", fake_clock)
            monkeypatch.setattr(peerkit._peer_link, "perf_counter", fake_clock)
            async with trio.open_nursery() as nursery:
                answer: list[Message] = []

                async def ask() -> None:
                    answer.append(await asker.query(PAsk(n=3)))

                nursery.start_soon(ask)
                await wait_for_condition(lambda: passes[0] > 0)
                await trio.testing.wait_all_tasks_blocked()  # the caller sleeps now
                assert 1 <= passes[0] <= 9
                release.set()
            assert answer == [PAnswer(n=3, sender="h")]


async def test_a_poll_cut_short_by_a_timeout_hands_the_reading_back(
    broker: Broker, passes: list[int]
) -> None:
    with trio.fail_after(10):
        got: list[int] = []
        async with Peer(broker.url, "h") as h, Peer(broker.url, "asker", busy_poll=0.1) as asker:

            async def answer(msg: PAsk) -> PAnswer:
                if msg.n < 0:
                    await trio.sleep_forever()
                return PAnswer(n=msg.n)

            await h.register_query_handler(PAsk, answer)
            await asker.subscribe_for_all_msg_subtype(PTick, lambda m: got.append(m.seq))
            with pytest.raises(QueryTimeout):
                await asker.query(PAsk(n=-1), timeout=0.05)  # cancelled while it polls
            assert passes[0] > 0
            for i in range(20):  # the reader task reads again: nothing lost, in order
                await h.send_message(PTick(seq=i))
            await wait_for_condition(lambda: len(got) == 20)
            assert got == list(range(20))
            assert await asker.query(PAsk(n=5)) == PAnswer(n=5, sender="h")


async def test_busy_poll_zero_does_not_poll(broker: Broker, passes: list[int]) -> None:
    with trio.fail_after(10):
        async with (
            Peer(broker.url, "h", busy_poll=0) as h,
            Peer(broker.url, "asker", busy_poll=0) as asker,
        ):
            await h.register_query_handler(PAsk, lambda m: PAnswer(n=m.n))
            for i in range(50):
                assert await asker.query(PAsk(n=i)) == PAnswer(n=i, sender="h")
            assert passes[0] == 0


async def test_over_tls_a_caller_does_not_poll(
    nursery: trio.Nursery, tls: tuple[ssl.SSLContext, ssl.SSLContext], passes: list[int]
) -> None:
    """Over TLS the caller waits for the reader task (a cancelled TLS read may break the
    stream), so there is nothing for it to poll."""
    server_ctx, client_ctx = tls
    with trio.fail_after(30):
        broker = Broker(ssl_context=server_ctx)
        await nursery.start(broker.run)
        async with (
            Peer(broker.url, "h", ssl_context=client_ctx) as h,
            Peer(broker.url, "asker", ssl_context=client_ctx, busy_poll=0.1) as asker,
        ):
            await h.register_query_handler(PAsk, lambda m: PAnswer(n=m.n))
            for i in range(20):
                assert await asker.query(PAsk(n=i)) == PAnswer(n=i, sender="h")
            assert passes[0] == 0
        await broker.shutdown()


async def test_a_poll_pass_lets_the_others_run_and_can_be_cancelled() -> None:
    with trio.fail_after(5):
        ran: list[str] = []

        async def other() -> None:
            ran.append("other")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            for _ in range(100):  # (trio may run the two in either order)
                await peerkit._ws._poll_pass()
                if ran:
                    break
            assert ran == ["other"]  # a pass is a scheduling point
        reached = False
        with trio.CancelScope() as scope:
            scope.cancel()
            await peerkit._ws._poll_pass()
            reached = True
        assert not reached  # and a cancellation point


async def test_cancelled_polls_with_data_arriving_lose_nothing(broker: Broker) -> None:
    """Messages stream in while the asker's polling queries are cancelled at random
    moments: each message arrives once, in order."""
    with trio.fail_after(30):
        got: list[int] = []
        total = 2000
        async with (
            Peer(broker.url, "h") as h,
            Peer(broker.url, "asker", busy_poll=0.1) as asker,
            trio.open_nursery() as nursery,
        ):

            async def never(msg: PAsk) -> PAnswer:
                await trio.sleep_forever()
                raise AssertionError("unreachable")

            await h.register_query_handler(PAsk, never)
            await asker.subscribe_for_all_msg_subtype(PTick, lambda m: got.append(m.seq))

            async def stream() -> None:
                for i in range(total):
                    await h.send_message(PTick(seq=i))
                    if i % 10 == 0:
                        await trio.lowlevel.checkpoint()

            nursery.start_soon(stream)
            timeouts = 0
            while len(got) < total and timeouts < 300:
                with pytest.raises(QueryTimeout):
                    await asker.query(PAsk(n=-1), timeout=random.uniform(0.0001, 0.003))
                timeouts += 1
            await wait_for_condition(lambda: len(got) >= total, timeout=10)
            assert got == list(range(total))


async def test_polling_stops_when_the_process_has_other_work(
    broker: Broker, passes: list[int]
) -> None:
    """A task that always has work keeps the CPU from going idle: there is no wake-up to
    save, so the caller sleeps after the first pass or so (it would otherwise make
    hundreds of passes over the 50 ms the answer takes)."""
    with trio.fail_after(10):

        async def busy() -> None:
            while True:
                await trio.lowlevel.checkpoint()

        async with (
            Peer(broker.url, "h") as h,
            Peer(broker.url, "asker", busy_poll=0.1) as asker,
            trio.open_nursery() as nursery,
        ):
            await h.register_query_handler(PAsk, later)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(busy)
            passes[0] = 0
            assert await asker.query(PAsk(n=1)) == PAnswer(n=1, sender="h")
            assert 1 <= passes[0] <= 20
            nursery.cancel_scope.cancel()


async def test_no_polling_under_a_mock_clock(
    broker: Broker, passes: list[int], autojump_clock: trio.abc.Clock
) -> None:
    """Virtual time stands still while a task polls, so with a mock clock nobody polls."""
    with trio.fail_after(60):
        async with Peer(broker.url, "h") as h, Peer(broker.url, "asker", busy_poll=0.1) as asker:

            async def later(msg: PAsk) -> PAnswer:
                await trio.sleep(1)
                return PAnswer(n=msg.n)

            await h.register_query_handler(PAsk, later)
            for i in range(5):
                assert await asker.query(PAsk(n=i)) == PAnswer(n=i, sender="h")
            assert passes[0] == 0


@pytest.mark.parametrize("bad", [-0.001, -1, math.nan, math.inf, True, "1ms", None])
def test_a_bad_busy_poll_is_refused_by_name(bad: object) -> None:
    with pytest.raises(PeerkitError, match="busy_poll must be a number of seconds, 0 or more"):
        Peer("ws://127.0.0.1:1", "p", busy_poll=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("too_long", [0.1001, 2, 60])
def test_a_busy_poll_over_a_tenth_of_a_second_is_refused(too_long: float) -> None:
    with pytest.raises(PeerkitError, match=r"busy_poll must be at most 0.1 s"):
        Peer("ws://127.0.0.1:1", "p", busy_poll=too_long)


@pytest.mark.parametrize("good", [0, 0.0, 0.0005, 0.1])
def test_busy_poll_accepts_zero_and_positive_seconds(good: float) -> None:
    assert Peer("ws://127.0.0.1:1", "p", busy_poll=good).busy_poll == float(good)


def test_importing_peerkit_does_not_import_trio_testing() -> None:
    """The mock-clock check must not import trio.testing (which imports pytest where it is
    installed: a tenth of a second at the start of every peer process)."""
    code = "import sys, peerkit; print(sorted({'trio.testing', 'pytest'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
