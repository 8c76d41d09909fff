"""Live state events: the broker publishes PeerJoined, PeerStateChanged and PeerLeft on
each peer's behalf; anyone can subscribe to them."""

from __future__ import annotations

import trio

from peerkit import Broker, CustomState, Message, Peer, PeerState
from peerkit.messages import PeerJoined, PeerLeft, PeerStateChanged

CALIBRATING = CustomState("calibrating", counts_as=PeerState.ready)


class Amp(Peer):
    _VALID_STATES_TRANSITIONS_ = {
        **Peer._VALID_STATES_TRANSITIONS_,
        PeerState.ready: (PeerState.running, PeerState.shutting_down, CALIBRATING),
        CALIBRATING: (PeerState.ready, PeerState.running, PeerState.shutting_down),
    }

    async def _start(self) -> None:
        self._state = CALIBRATING
        await trio.lowlevel.checkpoint()
        self._state = PeerState.ready


def describe(msg: Message) -> str:
    if isinstance(msg, PeerJoined):
        return f"{msg.sender} joined"
    if isinstance(msg, PeerStateChanged):
        assert msg.peer_id == msg.sender
        return f"{msg.sender} {msg.old}->{msg.new} ({msg.base})"
    assert isinstance(msg, PeerLeft)
    assert msg.peer_id == msg.sender
    return f"{msg.sender} left clean={msg.clean}"


async def test_a_peers_whole_life_in_order(broker: Broker) -> None:
    with trio.fail_after(10):
        seen: list[str] = []
        left = trio.Event()
        async with Peer(broker.url, "watcher") as watcher:

            def note(msg: Message) -> None:
                if msg.sender == "amp":
                    seen.append(describe(msg))
                    if isinstance(msg, PeerLeft):
                        left.set()

            for cls in (PeerJoined, PeerStateChanged, PeerLeft):
                await watcher.subscribe_for_all_msg_subtype(cls, note)
            async with Amp(broker.url, "amp") as amp:
                await amp.wait_for_state(lambda p: p.is_running, 5)
            await left.wait()
        assert seen == [
            "amp joined",
            "amp initializing->connected (connected)",
            "amp connected->ready (ready)",
            "amp ready->calibrating (ready)",
            "amp calibrating->ready (ready)",
            "amp ready->running (running)",
            "amp running->shutting_down (shutting_down)",
            "amp left clean=True",
        ]


async def test_events_of_one_peer_with_a_sender_filter(broker: Broker) -> None:
    """They are ordinary messages: subscribing for one sender's gets that peer's only."""
    with trio.fail_after(10):
        async with (
            Peer(broker.url, "watcher") as watcher,
            watcher.subscription(PeerStateChanged, sender="b") as stream,
            Peer(broker.url, "a"),
            Peer(broker.url, "b"),
        ):
            first = await stream.receive()
            assert (first.sender, first.new) == ("b", "connected")


async def test_broker_info_shows_the_state_and_its_base(broker: Broker) -> None:
    with trio.fail_after(10):
        async with Amp(broker.url, "amp", autostart=False) as amp, Peer(broker.url, "q") as q:
            await amp.wait_for_state(lambda p: p.is_ready, 5)
            amp._state = CALIBRATING
            while True:
                (info,) = [p for p in (await q.broker_info()).peers if p.peer_id == "amp"]
                if info.state == "calibrating":
                    break
            assert info.base == "ready"


async def test_broker_info_counts_traffic_per_type(broker: Broker) -> None:
    with trio.fail_after(10):
        from peerkit.messages import ErrorMsg, OkMsg

        async with Peer(broker.url, "pub") as pub, Peer(broker.url, "sub") as sub:
            got = trio.Event()
            n = 0

            def seen(msg: OkMsg) -> None:
                nonlocal n
                n += 1
                if n == 5:
                    got.set()

            await sub.subscribe_for_all_msg_subtype(OkMsg, seen)
            for _ in range(5):
                await pub.send_message(OkMsg(detail="x"))
            await got.wait()
            await sub.register_query_handler(ErrorMsg, lambda q: OkMsg(detail="fine"))
            for _ in range(3):
                await pub.query(ErrorMsg(code="c", details="d"))
            types = {t.msg_type: t for t in (await pub.broker_info()).types}
            ok = types[OkMsg.message_type()]
            assert (ok.published, ok.routed) == (5, 5)
            asked = types[ErrorMsg.message_type()]
            assert (asked.queries, asked.answered) == (3, 3) and asked.answer_ms > 0
