"""The synchronous bridge, from plain (non-trio) test functions: a broker in its own thread
(SyncBroker), peers in theirs (SyncPeer); send, query, subscriptions in both handler modes,
errors, timeouts and closing without leaking a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import trio

from peerkit import Message, Peer, PeerkitError, ShuttingDownException, message
from peerkit.errors import DuplicatePeerId, NoHandlerError, QueryTimeout, RemoteError
from peerkit.peer import query_handler
from peerkit.sync import BridgeTimeout, SyncBroker, SyncPeer

#: a bound on every wait in these tests
WAIT = 10.0


@message(type="ts.Reading")
class Reading(Message):
    value: float


@message(type="ts.Echo")
class Echo(Message):
    n: int


@message(type="ts.Marker")
class Marker(Message):
    pass


@message(type="ts.Ask")
class Ask(Message):
    x: int


@message(type="ts.Answer")
class Answer(Message):
    y: int


@message(type="ts.Unhandled")
class Unhandled(Message):
    pass


class Doubler(Peer):
    @query_handler(Ask)
    async def answer(self, msg: Ask) -> Answer:
        if msg.x < 0:
            raise ValueError(f"cannot double a negative number ({msg.x})")
        if msg.x == 999:
            await trio.sleep(WAIT * 3)  # cancelled by the peer's shutdown
        return Answer(y=2 * msg.x)


def peerkit_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("peerkit ")]


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    assert peerkit_threads() == []
    yield
    assert peerkit_threads() == []


@pytest.fixture
def sync_broker() -> Iterator[SyncBroker]:
    with SyncBroker(timeout=WAIT) as broker:
        yield broker


def collect(peer: SyncPeer, count: int) -> None:
    """poll() until ``count`` handlers ran, each wait bounded."""
    ran = 0
    while ran < count:
        got = peer.poll(timeout=WAIT)
        assert got, f"no message within {WAIT} s ({ran} of {count})"
        ran += got


# ------------------------------------------------------------------ broker and lifecycle


def test_sync_broker_runs_in_its_own_thread() -> None:
    broker = SyncBroker(timeout=WAIT)
    assert not broker.running
    with broker:
        assert broker.running
        assert broker.url.startswith("ws://127.0.0.1:")
        assert [t.name for t in peerkit_threads()] == ["peerkit SyncBroker"]
        assert broker.broker.info().peers == []
    assert not broker.running
    assert peerkit_threads() == []
    broker.close()  # idempotent


def test_start_close_and_context_manager(sync_broker: SyncBroker) -> None:
    peer = SyncPeer(sync_broker.url, "plain", timeout=WAIT)
    assert peer.start() is peer
    assert peer.running and peer.peer.is_connected
    assert "peerkit SyncPeer 'plain'" in [t.name for t in peerkit_threads()]
    peer.close()
    assert peer.peer.is_finished and peer.error is None
    assert not peer.running
    peer.close()
    with pytest.raises(ShuttingDownException, match="is closed"):
        peer.send_message(Reading(value=1))
    with pytest.raises(ShuttingDownException, match="is closed; create a new one"):
        peer.start()

    with SyncPeer(sync_broker.url, "ctx", timeout=WAIT) as ctx:
        assert ctx.peer.is_connected
    assert ctx.peer.is_finished


def test_misuse_is_refused_with_the_fix(sync_broker: SyncBroker) -> None:
    peer = SyncPeer(sync_broker.url, "early", timeout=WAIT)
    with pytest.raises(PeerkitError, match=r"call start\(\) first"):
        peer.send_message(Reading(value=1))
    with pytest.raises(PeerkitError, match="handlers='poll'"):
        peer.poll()
    with pytest.raises(PeerkitError, match="handlers must be 'bridge'"):
        SyncPeer(sync_broker.url, handlers="gui")  # type: ignore[arg-type]
    with pytest.raises(PeerkitError, match="peer_class must be Peer"):
        SyncPeer(sync_broker.url, peer_class=dict)  # type: ignore[arg-type]
    with pytest.raises(PeerkitError, match="timeout must be a positive number"):
        SyncPeer(sync_broker.url, timeout=0)
    with peer:
        with pytest.raises(PeerkitError, match="already started"):
            peer.start()

        async def async_handler(msg: Reading) -> None:
            pass

        with pytest.raises(PeerkitError, match="is async; a SyncPeer's handlers are plain"):
            peer.subscribe(Reading, async_handler)
        with pytest.raises(PeerkitError, match="cannot be called with the message alone"):
            peer.subscribe(Reading, lambda: None)  # type: ignore[arg-type,misc]


def test_start_fails_without_a_broker() -> None:
    with socket.socket() as sock:  # a free port, then nobody listening on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    peer = SyncPeer(f"ws://127.0.0.1:{port}", "lonely", connect_timeout=0.5, timeout=WAIT)
    with pytest.raises(PeerkitError, match=r"127\.0\.0\.1"):
        peer.start()
    assert not peer.running
    peer.close()  # the error was raised by start(): not again


def test_start_reports_a_duplicate_id(sync_broker: SyncBroker) -> None:
    with SyncPeer(sync_broker.url, "twin", timeout=WAIT), pytest.raises(DuplicatePeerId):
        SyncPeer(sync_broker.url, "twin", timeout=WAIT).start()


def test_start_timeout() -> None:
    """The deliberate break of a start: a broker that never answers the handshake."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        peer = SyncPeer(f"ws://127.0.0.1:{port}", "stuck", timeout=WAIT)
        with pytest.raises(BridgeTimeout, match=r"was not up within 0\.3 s"):
            peer.start(timeout=0.3)
        assert not peer.running


# ------------------------------------------------------------------ messages


def test_send_and_subscribe_with_poll(sync_broker: SyncBroker) -> None:
    woken = threading.Event()
    with (
        SyncPeer(sync_broker.url, "gui", handlers="poll", wakeup=woken.set, timeout=WAIT) as gui,
        SyncPeer(sync_broker.url, "sensor", timeout=WAIT) as sensor,
    ):
        got: list[tuple[float, str, threading.Thread]] = []
        gui.subscribe(
            Reading, lambda m: got.append((m.value, m.sender, threading.current_thread()))
        )
        assert gui.poll() == 0
        for value in (1.5, 2.5, 3.5):
            sensor.send_message(Reading(value=value))
        assert woken.wait(WAIT)
        collect(gui, 3)
        me = threading.current_thread()
        assert got == [(1.5, "sensor", me), (2.5, "sensor", me), (3.5, "sensor", me)]
        assert gui.dropped_messages == 0

        # max_messages, and messages from one sender only
        gui.subscribe(Echo, lambda m: got.append((m.n, m.sender, me)), sender="gui")
        sensor.send_message(Echo(n=1))  # not from gui: not for this subscription
        sensor.send_message(Reading(value=4.5))
        sensor.send_message(Reading(value=5.5))
        assert gui.poll(timeout=WAIT, max_messages=1) == 1
        collect(gui, 1)
        assert [v for v, _, _ in got[3:]] == [4.5, 5.5]


def test_unsubscribe(sync_broker: SyncBroker) -> None:
    with (
        SyncPeer(sync_broker.url, "gui", handlers="poll", timeout=WAIT) as gui,
        SyncPeer(sync_broker.url, "sensor", timeout=WAIT) as sensor,
    ):
        got: list[str] = []

        def on_reading(m: Reading) -> None:
            got.append("reading")

        gui.subscribe(Reading, on_reading)
        gui.subscribe(Marker, lambda m: got.append("marker"))
        assert gui.unsubscribe(Reading, on_reading) == 1
        assert gui.unsubscribe(Reading, on_reading) == 0
        sensor.send_message(Reading(value=1))
        sensor.send_message(Marker())  # after the reading, from the same sender
        collect(gui, 1)
        assert got == ["marker"]


def test_bridge_handlers_run_in_the_bridge_thread_and_may_send(sync_broker: SyncBroker) -> None:
    with (
        SyncPeer(sync_broker.url, "echoer", timeout=WAIT) as echoer,
        SyncPeer(sync_broker.url, "source", handlers="poll", timeout=WAIT) as source,
    ):
        threads: set[threading.Thread] = set()

        def echo(msg: Reading) -> None:
            threads.add(threading.current_thread())
            echoer.send_message(Echo(n=int(msg.value)))  # queued, in order

        echoer.subscribe(Reading, echo)
        echoes: list[int] = []
        source.subscribe(Echo, lambda m: echoes.append(m.n))
        for n in range(50):
            source.send_message(Reading(value=n))
        collect(source, 50)
        assert echoes == list(range(50))
        assert [t.name for t in threads] == ["peerkit SyncPeer 'echoer'"]
        assert echoer.send_errors == 0


def test_blocking_calls_from_a_bridge_handler_are_refused(sync_broker: SyncBroker) -> None:
    with (
        SyncPeer(sync_broker.url, "a", timeout=WAIT) as a,
        SyncPeer(sync_broker.url, "b", timeout=WAIT) as b,
    ):
        refused: list[str] = []
        done = threading.Event()

        def handler(msg: Reading) -> None:
            try:
                a.query(Ask(x=1))
            except PeerkitError as exc:
                refused.append(str(exc))
            done.set()

        a.subscribe(Reading, handler)
        b.send_message(Reading(value=1))
        assert done.wait(WAIT)
        assert len(refused) == 1
        assert "would wait for itself; use handlers='poll'" in refused[0]
        assert a.peer.is_connected


def test_poll_queue_full_drops_and_counts(sync_broker: SyncBroker) -> None:
    with (
        SyncPeer(sync_broker.url, "slow", handlers="poll", poll_queue_size=2, timeout=WAIT) as slow,
        SyncPeer(sync_broker.url, "fast", timeout=WAIT) as fast,
    ):
        seen: list[float] = []
        slow.subscribe(Reading, lambda m: seen.append(m.value))
        marker = threading.Event()
        # a handler run in the bridge's thread: when the marker arrives, every reading sent
        # before it has been queued or dropped
        slow.call(slow.peer.subscribe_for_all_msg_subtype, Marker, lambda m: marker.set())
        for value in range(5):
            fast.send_message(Reading(value=value))
        fast.send_message(Marker())
        assert marker.wait(WAIT)
        assert slow.dropped_messages == 3
        assert slow.poll() == 2
        assert seen == [0, 1]


# ------------------------------------------------------------------ queries


def test_query_and_ask_peer(sync_broker: SyncBroker) -> None:
    with (
        SyncPeer(sync_broker.url, "doubler", peer_class=Doubler, timeout=WAIT) as doubler,
        SyncPeer(sync_broker.url, "asker", timeout=WAIT) as asker,
    ):
        assert isinstance(doubler.peer, Doubler)
        assert asker.query(Ask(x=21)) == Answer(sender="doubler", y=42)
        assert asker.ask_peer("doubler", Ask(x=2), timeout=WAIT) == Answer(sender="doubler", y=4)
        with pytest.raises(RemoteError, match="cannot double a negative number") as info:
            asker.query(Ask(x=-1))
        assert info.value.error_type == "ValueError"
        with pytest.raises(NoHandlerError):
            asker.query(Unhandled())
        with pytest.raises(QueryTimeout):
            asker.query(Ask(x=999), timeout=0.3)


def test_call_reaches_the_rest_of_the_peer(sync_broker: SyncBroker) -> None:
    with (
        SyncPeer(sync_broker.url, "answerer", timeout=WAIT) as answerer,
        SyncPeer(sync_broker.url, "asker", timeout=WAIT) as asker,
    ):
        answerer.call(answerer.peer.register_query_handler, Ask, lambda m: Answer(y=m.x + 1))
        assert asker.query(Ask(x=1)) == Answer(sender="answerer", y=2)
        info = asker.call(asker.peer.broker_info)
        assert sorted(p.peer_id for p in info.peers) == ["answerer", "asker"]


# ------------------------------------------------------------------ errors and timeouts


def test_a_handler_error_kills_the_peer_and_reaches_the_caller(sync_broker: SyncBroker) -> None:
    with SyncPeer(sync_broker.url, "sender", timeout=WAIT) as sender:
        fragile = SyncPeer(sync_broker.url, "fragile", timeout=WAIT).start()

        def handler(msg: Reading) -> None:
            raise ValueError(f"bad reading {msg.value}")

        fragile.subscribe(Reading, handler)
        sender.send_message(Reading(value=13))
        assert fragile.wait_finished(WAIT)
        assert isinstance(fragile.error, ValueError)
        with pytest.raises(ValueError, match="bad reading 13"):
            fragile.send_message(Reading(value=1))
        with pytest.raises(ValueError, match="bad reading 13"):
            fragile.close()
        fragile.close()  # raised once


def test_the_with_block_raises_the_error_that_killed_the_peer(sync_broker: SyncBroker) -> None:
    def handler(msg: Echo) -> None:
        raise ValueError(f"bad echo {msg.n}")

    with (
        SyncPeer(sync_broker.url, "sender", timeout=WAIT) as sender,
        pytest.raises(ValueError, match="bad echo 1"),
        SyncPeer(sync_broker.url, "fragile", timeout=WAIT) as fragile,
    ):
        fragile.subscribe(Echo, handler)
        sender.send_message(Echo(n=1))
        assert fragile.wait_finished(WAIT)


def test_a_poll_handler_error_comes_out_of_poll(sync_broker: SyncBroker) -> None:
    with (
        SyncPeer(sync_broker.url, "gui", handlers="poll", timeout=WAIT) as gui,
        SyncPeer(sync_broker.url, "sensor", timeout=WAIT) as sensor,
    ):
        seen: list[float] = []

        def handler(msg: Reading) -> None:
            if msg.value < 0:
                raise ValueError("negative reading")
            seen.append(msg.value)

        gui.subscribe(Reading, handler)
        for value in (-1, 2):
            sensor.send_message(Reading(value=value))
        with pytest.raises(ValueError, match="negative reading"):
            collect(gui, 2)
        collect(gui, 1)  # the next message is still there, and the peer lives
        assert seen == [2]
        assert gui.peer.is_connected


def test_poll_raises_the_error_once_the_peer_died(sync_broker: SyncBroker) -> None:
    with SyncPeer(sync_broker.url, "controller", timeout=WAIT) as controller:
        gui = SyncPeer(sync_broker.url, "gui", handlers="poll", timeout=WAIT).start()
        controller.call(controller.peer.ask_peer, "gui", _close_gui())
        assert gui.wait_finished(WAIT)
        started = time.monotonic()
        assert gui.poll(timeout=WAIT) == 0  # closed cleanly: nothing to raise
        assert time.monotonic() - started < WAIT / 2  # and woken at once, not at the timeout
        gui.close()


def _close_gui() -> Message:
    from peerkit.messages import PeerControlMessage

    return PeerControlMessage(peer_id="gui", action="close")


def test_every_call_is_bounded_even_when_the_bridge_is_blocked(sync_broker: SyncBroker) -> None:
    with (
        SyncPeer(sync_broker.url, "blocked", timeout=WAIT) as blocked,
        SyncPeer(sync_broker.url, "sensor", timeout=WAIT) as sensor,
    ):
        entered = threading.Event()
        release = threading.Event()

        def handler(msg: Reading) -> None:  # blocks the bridge's trio loop: a mistake
            entered.set()
            release.wait(WAIT)

        blocked.subscribe(Reading, handler)
        sensor.send_message(Reading(value=1))
        assert entered.wait(WAIT)
        with pytest.raises(BridgeTimeout, match=r"did not finish within 0\.2 s"):
            blocked.send_message(Reading(value=2), timeout=0.2)
        release.set()
        blocked.send_message(Reading(value=3))  # works again


def test_close_timeout_when_a_handler_never_returns(sync_broker: SyncBroker) -> None:
    sensor = SyncPeer(sync_broker.url, "sensor", timeout=WAIT).start()
    stuck = SyncPeer(sync_broker.url, "stuck", timeout=WAIT, grace_period=0.2).start()
    entered = threading.Event()
    release = threading.Event()
    stuck.subscribe(Reading, lambda m: (entered.set(), release.wait(WAIT)))
    sensor.send_message(Reading(value=1))
    assert entered.wait(WAIT)
    with pytest.raises(BridgeTimeout, match=r"did not end within 0\.3 s of close"):
        stuck.close(timeout=0.3)
    release.set()
    assert stuck.wait_finished(WAIT)
    stuck.close()
    sensor.close()
