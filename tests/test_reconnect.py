"""Reconnect and resume: a peer that loses its broker comes back under the same id."""

from __future__ import annotations

import contextlib
import logging

import pytest
import trio
import trio_websocket

from peerkit import (
    Broker,
    BrokerLostError,
    DuplicatePeerId,
    Message,
    Peer,
    PeerkitError,
    codec,
    message,
)
from peerkit.codec import control
from peerkit.protocol import PROTOCOL_VERSION, Hello, Kind, Reject, Welcome
from peerkit.testing import wait_for_condition


@message(type="reconnect.Tick")
class Tick(Message):
    n: int


@message(type="reconnect.Ask")
class Ask(Message):
    n: int


@message(type="reconnect.Answer")
class Answer(Message):
    n: int


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="peerkit")


class Restartable:
    """A broker on a fixed (free) port that can vanish abruptly and come back."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.port = 0
        self.broker: Broker | None = None
        self._scope: trio.CancelScope | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> Broker:
        broker = Broker(port=self.port, heartbeat_interval=0.5, heartbeat_timeout=2)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await broker.run(task_status=task_status)

        await self.nursery.start(run)
        self.port, self.broker, self._scope = broker.port, broker, scope
        return broker

    def vanish(self) -> None:
        """No shutdown notice: every connection just drops."""
        assert self._scope is not None
        self._scope.cancel()


async def run_to_the_end(peer: Peer, *, task_status: trio.TaskStatus[None]) -> None:
    """Run ``peer`` in a nursery that outlives its error (``peer.error`` keeps it)."""
    with contextlib.suppress(BrokerLostError):
        await peer.run(task_status=task_status)


class Recorder(Peer):
    """Counts its reconnections through the hook."""

    hooked = 0

    async def _reconnected(self) -> None:
        self.hooked += 1
        await trio.lowlevel.checkpoint()


async def test_peers_ride_out_a_broker_restart(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        home = Restartable(nursery)
        await home.start()
        sub = Recorder(home.url, "sub")
        handler = Peer(home.url, "handler")
        asker = Peer(home.url, "asker")
        for p in (sub, handler, asker):
            await nursery.start(p.run)
        got: list[int] = []
        arrived = trio.Event()

        def on_tick(msg: Tick) -> None:
            got.append(msg.n)
            arrived.set()

        await sub.subscribe_for_all_msg_subtype(Tick, on_tick)
        release = trio.Event()

        async def slow_answer(q: Ask) -> Answer:
            await release.wait()
            return Answer(n=q.n)

        await handler.register_query_handler(Ask, slow_answer)
        for p in (sub, handler, asker):
            await p.wait_for_state(lambda p: p.is_running, 5)

        outcomes: list[BaseException | Message] = []

        async def ask_once() -> None:
            try:
                outcomes.append(await asker.query(Ask(n=1), timeout=20))
            except BrokerLostError as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as waiting:
            waiting.start_soon(ask_once)
            await trio.testing.wait_all_tasks_blocked()
            home.vanish()  # the pending query fails once, at once
        (outcome,) = outcomes
        assert isinstance(outcome, BrokerLostError)
        assert not sub.link_up
        with pytest.raises(BrokerLostError, match="reconnecting"):
            await asker.query(Ask(n=2), timeout=5)  # new queries fail fast while down
        sent_before = asker.msgs_out
        await asker.send_message(Tick(n=1))  # queued meanwhile, written once back

        await home.start()  # same port
        for p in (sub, handler, asker):
            await wait_for_condition(lambda p=p: p.reconnects >= 1, 10)
        assert sub.link_up and sub.hooked == 1
        for p in (sub, handler, asker):
            assert p.is_running and p.error is None  # the lifecycle did not move
        # what was queued while down went out once back (a subscriber gets it if it is
        # subscribed again by the time it reaches the broker: here, maybe not)
        await wait_for_condition(lambda: asker.msgs_out == sent_before + 1)
        # subscriptions and query handlers were restored
        await asker.send_message(Tick(n=2))
        await arrived.wait()
        release.set()
        answer = await asker.query(Ask(n=3), timeout=5)
        assert isinstance(answer, Answer) and answer.n == 3
        await wait_for_condition(lambda: got[-1:] == [2])
        assert got in ([2], [1, 2])
        assert sorted(home.broker.peer_ids) == ["asker", "handler", "sub"]  # type: ignore[union-attr]
        for p in (sub, handler, asker):
            await p.async_shutdown()
            assert p.error is None


async def test_the_broker_lets_only_the_peer_itself_replace_its_connection(
    broker: Broker,
) -> None:
    """While a peer is connected, its id is refused to anyone without its resume token;
    the token (from its welcome) replaces the old connection."""
    with trio.fail_after(10):

        async def hello(token: str) -> tuple[int, Message]:
            ws = await trio_websocket.connect_websocket_url(nursery, broker.url)
            hello = Hello(peer_id="p", protocol_version=PROTOCOL_VERSION, resume_token=token)
            await ws.send_message(control(Kind.HELLO, hello))
            (env, *_) = codec.iter_envelopes(await ws.get_message())  # type: ignore[arg-type]
            cls = Welcome if env.kind == Kind.WELCOME else Reject
            return env.kind, codec.decode_body(cls, env.body)

        async with trio.open_nursery() as nursery:
            kind, welcome = await hello("")
            assert kind == Kind.WELCOME and isinstance(welcome, Welcome)
            assert len(welcome.resume_token) >= 16
            for token in ("", "guess", welcome.resume_token[:-1] + "x"):
                kind, reject = await hello(token)
                assert kind == Kind.REJECT and isinstance(reject, Reject)
                assert reject.reason == "duplicate_id"
            with pytest.raises(DuplicatePeerId):
                async with Peer(broker.url, "p", reconnect=False):
                    pass  # pragma: no cover
            kind, _again = await hello(welcome.resume_token)
            assert kind == Kind.WELCOME  # the same peer, back: it replaced the old connection
            assert broker.peer_ids == ["p"]
            nursery.cancel_scope.cancel()


async def test_without_reconnect_the_first_loss_fails_the_peer(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        home = Restartable(nursery)
        await home.start()
        peer = Peer(home.url, "p", reconnect=False)
        await nursery.start(run_to_the_end, peer)
        home.vanish()
        await peer.wait_finished()
        assert isinstance(peer.error, BrokerLostError)
        assert peer.reconnects == 0


async def test_giving_up_after_reconnect_timeout(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(120):
        home = Restartable(nursery)
        await home.start()
        peer = Peer(home.url, "p", reconnect_timeout=7)
        await nursery.start(run_to_the_end, peer)
        home.vanish()
        start = trio.current_time()
        await peer.wait_finished()
        assert isinstance(peer.error, BrokerLostError)
        assert "could not reconnect" in str(peer.error)
        assert "reconnect_timeout=7" in str(peer.error)
        assert 7 <= trio.current_time() - start < 12


async def test_a_peer_whose_connection_drops_comes_back(broker: Broker) -> None:
    """The peer's own connection breaks (the broker sees it go): it comes back under its
    id, and what it publishes reaches its subscribers again."""
    with trio.fail_after(20):
        async with (
            Peer(broker.url, "watcher") as watcher,
            watcher.subscription(Tick) as ticks,
            Peer(broker.url, "p") as peer,
        ):
            await peer._link.abort()
            await wait_for_condition(lambda: peer.reconnects >= 1, 10)
            await peer.send_message(Tick(n=5))
            assert (await ticks.receive()).n == 5
            assert broker.peer_ids == ["p", "watcher"]
            assert peer.is_running


async def test_messages_sent_while_down_overflow_is_counted(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        home = Restartable(nursery)
        await home.start()
        peer = Peer(home.url, "p", send_queue_size=5)
        await nursery.start(peer.run)
        home.vanish()
        await wait_for_condition(lambda: not peer.link_up)
        for i in range(8):
            await peer.send_message(Tick(n=i))
        assert peer.unsent_dropped == 3
        await peer.async_shutdown()


async def test_a_silent_peer_is_closed_with_going_away_so_it_may_come_back(
    nursery: trio.Nursery,
) -> None:
    """A peer the broker gives up for silence (asleep, stopped) is told 1001, which a
    peer treats as a lost connection (it reconnects), not as a refusal (1008)."""
    with trio.fail_after(20):
        broker = Broker(heartbeat_interval=0.2, heartbeat_timeout=0.6)
        await nursery.start(broker.run)
        async with trio_websocket.open_websocket_url(broker.url) as ws:
            hello = Hello(peer_id="sleeper", protocol_version=PROTOCOL_VERSION)
            await ws.send_message(control(Kind.HELLO, hello))
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                while True:
                    await ws.get_message()
            reason = info.value.reason
            assert reason is not None and reason.code == 1001
            assert "no heartbeat" in (reason.reason or "")


def test_an_attribute_hiding_a_peer_method_is_refused() -> None:
    with pytest.raises(PeerkitError, match=r"Counter\.run = 0 hides the method Peer\.run"):

        class Counter(Peer):
            run = 0  # type: ignore[assignment]
