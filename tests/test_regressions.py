"""Regression tests for defects found in a review of the core runtime: startup failures,
shutdown during startup, control messages racing the lifecycle, cancelled requests, concurrent
subscriptions, broker errors and disconnect reasons.

No test waits on the clock for something to happen: slow steps are gates the test opens, and
"the broker has processed what this peer sent" is a round trip through the broker (it handles
one connection's frames in order), so a later answer proves the earlier frames were handled.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import pytest
import trio
import trio.testing

from peerkit import (
    Broker,
    Message,
    Peer,
    PeerkitError,
    ShuttingDownException,
    message,
)
from peerkit.errors import InvalidStateTransition
from peerkit.messages import OkMsg, PeerControlMessage
from peerkit.peer import query_handler


@message
class ReviewQ(Message):
    n: int


@message
class ReviewN(Message):
    n: int


class _DeclaresHandler(Peer):
    @query_handler(ReviewQ)
    def answer(self, msg: ReviewQ) -> OkMsg:
        return OkMsg(detail=self.peer_id)


class _SlowReady(Peer):
    """Stays connected, not ready, until the test opens ``gate``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = trio.Event()

    async def _connections_established(self) -> None:
        await self.gate.wait()


class _SlowStart(Peer):
    """Its ``_start`` sets ``entered``, then waits until the test opens ``gate``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered = trio.Event()
        self.gate = trio.Event()

    async def _start(self) -> None:
        self.entered.set()
        await self.gate.wait()


async def _run_quietly(
    peer: Peer, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with contextlib.suppress(PeerkitError):
        await peer.run(task_status=task_status)


async def test_review_startup_failure_leaves_zombie_connection(broker: Broker) -> None:
    with trio.fail_after(10):
        second_left = trio.Event()
        broker.on_peer_left = lambda pid, reason: pid == "second" and second_left.set()
        async with trio.open_nursery() as n:
            first = _DeclaresHandler(broker.url, "first")
            await n.start(first.run)
            second = _DeclaresHandler(broker.url, "second")
            with pytest.raises(PeerkitError):
                await n.start(second.run)
            await second_left.wait()  # a zombie connection never leaves: fail_after says so
            # the failed peer must be gone from the broker: its id is free again
            assert "second" not in broker.peer_ids, "zombie connection"
            assert second.error is not None  # run() raised, but peer.error stays None
            again = Peer(broker.url, "second")
            await n.start(again.run)  # DuplicatePeerId today
            await again.async_shutdown()
            await first.async_shutdown()


async def test_review_shutdown_during_startup_is_not_runtimeerror(broker: Broker) -> None:
    with trio.fail_after(10):
        peer = Peer(broker.url, "p")

        async def shut_down_soon() -> None:
            while not peer._run_started:
                await trio.lowlevel.checkpoint()
            await peer.async_shutdown()

        async with trio.open_nursery() as n:
            n.start_soon(shut_down_soon)
            with contextlib.suppress(ShuttingDownException):
                await n.start(peer.run)
        assert peer.is_finished


async def test_review_control_start_during_startup_kills_peer(broker: Broker) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            ctl = Peer(broker.url, "ctl")
            await n.start(ctl.run)
            peer = _SlowReady(broker.url, "p", autostart=False)
            await n.start(_run_quietly, peer)  # started once subscribed, still not ready
            handled = trio.Event()
            await peer.subscribe_for_all_msg_subtype(ReviewN, lambda m: handled.set())
            await ctl.send_message(PeerControlMessage(peer_id="p", action="start"))
            await ctl.send_message(ReviewN(n=0))
            # handlers run one at a time in arrival order: the control message was handled
            await handled.wait()
            assert peer.error is None, peer.error
            assert not peer.is_ready
            peer.gate.set()
            # the start asked for while getting ready applies once ready
            await peer.wait_for_state(lambda p: p.is_running, 5)
            assert peer.error is None, peer.error
            await peer.async_shutdown()
            await ctl.async_shutdown()


async def test_review_control_stop_query_gets_no_answer(broker: Broker) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            ctl = Peer(broker.url, "ctl")
            await n.start(ctl.run)
            peer = Peer(broker.url, "p")
            await n.start(peer.run)
            await peer.wait_for_state(lambda p: p.is_running, 5)
            reply = await ctl.ask_peer("p", PeerControlMessage(peer_id="p", action="stop"))
            assert isinstance(reply, OkMsg)
            await ctl.async_shutdown()


async def test_review_cancelled_register_leaves_broker_registration(broker: Broker) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            a = Peer(broker.url, "a")
            await n.start(a.run)
            with trio.move_on_after(0):
                await a.register_query_handler(ReviewQ, lambda m: OkMsg(detail="a"))
            await a.broker_info()  # the broker has handled what `a` sent before
            at_broker = ReviewQ.message_type() in broker.routing.handlers_of("a")
            locally = ReviewQ.message_type() in a._queries.types
            assert at_broker == locally, (at_broker, locally)
            await a.async_shutdown()


async def test_review_cancelled_subscribe_leaves_broker_subscription(broker: Broker) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            a = Peer(broker.url, "a")
            await n.start(a.run)
            with trio.move_on_after(0):
                await a.subscribe_for_all_msg_subtype(ReviewN, lambda m: None)
            await a.broker_info()  # the broker has handled what `a` sent before
            assert broker.routing.subscriptions_of("a") == ["PeerControlMessage"]
            await a.async_shutdown()


async def test_review_concurrent_subscribe_returns_early(broker: Broker) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            a = Peer(broker.url, "a")
            await n.start(a.run)
            n.start_soon(a.subscribe_for_all_msg_subtype, ReviewN, lambda m: None)
            await trio.lowlevel.checkpoint()
            await a.subscribe_for_all_msg_subtype(ReviewN, lambda m: None)
            assert broker.routing.subscribers(ReviewN.message_type(), "x") == ("a",)
            await a.async_shutdown()


async def test_review_broker_bind_failure_is_a_group(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        try:
            with pytest.raises(OSError):
                await nursery.start(Broker(port=port).run)
            with pytest.raises(OSError):
                async with Broker(port=port):
                    pass  # pragma: no cover
        finally:
            busy.close()


async def test_review_run_after_early_shutdown(broker: Broker) -> None:
    with trio.fail_after(10):
        peer = Peer(broker.url, "p")
        await peer.async_shutdown()
        with pytest.raises(PeerkitError) as info:
            await peer.run()
        assert not isinstance(info.value, InvalidStateTransition)
        # a hello sent on loopback is readable at once: had run() sent one, the broker's
        # handler would have taken it in before every task is blocked again
        await trio.testing.wait_all_tasks_blocked()
        assert "p" not in broker.peer_ids


async def test_review_stop_during_start_is_lost(broker: Broker) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            peer = _SlowStart(broker.url, "p", autostart=False, autoshutdown=False)
            await n.start(peer.run)
            await peer.wait_for_state(lambda p: p.is_ready, 5)
            async with trio.open_nursery() as calls:
                calls.start_soon(peer.start)
                await peer.entered.wait()  # start() is inside _start
                calls.start_soon(peer.stop)
                await trio.testing.wait_all_tasks_blocked()  # stop() waits or is done
                peer.gate.set()
            # start() and stop() have both returned: the stop was not lost
            assert not peer.is_running
            await peer.async_shutdown()


async def test_review_overflow_disconnect_is_reported_misleadingly(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        broker = Broker(send_queue_size=2, overflow="disconnect")
        await nursery.start(broker.run)
        left: list[tuple[str, str]] = []
        broker.on_peer_left = lambda pid, reason: left.append((pid, reason))
        async with trio.open_nursery() as n:
            pub = Peer(broker.url, "pub")
            await n.start(pub.run)
            sub = Peer(broker.url, "sub")
            n.start_soon(_run_quietly, sub)
            await sub.wait_for_state(lambda p: p.is_connected, 5)
            await sub.subscribe_for_all_msg_subtype(ReviewN, lambda m: None)
            for i in range(50):  # one batched frame overflows a queue of 2
                await pub.send_message(ReviewN(n=i))
            await sub.wait_finished()
            await pub.async_shutdown()
        await broker.shutdown()
        assert "overflow" in str(sub.error), sub.error
        assert any(pid == "sub" and "overflow" in reason for pid, reason in left), left
