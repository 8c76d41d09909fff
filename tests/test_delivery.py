"""Delivery guarantees per subscription: drop (default), latest, lossless."""

from __future__ import annotations

import logging

import pytest
import trio

from peerkit import Broker, BrokerLostError, Message, Peer, PeerkitError, message, subscribe
from peerkit.testing import wait_for_condition


@message(type="delivery.Sample")
class Sample(Message):
    n: int


@message(type="delivery.Chunk")
class Chunk(Message):
    n: int
    data: bytes


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="peerkit")


async def test_latest_keeps_the_newest(nursery: trio.Nursery) -> None:
    """A display that cannot keep up still ends on the newest sample; what it missed is
    counted."""
    with trio.fail_after(20):
        broker = Broker(send_queue_size=20)
        await nursery.start(broker.run)
        release = trio.Event()
        got: list[int] = []

        async def show(msg: Sample) -> None:
            await release.wait()
            got.append(msg.n)

        async with (
            Peer(broker.url, "display", receive_queue_size=10) as display,
            Peer(broker.url, "amp") as amp,
        ):
            await display.subscribe_for_all_msg_subtype(Sample, show, delivery="latest")
            for n in range(1, 2001):
                await amp.send_message(Sample(n=n))
            await amp._link.flush()
            release.set()
            await wait_for_condition(lambda: got[-1:] == [2000], 10)
            assert got == sorted(got)  # in order, the oldest dropped
            assert display.dropped_messages > 0
            assert len(got) + display.dropped_messages == 2000  # nothing lost silently
        await broker.shutdown()


async def test_lossless_gets_everything_in_order_and_slows_the_publisher(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(60):
        broker = Broker(send_queue_size=50, heartbeat_interval=0.2, heartbeat_timeout=0.6)
        await nursery.start(broker.run)
        recorded: list[int] = []
        live: list[int] = []

        async def record(msg: Sample) -> None:
            recorded.append(msg.n)
            await trio.sleep(0.0005)  # slower than the publisher

        total = 3000
        async with (
            Peer(broker.url, "recorder", receive_queue_size=20) as recorder,
            Peer(broker.url, "plot", receive_queue_size=20) as plot,
            Peer(broker.url, "amp", send_queue_size=100) as amp,
        ):
            await recorder.subscribe_for_all_msg_subtype(Sample, record, delivery="lossless")
            await plot.subscribe_for_all_msg_subtype(Sample, lambda m: live.append(m.n))
            for n in range(total):
                await amp.send_message(Sample(n=n))
            await wait_for_condition(lambda: len(recorded) == total, 50)
            assert recorded == list(range(total))
            assert recorder.dropped_messages == 0
            # the back-pressured publisher's heartbeats did not time out, nor anyone's
            assert sorted(broker.peer_ids) == ["amp", "plot", "recorder"]
            # the other subscriber of the same publisher got messages all along
            assert live and live == sorted(live)
        await broker.shutdown()


async def test_a_stalled_lossless_subscriber_is_cut_and_the_publisher_resumes(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(30):
        broker = Broker(send_queue_size=20, stall_timeout=1.0)
        await nursery.start(broker.run)
        left: dict[str, str] = {}
        broker.on_peer_left = left.__setitem__
        stuck = trio.Event()
        errors: list[BaseException] = []

        async def never(msg: Chunk) -> None:
            await stuck.wait()

        recorder = Peer(broker.url, "recorder", receive_queue_size=5, reconnect=False)

        async def run_recorder(task_status: trio.TaskStatus[None]) -> None:
            try:
                await recorder.run(task_status=task_status)
            except BrokerLostError as exc:
                errors.append(exc)

        async with Peer(broker.url, "amp", send_timeout=20) as amp:
            await nursery.start(run_recorder)
            await recorder.subscribe_for_all_msg_subtype(Chunk, never, delivery="lossless")
            data = bytes(64 * 1024)  # far more than the sockets' buffers hold, in all
            for n in range(1000):  # waits while the recorder holds the publisher up
                await amp.send_message(Chunk(n=n, data=data))
            await amp._link.flush()  # the publisher resumed: all it sent was written
            assert "stall_timeout" in left["recorder"]  # the broker cut the stalled one
            await recorder.wait_finished()  # and the stuck peer gave its connection up
            assert "lossless" in str(errors[0])
            assert amp.is_running and broker.peer_ids == ["amp"]
        await broker.shutdown()


class Recorder(Peer):
    @subscribe(Sample, delivery="lossless")
    async def on_sample(self, msg: Sample) -> None:
        await trio.lowlevel.checkpoint()


async def test_delivery_is_checked_and_the_decorator_takes_it(broker: Broker) -> None:
    with trio.fail_after(10):
        with pytest.raises(PeerkitError, match="delivery must be one of"):
            subscribe(Sample, delivery="maybe")
        async with Recorder(broker.url, "r") as r:
            with pytest.raises(PeerkitError, match="delivery must be one of"):
                await r.subscribe_for_all_msg_subtype(Sample, print, delivery="sometimes")
            conn = broker._conns["r"]
            assert conn.delivery == {(Sample.message_type(), None): "lossless"}
