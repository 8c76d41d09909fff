"""Issue 12, item 9: logs cannot be flooded.

The sans-IO limiter (:mod:`peerkit._ratelog`) with a clock of the test's own, then a peer
that receives an undecodable run of 1,024 messages and frames it cannot read: one ERROR line
with the count, and exact counters.
"""

from __future__ import annotations

import contextlib
import logging

import msgpack
import pytest
import trio
import trio_websocket
from hypothesis import given, settings
from hypothesis import strategies as st

from peerkit import Broker, Message, Peer, message
from peerkit._batching import MAX_BATCH
from peerkit._ratelog import OTHERS, RateLog, Report
from peerkit.codec import control, iter_envelopes, pack_envelope
from peerkit.messages import BrokerShutdownMsg
from peerkit.protocol import Kind, Welcome
from peerkit.testing import wait_for_condition


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------- the limiter


def test_first_event_is_reported_then_held_back_for_an_interval() -> None:
    clock = Clock()
    limiter = RateLog(10.0, clock)
    assert limiter.hit("a", 5) == Report(5, key="a")
    clock.now += 3
    assert limiter.hit("a") is None
    assert limiter.hit("a", 7) is None
    clock.now += 7  # 10 s after the report
    report = limiter.hit("a", 2)
    assert report == Report(2, held=8, since=10.0, key="a")
    assert report.total == 10
    assert report.more() == " (and 8 more since the last report, 10 s ago, not logged one by one)"
    assert Report(3).more() == ""


def test_keys_are_limited_independently() -> None:
    clock = Clock()
    limiter = RateLog(1.0, clock)
    assert limiter.hit(("T", "alice")) is not None
    assert limiter.hit(("T", "bob")) is not None
    assert limiter.hit(("T", "alice")) is None
    assert limiter.hit(("U", "alice")) is not None


def test_invented_keys_cannot_grow_it() -> None:
    clock = Clock()
    limiter = RateLog(10.0, clock, max_keys=4)
    reports = [limiter.hit(f"k{i}") for i in range(1000)]
    assert [r.key for r in reports[:4] if r is not None] == ["k0", "k1", "k2", "k3"]
    # the rest count under OTHERS: reported once, then held
    assert reports[4] == Report(1, key=OTHERS)
    assert reports[5:] == [None] * 995
    assert len(limiter._keys) == 5
    assert limiter.drain() == [Report(0, held=995, since=0.0, key=OTHERS)]
    # keys whose interval is over, with nothing held, make room again
    for i in range(4):
        limiter.hit(f"k{i}")
    clock.now += 10
    assert limiter.hit("new") == Report(1, key="new")
    assert "new" in limiter._keys and OTHERS not in limiter._keys


def test_drain_reports_what_was_held_back_and_forgets() -> None:
    clock = Clock()
    limiter = RateLog(10.0, clock)
    limiter.hit("a")
    limiter.hit("b")
    limiter.hit("a", 4)
    clock.now += 2
    assert limiter.drain() == [Report(0, held=4, since=2.0, key="a")]
    assert limiter.drain() == []
    assert limiter.hit("a") == Report(1, key="a")  # forgotten: reported at once


def test_the_clock_is_read_only_when_an_event_happens() -> None:
    reads = 0

    def clock() -> float:
        nonlocal reads
        reads += 1
        return 0.0

    limiter = RateLog(10.0, clock)
    assert reads == 0
    limiter.hit("a")
    assert reads == 1


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d"]),
            st.integers(1, 1000),
            st.floats(0, 30, allow_nan=False),
        ),
        max_size=60,
    ),
    max_keys=st.integers(1, 5),
)
def test_nothing_is_lost_and_each_key_reports_once_an_interval(
    events: list[tuple[str, int, float]], max_keys: int
) -> None:
    clock = Clock()
    limiter = RateLog(10.0, clock, max_keys=max_keys)
    reported: dict[object, list[float]] = {}
    total = 0
    for key, count, step in events:
        clock.now += step
        report = limiter.hit(key, count)
        if report is not None:
            assert report.count == count
            total += report.total
            times = reported.setdefault(report.key, [])
            assert not times or clock.now - times[-1] >= 10.0
            times.append(clock.now)
    total += sum(r.total for r in limiter.drain())
    assert total == sum(count for _, count, _ in events)
    assert len(limiter._keys) == 0


# --------------------------------------------------------------------- a peer's logs


@message(type="test_ratelog.Tick")
class Tick(Message):
    seq: int


BAD = msgpack.packb({"seq": "not an int"})
REQUESTS = {int(Kind.SUB), int(Kind.UNSUB), int(Kind.REG), int(Kind.UNREG)}


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("peerkit")
    ]


async def test_an_undecodable_run_of_1024_messages_is_one_error_line(
    broker: Broker, caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    caplog.set_level(logging.ERROR, logger="peerkit")
    with trio.fail_after(60):
        good: list[int] = []
        arrived = trio.Event()

        def on_tick(msg: Tick) -> None:
            good.append(msg.seq)
            arrived.set()

        async def bad_run_then(seq: int) -> None:
            nonlocal arrived
            arrived = trio.Event()
            for _ in range(MAX_BATCH):  # one run: queued with no checkpoint in between
                pub._link.publish(Tick.message_type(), BAD)
            await pub.send_message(Tick(seq=seq))
            await arrived.wait()

        async with Peer(broker.url, "sub") as sub, Peer(broker.url, "pub") as pub:
            await sub.subscribe_for_all_msg_subtype(Tick, on_tick)
            await bad_run_then(1)
            assert sub.decode_errors == 1024
            lines = error_lines(caplog)
            assert len(lines) == 1, lines
            assert "dropped 1024 undecodable messages of the 1024 in a run" in lines[0]
            assert "'test_ratelog.Tick' from 'pub'" in lines[0]  # the first error's text
            assert "total 1024, see peer.decode_errors" in lines[0]

            # the next run, within the interval: counted, not logged
            await bad_run_then(2)
            assert sub.decode_errors == 2048
            assert len(error_lines(caplog)) == 1

            # after the interval: one line for this run, with the held-back count
            await trio.sleep(11)
            await bad_run_then(3)
            lines = error_lines(caplog)
            assert len(lines) == 2, lines
            assert "dropped 1024 undecodable messages" in lines[1]
            assert "and 1024 more since the last report, 11 s ago" in lines[1]
            assert "total 3072" in lines[1]

            # held back at shutdown: a last line, so nothing goes unreported
            await bad_run_then(4)
            assert good == [1, 2, 3, 4]
        assert sub.decode_errors == 4096
        lines = error_lines(caplog)
        assert len(lines) == 3, lines
        assert "1024 more undecodable 'test_ratelog.Tick' messages from 'pub'" in lines[2]
        assert "total 4096" in lines[2]


async def test_a_run_with_some_bad_messages_delivers_the_good_ones(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="peerkit")
    with trio.fail_after(10):
        good: list[int] = []
        done = trio.Event()

        def on_tick(msg: Tick) -> None:
            good.append(msg.seq)
            if msg.seq == 99:
                done.set()

        async with Peer(broker.url, "sub") as sub, Peer(broker.url, "pub") as pub:
            await sub.subscribe_for_all_msg_subtype(Tick, on_tick)
            for i in range(100):
                body = BAD if i % 3 == 0 and i != 99 else msgpack.packb({"seq": i})
                pub._link.publish(Tick.message_type(), body)
            await done.wait()
        assert good == [i for i in range(100) if i % 3 or i == 99]
        assert sub.decode_errors == 33
        lines = error_lines(caplog)
        assert len(lines) == 1, lines
        assert "dropped 33 undecodable messages of the 100 in a run" in lines[0]


async def test_bad_frames_from_the_broker_are_one_error_line(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker (here a fake one) that sends frames the peer cannot read: the peer logs the
    first one, holds the rest back, and carries on (it obeys the shutdown that follows)."""
    caplog.set_level(logging.ERROR, logger="peerkit")
    with trio.fail_after(10):
        connected = trio.Event()

        async def answer_requests(ws: trio_websocket.WebSocketConnection) -> None:
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                while True:
                    for env in iter_envelopes(await ws.get_message()):  # type: ignore[arg-type]
                        if env.kind in REQUESTS:
                            await ws.send_message(pack_envelope(int(Kind.ACK), corr=env.corr))

        async def fake_broker(request: trio_websocket.WebSocketRequest) -> None:
            ws = await request.accept()
            hello = next(iter_envelopes(await ws.get_message()))  # type: ignore[arg-type]
            assert hello.kind == Kind.HELLO
            welcome = Welcome(
                peer_id="p", heartbeat_interval=30, heartbeat_timeout=60, max_message_size=1000
            )
            await ws.send_message(control(Kind.WELCOME, welcome))
            async with trio.open_nursery() as tasks:
                tasks.start_soon(answer_requests, ws)
                await connected.wait()
                for i in range(500):
                    await ws.send_message(b"\xc1" if i % 2 else pack_envelope(99))
                await ws.send_message(control(Kind.SHUTDOWN, BrokerShutdownMsg()))

        server = await nursery.start(
            trio_websocket.serve_websocket, fake_broker, "127.0.0.1", 0, None
        )
        peer = Peer(f"ws://127.0.0.1:{server.port}", "p")
        await nursery.start(peer.run)
        connected.set()
        await peer.wait_for_state(lambda p: p.is_finished, 10)
        lines = error_lines(caplog)
        assert len(lines) == 1, lines
        assert "bad frame from the broker" in lines[0]
        nursery.cancel_scope.cancel()


async def test_losses_frame_after_frame_are_one_warning_line(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscriber that cannot keep up loses messages in frame after frame: one WARNING
    line (and one at shutdown for the rest), and dropped_messages is exact."""
    caplog.set_level(logging.WARNING, logger="peerkit")
    with trio.fail_after(20):
        gate = trio.Event()
        handled: list[int] = []

        async def slow(msg: Tick) -> None:
            await gate.wait()
            handled.append(msg.seq)

        async with (
            Peer(broker.url, "sub", receive_queue_size=1) as sub,
            Peer(broker.url, "pub") as pub,
        ):
            await sub.subscribe_for_all_msg_subtype(Tick, slow)
            for seq in range(20):  # one frame each: the subscriber reads each before the next
                await pub.send_message(Tick(seq=seq))
                await wait_for_condition(lambda n=seq: sub._subs.msgs_in > n)
            # the first is in the handler, the second queued, the 18 others lost
            assert sub.dropped_messages == 18
            lines = [r.getMessage() for r in caplog.records if " lost " in r.getMessage()]
            assert len(lines) == 1, lines
            assert "peer 'sub' lost 1 messages" in lines[0]
            gate.set()
            await wait_for_condition(lambda: len(handled) == 2)
        assert handled == [0, 1]
        lines = [r.getMessage() for r in caplog.records if " lost " in r.getMessage()]
        assert len(lines) == 2, lines
        assert "peer 'sub' lost 17 more messages since the last report" in lines[1]
        assert "total 18" in lines[1]
