"""The broker's limits: no connection can stall the broker, get another peer disconnected, or
grow what the broker holds without bound (issue 12)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.lowlevel
import trio_websocket

from peerkit import (
    Broker,
    BrokerBusyError,
    BrokerRequestError,
    HandshakeRejected,
    Message,
    Peer,
    PeerkitError,
    QueryAnswerUnknown,
    QueryTimeout,
    ShuttingDownException,
    codec,
    message,
)
from peerkit._dispatch import Dispatcher
from peerkit._limits import Limits, TokenBucket, fit_bytes
from peerkit.codec import Envelope, control, pack_envelope
from peerkit.messages import MessagesDropped
from peerkit.protocol import (
    PROTOCOL_VERSION,
    BrokerInfo,
    Hello,
    Kind,
    PeerInfo,
    QueryFailed,
    RegisterHandler,
    Reject,
    RequestFailed,
    SubscribeOptions,
)
from peerkit.routing import RoutingTable
from peerkit.testing import wait_for_condition


@message(type="test_limits.Blob")
class Blob(Message):
    data: bytes


@message(type="test_limits.Ask")
class Ask(Message):
    n: int


@message(type="test_limits.Answer")
class Answer(Message):
    n: int


@message(type="test_limits.Tick")
class Tick(Message):
    seq: int


@message(type="L" * 300)
class LongName(Message):
    pass


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="peerkit")


# ----------------------------------------------------------------------------- helpers


@asynccontextmanager
async def raw(
    url: str, peer_id: str | None = None, *, queue: int = 64
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A bare WebSocket client; says hello first if ``peer_id`` is given. ``queue``: the
    WebSocket messages its library may hold unread (1 for a client that stops reading)."""
    async with trio_websocket.open_websocket_url(
        url,
        max_message_size=64 << 20,
        connect_timeout=5,
        disconnect_timeout=5,
        message_queue_size=queue,
    ) as ws:
        if peer_id is not None:
            await ws.send_message(
                control(Kind.HELLO, Hello(peer_id=peer_id, protocol_version=PROTOCOL_VERSION))
            )
            (env,) = codec.iter_envelopes(await ws.get_message())  # type: ignore[arg-type]
            assert env.kind == Kind.WELCOME
        yield ws


async def envelopes(ws: trio_websocket.WebSocketConnection) -> list[codec.Envelope]:
    return list(codec.iter_envelopes(await ws.get_message()))  # type: ignore[arg-type]


async def next_envelope(ws: trio_websocket.WebSocketConnection, kind: Kind) -> codec.Envelope:
    while True:
        for env in await envelopes(ws):
            if env.kind == kind:
                return env


def failure_of(env: codec.Envelope) -> RequestFailed:
    failure = codec.decode_body(RequestFailed, env.body)
    assert isinstance(failure, RequestFailed)
    return failure


def query_failure(env: codec.Envelope) -> QueryFailed:
    failure = codec.decode_body(QueryFailed, env.body)
    assert isinstance(failure, QueryFailed)
    return failure


def peer_info(broker: Broker, peer_id: str) -> PeerInfo:
    (info,) = [p for p in broker.info().peers if p.peer_id == peer_id]
    return info


def record_leaves(broker: Broker) -> list[tuple[str, str]]:
    left: list[tuple[str, str]] = []
    broker.on_peer_left = lambda pid, reason: left.append((pid, reason))
    return left


async def register_raw_handler(ws: trio_websocket.WebSocketConnection, msg_type: str) -> None:
    body = codec.encode_body(RegisterHandler(msg_type=msg_type))
    await ws.send_message(pack_envelope(int(Kind.REG), "", "", 1, "", body))
    assert (await next_envelope(ws, Kind.ACK)).corr == 1


# --------------------------------------------------- 1. no frame monopolises the broker


async def test_a_flood_of_info_requests_starves_nobody(nursery: trio.Nursery) -> None:
    """Frames of 50,000 info requests: the two well-behaved peers keep publishing and
    querying and nobody is dropped for silence (the peers give the broker up, and the
    broker them, after 1 s without a word); every request gets exactly one answer, most of
    them ``busy`` (rate limit), and the flooder, which reads its answers, keeps its
    connection too."""
    frames, per_frame = 4, 50_000
    flood = [
        b"".join(
            pack_envelope(int(Kind.INFO), "", "", f * per_frame + i + 1) for i in range(per_frame)
        )
        for f in range(frames)
    ]
    with trio.fail_after(60):
        broker = Broker(heartbeat_interval=0.2, heartbeat_timeout=1.0, info_rate=50)
        await nursery.start(broker.run)
        left = record_leaves(broker)
        answers: Counter[int] = Counter()
        kinds: Counter[int] = Counter()
        async with (
            Peer(broker.url, "pub") as pub,
            Peer(broker.url, "sub") as sub,
            sub.subscription(Tick) as ticks,
            raw(broker.url, "flooder") as ws,
        ):
            await sub.register_query_handler(Ask, lambda q: Answer(n=q.n))
            all_answered = trio.Event()

            async def read_answers() -> None:
                while len(answers) < frames * per_frame:
                    for env in await envelopes(ws):
                        if env.kind in (Kind.REPLY, Kind.NACK):
                            answers[env.corr] += 1
                            kinds[env.kind] += 1
                            if env.kind == Kind.NACK:
                                assert failure_of(env).code == "busy"
                all_answered.set()

            async def send_flood() -> None:
                for frame in flood:
                    await ws.send_message(frame)

            nursery.start_soon(read_answers)
            nursery.start_soon(send_flood)
            seq = 0
            while not all_answered.is_set():  # the others keep working meanwhile
                seq += 1
                await pub.send_message(Tick(seq=seq))
                assert (await ticks.receive()).seq == seq
                reply = await pub.query(Ask(n=seq), timeout=5)
                assert isinstance(reply, Answer) and reply.n == seq
            assert seq > 1
            assert set(answers.values()) == {1} and len(answers) == frames * per_frame
            assert kinds[Kind.REPLY] >= 1 and kinds[Kind.NACK] > kinds[Kind.REPLY]
            assert sorted(broker.peer_ids) == ["flooder", "pub", "sub"]
        assert left == [] or all("goodbye" in r or "lost" in r for _, r in left)
        assert not any("heartbeat" in reason for _, reason in left)
        await broker.shutdown()


async def test_info_answers_are_rate_limited_per_connection(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(30):
        broker = Broker(info_rate=3)
        await nursery.start(broker.run)
        async with raw(broker.url, "asker") as ws, Peer(broker.url, "other") as other:
            ask = b"".join(pack_envelope(int(Kind.INFO), "", "", i) for i in range(1, 11))
            await ws.send_message(ask)
            got: dict[int, codec.Envelope] = {}
            while len(got) < 10:
                for env in await envelopes(ws):
                    if env.kind in (Kind.REPLY, Kind.NACK):
                        got[env.corr] = env
            assert [got[i].kind for i in range(1, 11)] == [Kind.REPLY] * 3 + [Kind.NACK] * 7
            assert "info_rate=3" in failure_of(got[4]).detail
            # one encoding per frame: the three replies are the same bytes
            assert got[1].body == got[2].body == got[3].body
            info = codec.decode_body(BrokerInfo, got[1].body)
            assert isinstance(info, BrokerInfo)
            assert {p.peer_id for p in info.peers} == {"asker", "other"}
            # another connection has its own allowance, and the allowance comes back
            assert isinstance(await other.broker_info(), BrokerInfo)
            await trio.sleep(1)
            await ws.send_message(pack_envelope(int(Kind.INFO), "", "", 11))
            assert (await next_envelope(ws, Kind.REPLY)).corr == 11
        await broker.shutdown()


async def test_broker_info_is_computed_once_per_frame(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        broker = Broker(info_rate=1000)
        await nursery.start(broker.run)
        computed = 0
        info = broker.info

        def counting_info() -> BrokerInfo:
            nonlocal computed
            computed += 1
            return info()

        broker._dispatcher.info = counting_info
        async with raw(broker.url, "asker") as ws:
            for frame in range(2):
                first = frame * 100
                await ws.send_message(
                    b"".join(
                        pack_envelope(int(Kind.INFO), "", "", first + i) for i in range(1, 101)
                    )
                )
                got = 0
                while got < 100:
                    got += sum(env.kind == Kind.REPLY for env in await envelopes(ws))
                assert computed == frame + 1
            # a change within a frame is seen by the requests after it
            await ws.send_message(
                pack_envelope(int(Kind.INFO), "", "", 201)
                + pack_envelope(int(Kind.SUB), "T", "", 202)
                + pack_envelope(int(Kind.INFO), "", "", 203)
            )
            replies: dict[int, BrokerInfo] = {}
            while len(replies) < 2:
                for env in await envelopes(ws):
                    if env.kind == Kind.REPLY:
                        decoded = codec.decode_body(BrokerInfo, env.body)
                        assert isinstance(decoded, BrokerInfo)
                        replies[env.corr] = decoded
            assert replies[201].peers[0].subscriptions == []
            assert replies[203].peers[0].subscriptions == ["T"]
        await broker.shutdown()


async def test_the_reader_lets_others_run_within_a_long_frame(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the broker works through one frame of 100,000 envelopes, other tasks run."""
    ticks = 0
    seen: list[int] = []
    dispatch = Dispatcher.dispatch

    def watching(self: Dispatcher, conn: object, env: Envelope) -> None:
        if env.kind == Kind.HEARTBEAT:
            seen.append(ticks)
        dispatch(self, conn, env)  # type: ignore[arg-type]

    monkeypatch.setattr(Dispatcher, "dispatch", watching)

    async def ticking() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(30):
        broker = Broker()
        await nursery.start(broker.run)
        async with raw(broker.url, "flooder") as ws:
            nursery.start_soon(ticking)
            await ws.send_message(pack_envelope(int(Kind.HEARTBEAT)) * 100_000)
            await wait_for_condition(lambda: len(seen) == 100_000)
            # the other task had its turn again and again (every 256 envelopes, the reader
            # yields; trio's batches may run the two in either order, hence the half)
            assert len(set(seen)) >= 100_000 // 256 // 2
        await broker.shutdown()


# ------------------------------------------ 2. nobody is disconnected for what others sent


async def test_a_frame_of_queries_to_a_healthy_peer_keeps_it_connected(
    nursery: trio.Nursery,
) -> None:
    """One frame of 15,000 queries: the handler keeps its connection, the asker gets
    ``busy`` for what does not fit, and every query gets exactly one outcome."""
    count = 15_000
    body = codec.encode_body(Ask(n=1))
    frame = b"".join(
        pack_envelope(int(Kind.QUERY), Ask.message_type(), "", i, "", body)
        for i in range(1, count + 1)
    )
    with trio.fail_after(60):
        broker = Broker()
        await nursery.start(broker.run)
        left = record_leaves(broker)
        async with Peer(broker.url, "victim") as victim, raw(broker.url, "asker") as ws:
            await victim.register_query_handler(Ask, lambda q: Answer(n=q.n))
            await ws.send_message(frame)
            outcomes: Counter[int] = Counter()
            codes: Counter[str] = Counter()
            while len(outcomes) < count:
                for env in await envelopes(ws):
                    if env.kind == Kind.REPLY:
                        codes["reply"] += 1
                    elif env.kind == Kind.QERR:
                        failure = query_failure(env)
                        codes[failure.code] += 1
                        assert failure.code == "busy", failure
                        assert "max_pending_queries" in failure.detail or (
                            "reads too slowly" in failure.detail
                        )
                    else:
                        continue
                    outcomes[env.corr] += 1
            assert set(outcomes.values()) == {1}
            assert codes["busy"] > 0 and codes["reply"] > 0
            assert codes["busy"] + codes["reply"] == count
            assert victim.is_running or victim.is_connected
            assert sorted(broker.peer_ids) == ["asker", "victim"]
            assert broker.routing.pending_count() == 0
            reply = await victim.query(Ask(n=7), timeout=5)  # it still answers
            assert isinstance(reply, Answer)
        assert not any(pid == "victim" and "disconnected" in r for pid, r in left)
        await broker.shutdown()


async def test_pending_queries_are_bounded_per_asker_and_in_total(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        broker = Broker(max_pending_queries=2, max_pending_queries_total=3)
        await nursery.start(broker.run)
        release = trio.Event()

        async def slow(q: Ask) -> Answer:
            await release.wait()
            return Answer(n=q.n)

        async with (
            Peer(broker.url, "handler") as handler,
            Peer(broker.url, "a") as a,
            Peer(broker.url, "b") as b,
        ):
            await handler.register_query_handler(Ask, slow)
            results: list[object] = []

            async def ask(peer: Peer, n: int) -> None:
                results.append(await peer.query(Ask(n=n), timeout=100))

            async with trio.open_nursery() as asks:
                asks.start_soon(ask, a, 1)
                asks.start_soon(ask, a, 2)
                await wait_for_condition(lambda: broker.routing.pending_count() == 2)
                with pytest.raises(BrokerBusyError, match="max_pending_queries=2"):
                    await a.query(Ask(n=3), timeout=100)
                asks.start_soon(ask, b, 4)
                await wait_for_condition(lambda: broker.routing.pending_count() == 3)
                with pytest.raises(BrokerBusyError, match="max_pending_queries_total=3"):
                    await b.query(Ask(n=5), timeout=100)
                release.set()
            assert sorted(r.n for r in results if isinstance(r, Answer)) == [1, 2, 4]
            # room again once answered
            assert isinstance(await a.query(Ask(n=6), timeout=100), Answer)
        await broker.shutdown()


async def test_a_handler_that_reads_slowly_gets_no_more_queries_and_keeps_its_connection(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queries others send a handler that does not read pile up at the broker: past
    half the backlog bound they are refused (``busy``) instead of getting it disconnected."""
    monkeypatch.setattr("peerkit._connection.CONTROL_BACKLOG", 64)
    body = codec.encode_body(Blob(data=b"q" * 50_000))
    with trio.fail_after(30):
        broker = Broker(send_queue_size=10, max_pending_queries=5000)
        await nursery.start(broker.run)
        left = record_leaves(broker)
        async with raw(broker.url, "deaf", queue=1) as deaf, raw(broker.url, "asker") as asker:
            await register_raw_handler(deaf, Blob.message_type())
            busy = 0
            corr = 0
            # the deaf handler reads nothing: the broker's writer fills the socket buffers,
            # then the queries wait in its queue until they are refused
            while busy == 0:
                frame = b"".join(
                    pack_envelope(int(Kind.QUERY), Blob.message_type(), "", corr + i, "", body)
                    for i in range(1, 21)
                )
                corr += 20
                await asker.send_message(frame)
                await deaf.send_message(pack_envelope(int(Kind.HEARTBEAT)))
                with trio.move_on_after(0.05):
                    while True:
                        for env in await envelopes(asker):
                            if env.kind == Kind.QERR:
                                failure = query_failure(env)
                                assert failure.code == "busy" and failure.peer_id == "deaf"
                                assert "reads too slowly" in failure.detail
                                busy += 1
            assert "deaf" in broker.peer_ids and "asker" in broker.peer_ids
            assert left == []
        await broker.shutdown()


# --------------------------------------------------------- 3. queues bounded in bytes


async def test_the_outgoing_queue_is_bounded_in_bytes(nursery: trio.Nursery) -> None:
    """1 MiB messages to a subscriber that stopped reading: what the broker holds for it
    stays under ``send_queue_bytes``, and what did not fit is dropped and counted."""
    bound = 4 << 20
    count = 40
    with trio.fail_after(60):
        broker = Broker(max_message_size=(1 << 20) + 1024, send_queue_bytes=bound)
        await nursery.start(broker.run)
        async with raw(broker.url, "stuck", queue=1) as ws, Peer(broker.url, "pub") as pub:
            await ws.send_message(pack_envelope(int(Kind.SUB), Blob.message_type(), "", 1))
            assert (await next_envelope(ws, Kind.ACK)).corr == 1
            # from now on "stuck" reads nothing
            for _ in range(count):
                await pub.send_message(Blob(data=b"m" * (1 << 20)))
                assert peer_info(broker, "stuck").queued_bytes <= bound
            await wait_for_condition(lambda: peer_info(broker, "pub").msgs_in == count)
            info = peer_info(broker, "stuck")
            assert info.queued_bytes <= bound  # (0 if the writer holds the last frame)
            assert info.queued <= bound // (1 << 20)
            assert info.dropped > 0
            assert info.dropped + info.msgs_out + info.queued == count
            assert "stuck" in broker.peer_ids
        await broker.shutdown()


def numbered(seq: int, size: int) -> Blob:
    return Blob(data=seq.to_bytes(4, "big") + b"m" * (size - 4))


def number_of(body: bytes) -> int:
    blob = codec.decode_body(Blob, body)
    assert isinstance(blob, Blob)
    return int.from_bytes(blob.data[:4], "big")


async def read_blobs(ws: trio_websocket.WebSocketConnection, count: int) -> tuple[list[int], int]:
    """The numbers of the next ``count`` blobs (received or reported dropped), and how many
    were reported dropped."""
    got: list[int] = []
    dropped = 0
    while len(got) + dropped < count:
        for env in await envelopes(ws):
            if env.kind == Kind.PUB:
                assert env.corr == 1
                got.append(number_of(env.body))
            elif env.kind == Kind.DROPPED:
                report = codec.decode_body(MessagesDropped, env.body)
                assert isinstance(report, MessagesDropped)
                dropped += report.count
    return got, dropped


async def test_latest_delivery_keeps_the_newest_within_the_byte_bound(
    nursery: trio.Nursery,
) -> None:
    bound, count, size = 4 << 20, 30, 1 << 20
    with trio.fail_after(60):
        broker = Broker(max_message_size=size + 1024, send_queue_bytes=bound)
        await nursery.start(broker.run)
        async with raw(broker.url, "stuck", queue=1) as ws, Peer(broker.url, "pub") as pub:
            latest = codec.encode_body(SubscribeOptions(delivery="latest"))
            await ws.send_message(
                pack_envelope(int(Kind.SUB), Blob.message_type(), "", 1, "", latest)
            )
            assert (await next_envelope(ws, Kind.ACK)).corr == 1
            for seq in range(count):
                await pub.send_message(numbered(seq, size))
                assert peer_info(broker, "stuck").queued_bytes <= bound
            await wait_for_condition(lambda: peer_info(broker, "pub").msgs_in == count)
            assert peer_info(broker, "stuck").dropped > 0
            got, dropped = await read_blobs(ws, count)
            assert got[-1] == count - 1  # the newest arrived; older ones made room
            assert got == sorted(got) and len(got) + dropped == count
        await broker.shutdown()


async def test_lossless_delivery_holds_the_publisher_at_the_byte_bound(
    nursery: trio.Nursery,
) -> None:
    bound, count, size = 4 << 20, 30, 1 << 20
    with trio.fail_after(60):
        broker = Broker(max_message_size=size + 1024, send_queue_bytes=bound, stall_timeout=30)
        await nursery.start(broker.run)
        async with raw(broker.url, "slow", queue=1) as ws, Peer(broker.url, "pub") as pub:
            lossless = codec.encode_body(SubscribeOptions(delivery="lossless"))
            await ws.send_message(
                pack_envelope(int(Kind.SUB), Blob.message_type(), "", 1, "", lossless)
            )
            assert (await next_envelope(ws, Kind.ACK)).corr == 1

            async def publish() -> None:
                for seq in range(count):
                    await pub.send_message(numbered(seq, size))

            nursery.start_soon(publish)
            # the subscriber reads nothing: the broker stops reading the publisher once the
            # subscriber's queue is over the bound (by one frame at most)
            await wait_for_condition(lambda: peer_info(broker, "slow").queued_bytes >= bound)
            await trio.sleep(0.2)
            assert peer_info(broker, "slow").queued_bytes <= bound + 2 * size
            assert peer_info(broker, "pub").msgs_in < count
            got, dropped = await read_blobs(ws, count)
            assert got == list(range(count)) and dropped == 0
        await broker.shutdown()


async def test_byte_overflow_disconnects_with_overflow_disconnect(nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        broker = Broker(max_message_size=300_000, send_queue_bytes=1 << 20, overflow="disconnect")
        await nursery.start(broker.run)
        left = record_leaves(broker)
        async with raw(broker.url, "stuck", queue=1) as ws, Peer(broker.url, "pub") as pub:
            await ws.send_message(pack_envelope(int(Kind.SUB), Blob.message_type(), "", 1))
            assert (await next_envelope(ws, Kind.ACK)).corr == 1
            while "stuck" in broker.peer_ids:
                await pub.send_message(Blob(data=b"m" * 250_000))
                await trio.lowlevel.checkpoint()
        (reason,) = [r for pid, r in left if pid == "stuck"]
        assert "send_queue_bytes=1048576" in reason
        await broker.shutdown()


async def test_answers_over_the_byte_bound_disconnect_a_peer_that_does_not_read(
    nursery: trio.Nursery,
) -> None:
    """Replies are never dropped: a peer that asks for 400 KB replies and never reads them
    is disconnected once they pass ``send_queue_bytes``; the handler is not."""
    with trio.fail_after(60):
        broker = Broker(max_message_size=500_000, send_queue_bytes=1 << 20)
        await nursery.start(broker.run)
        left = record_leaves(broker)
        gone = trio.Event()
        broker.on_peer_left = lambda pid, reason: (left.append((pid, reason)), gone.set())
        async with Peer(broker.url, "handler") as handler, raw(broker.url, "deaf", queue=1) as ws:
            await handler.register_query_handler(Ask, lambda q: Blob(data=b"r" * 400_000))
            body = codec.encode_body(Ask(n=1))
            corr = 0
            with trio.move_on_after(30):
                while not gone.is_set():
                    corr += 1
                    await ws.send_message(
                        pack_envelope(int(Kind.QUERY), Ask.message_type(), "", corr, "", body)
                    )
                    await trio.sleep(0.001)
            await gone.wait()
            ((pid, reason),) = left
            assert pid == "deaf" and "does not read" in reason and "bytes waiting" in reason
            assert "handler" in broker.peer_ids
        await broker.shutdown()


# ------------------------------------------------- 4. strangers before the hello


async def test_strangers_holding_the_handshake_cannot_keep_a_peer_out(
    nursery: trio.Nursery,
) -> None:
    """300 connections that never say hello: the broker never has more than
    ``max_handshakes`` waiting (the oldest is closed to make room), and a peer still gets
    in."""
    with trio.fail_after(60):
        broker = Broker(handshake_timeout=60)
        await nursery.start(broker.run)
        cap = broker.limits.max_handshakes
        assert cap == 64
        strangers: list[trio_websocket.WebSocketConnection] = []
        async with trio.open_nursery() as clients:
            for _ in range(300):
                strangers.append(await trio_websocket.connect_websocket_url(clients, broker.url))
                await wait_for_condition(lambda: broker.handshakes >= 1)
                assert broker.handshakes <= cap
            await wait_for_condition(lambda: broker.handshakes == cap)
            # the oldest were told why
            env = await next_envelope(strangers[0], Kind.REJECT)
            reject = codec.decode_body(Reject, env.body)
            assert isinstance(reject, Reject) and reject.reason == "too_many_handshakes"
            assert "max_handshakes=64" in reject.detail
            async with Peer(broker.url, "welcome") as peer:
                assert peer.is_connected and "welcome" in broker.peer_ids
                assert broker.handshakes <= cap
            clients.cancel_scope.cancel()
        await broker.shutdown()


async def test_a_first_message_over_max_hello_size_is_rejected_undecoded(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        broker = Broker(max_hello_size=1024)
        await nursery.start(broker.run)
        hello = Hello(peer_id="big", protocol_version=PROTOCOL_VERSION, token="t" * 2000)
        async with raw(broker.url) as ws:
            await ws.send_message(control(Kind.HELLO, hello))
            env = await next_envelope(ws, Kind.REJECT)
            reject = codec.decode_body(Reject, env.body)
            assert isinstance(reject, Reject) and reject.reason == "bad_hello"
            assert "max_hello_size of 1024" in reject.detail
        assert broker.peer_ids == []
        async with Peer(broker.url, "small"):
            assert broker.peer_ids == ["small"]
        await broker.shutdown()


# --------------------------------------------------------- 5. bounded state per peer


async def test_the_broker_fails_a_query_past_its_deadline(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(300):
        broker = Broker(query_deadline=5)
        await nursery.start(broker.run)
        release = trio.Event()
        answered = trio.Event()

        async def late(q: Ask) -> Answer:
            await release.wait()
            answered.set()
            return Answer(n=q.n)

        async with Peer(broker.url, "handler") as handler, Peer(broker.url, "asker") as asker:
            await handler.register_query_handler(Ask, late)
            start = trio.current_time()
            with pytest.raises(QueryTimeout, match="query_deadline of 5 s"):
                await asker.query(Ask(n=1), timeout=100)
            assert 5 <= trio.current_time() - start < 7
            assert broker.routing.pending_count() == 0
            release.set()  # the late answer finds nothing: dropped quietly
            await answered.wait()
            await trio.sleep(1)
            assert sorted(broker.peer_ids) == ["asker", "handler"]
            assert isinstance(await asker.query(Ask(n=2), timeout=100), Answer)
        await broker.shutdown()


async def test_type_names_longer_than_max_type_length_are_refused(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        broker = Broker()
        await nursery.start(broker.run)
        async with Peer(broker.url, "p") as p, raw(broker.url, "r") as ws:
            with pytest.raises(BrokerRequestError, match="max_type_length of 256") as exc:
                await p.subscribe_for_all_msg_subtype(LongName, lambda m: None)
            assert exc.value.code == "bad_request"
            with pytest.raises(BrokerRequestError, match="max_type_length"):
                await p.register_query_handler(LongName, lambda m: m)
            with pytest.raises(QueryAnswerUnknown, match=r"bad_request: .*max_type_length"):
                await p.query(LongName(), timeout=5)
            long_type = "x" * 257
            await ws.send_message(pack_envelope(int(Kind.PUB), long_type, "", 1, "", b"\x80"))
            failure = failure_of(await next_envelope(ws, Kind.ERROR))
            assert failure.code == "bad_request" and "257 characters" in failure.detail
            assert long_type not in failure.detail
            assert broker.routing.subscriptions_of("p") == ["PeerControlMessage"]
            assert sorted(broker.peer_ids) == ["p", "r"]
        await broker.shutdown()


async def test_peer_ids_longer_than_max_id_length_are_refused(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        broker = Broker(max_id_length=10)
        await nursery.start(broker.run)
        with pytest.raises(HandshakeRejected, match=r"1\.\.10 printable") as exc:
            async with Peer(broker.url, "x" * 11):
                pass
        assert exc.value.reason == "bad_id"
        async with Peer(broker.url, "x" * 10), raw(broker.url, "r") as ws:
            # a target (ask_peer, sender filter) longer than that is refused too
            await ws.send_message(pack_envelope(int(Kind.SUB), "T", "", 3, "y" * 11))
            nack = await next_envelope(ws, Kind.NACK)
            assert nack.corr == 3 and "max_id_length of 10" in failure_of(nack).detail
        await broker.shutdown()


async def test_subscriptions_and_handlers_per_peer_are_capped(nursery: trio.Nursery) -> None:
    @message(type="test_limits.One")
    class One(Message):
        pass

    @message(type="test_limits.Two")
    class Two(Message):
        pass

    @message(type="test_limits.Three")
    class Three(Message):
        pass

    with trio.fail_after(10):
        # a peer subscribes to PeerControlMessage itself: that one and two more
        broker = Broker(max_subscriptions=3, max_handlers=2)
        await nursery.start(broker.run)
        async with Peer(broker.url, "p") as p:
            assert len(broker.routing.subscriptions_of("p")) == 1
            await p.subscribe_for_all_msg_subtype(One, lambda m: None)
            await p.subscribe_for_specific_msg_subtype(One, "someone", lambda m: None)
            with pytest.raises(BrokerRequestError, match="max_subscriptions=3") as exc:
                await p.subscribe_for_all_msg_subtype(Two, lambda m: None)
            assert exc.value.code == "too_many"
            await p.subscribe_for_all_msg_subtype(One, lambda m: None)  # not a new one
            await p.register_query_handler(One, lambda m: m)
            await p.register_query_handler(Two, lambda m: m)
            with pytest.raises(BrokerRequestError, match="max_handlers=2") as exc:
                await p.register_query_handler(Three, lambda m: m)
            assert exc.value.code == "too_many"
            await p.unregister_query_handler(Two)
            await p.register_query_handler(Three, lambda m: m)  # room again
        await broker.shutdown()


# ---------------------------------------------- 7. every size limit, every envelope kind


async def test_a_reply_over_max_message_size_is_refused(nursery: trio.Nursery) -> None:
    """A 50 KB reply through a broker limited to 1,000 bytes: the asker gets ``too_large``,
    the replier an error; both stay connected."""
    with trio.fail_after(10):
        broker = Broker(max_message_size=1000)
        await nursery.start(broker.run)
        async with raw(broker.url, "replier") as ws, Peer(broker.url, "asker") as asker:
            await register_raw_handler(ws, Ask.message_type())
            async with trio.open_nursery() as answering:

                async def answer() -> None:
                    query = await next_envelope(ws, Kind.QUERY)
                    body = codec.encode_body(Blob(data=b"r" * 50_000))
                    reply = pack_envelope(
                        int(Kind.REPLY), Blob.message_type(), "", query.corr, "", body
                    )
                    await ws.send_message(reply)

                answering.start_soon(answer)
                with pytest.raises(QueryAnswerUnknown, match="too_large") as exc:
                    await asker.query(Ask(n=1), timeout=5)
            assert "'replier'" in str(exc.value) and "max_message_size of 1000" in str(exc.value)
            failure = failure_of(await next_envelope(ws, Kind.ERROR))
            assert failure.code == "too_large" and "reply" in failure.detail
            assert broker.routing.pending_count() == 0
            assert sorted(broker.peer_ids) == ["asker", "replier"]
        await broker.shutdown()


@pytest.mark.parametrize(
    ("kind", "answer"),
    [
        (Kind.PUB, Kind.ERROR),
        (Kind.QUERY, Kind.QERR),
        (Kind.QERR, Kind.ERROR),
        (Kind.SUB, Kind.NACK),
        (Kind.UNSUB, Kind.NACK),
        (Kind.REG, Kind.NACK),
        (Kind.UNREG, Kind.NACK),
        (Kind.INFO, Kind.NACK),
        (Kind.TIME, Kind.NACK),
        (Kind.STATE, Kind.ERROR),
        (Kind.HEARTBEAT, Kind.ERROR),
        (Kind.QCANCEL, Kind.ERROR),
    ],
)
async def test_every_kind_of_envelope_is_held_to_max_message_size(
    nursery: trio.Nursery, kind: Kind, answer: Kind
) -> None:
    with trio.fail_after(10):
        broker = Broker(max_message_size=1000)
        await nursery.start(broker.run)
        async with raw(broker.url, "big") as ws:
            await ws.send_message(pack_envelope(int(kind), "T", "", 5, "", b"\x00" * 2000))
            env = await next_envelope(ws, answer)
            failure = query_failure(env) if answer == Kind.QERR else failure_of(env)
            assert failure.code == "too_large" and "max_message_size of 1000" in failure.detail
            if answer != Kind.ERROR:
                assert env.corr == 5
            assert broker.peer_ids == ["big"]
        await broker.shutdown()


async def test_an_oversized_goodbye_is_an_unreadable_goodbye(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        broker = Broker(max_message_size=1000)
        await nursery.start(broker.run)
        left = record_leaves(broker)
        async with raw(broker.url, "bye") as ws:
            await ws.send_message(pack_envelope(int(Kind.GOODBYE), "", "", 0, "", b"\x00" * 5000))
        await wait_for_condition(lambda: bool(left))
        ((pid, reason),) = left
        assert pid == "bye" and "unreadable goodbye: too_large" in reason
        await broker.shutdown()


# ------------------------------------------------------- 8. nothing lost at shutdown


async def test_a_broker_shutdown_under_traffic_loses_nothing_silently(
    nursery: trio.Nursery,
) -> None:
    """Every message the subscriber received is handled or counted as dropped."""
    with trio.fail_after(60):
        broker = Broker(send_queue_size=1_000_000, send_queue_bytes=1 << 30)
        await nursery.start(broker.run)
        handled = 0
        enough = trio.Event()

        async def on_tick(msg: Tick) -> None:
            nonlocal handled
            handled += 1
            if handled == 2000:
                enough.set()
            await trio.lowlevel.checkpoint()  # slower than the publisher: a backlog builds up

        sub = Peer(broker.url, "sub", receive_queue_size=100_000)
        pub = Peer(broker.url, "pub")

        async def flood() -> None:
            seq = 0
            try:
                while True:
                    seq += 1
                    await pub.send_message(Tick(seq=seq))
            except (ShuttingDownException, PeerkitError):
                return

        async with trio.open_nursery() as peers:  # exits when both peers have finished
            await peers.start(sub.run)
            await peers.start(pub.run)
            await sub.subscribe_for_all_msg_subtype(Tick, on_tick)
            peers.start_soon(flood)
            await enough.wait()
            await broker.shutdown()
        assert sub.is_finished and pub.is_finished
        assert sub.msgs_in > handled  # it did not handle everything it received...
        assert handled + sub.dropped_messages == sub.msgs_in  # ... but counted the rest


# ------------------------------------------------------------- options are checked


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"send_queue_bytes": 0}, "send_queue_bytes must be a positive integer"),
        ({"send_queue_bytes": 1000}, "must hold at least one message of max_message_size"),
        ({"max_handshakes": 0}, "max_handshakes must be a positive integer"),
        ({"max_hello_size": 100}, "max_hello_size must be at least 512"),
        ({"max_pending_queries": -1}, "max_pending_queries must be a positive integer"),
        (
            {"max_pending_queries": 10, "max_pending_queries_total": 5},
            "max_pending_queries_total .5. must be at least max_pending_queries .10.",
        ),
        ({"query_deadline": 0}, "query_deadline must be a positive number of seconds"),
        ({"info_rate": float("nan")}, "info_rate must be a positive number"),
        ({"info_rate": True}, "info_rate must be a positive number"),
        ({"max_type_length": 0}, "max_type_length must be a positive integer"),
        ({"max_id_length": "10"}, "max_id_length must be a positive integer"),
        ({"max_subscriptions": 0}, "max_subscriptions must be a positive integer"),
        ({"max_handlers": 1.5}, "max_handlers must be a positive integer"),
    ],
)
def test_bad_limits_are_refused_clearly(options: dict[str, object], match: str) -> None:
    with pytest.raises(PeerkitError, match=match):
        Broker(**options)  # type: ignore[arg-type]


def test_the_defaults() -> None:
    limits = Broker().limits
    assert limits.send_queue_bytes == 32 << 20
    assert (limits.max_handshakes, limits.max_hello_size) == (64, 4096)
    assert (limits.max_pending_queries, limits.max_pending_queries_total) == (1000, 50_000)
    assert limits.query_deadline == 60.0 and limits.info_rate == 20.0
    assert (limits.max_type_length, limits.max_id_length) == (256, 200)
    assert (limits.max_subscriptions, limits.max_handlers) == (4096, 1024)
    # the byte bound always holds a message of the largest size
    assert Broker(max_message_size=64 << 20).limits.send_queue_bytes == 128 << 20


# ------------------------------------------------------------------ the sans-IO parts


def test_types_nobody_subscribed_to_cost_the_routing_cache_nothing() -> None:
    rt = RoutingTable()
    rt.add_peer("pub")
    rt.add_peer("sub")
    rt.subscribe("sub", "Real")
    for i in range(10_000):
        assert rt.subscribers(f"Invented{i}" * 20, "pub") == ()
    assert rt.cache_entries == 0 and rt.cache_bytes == 0
    assert rt.subscribers("Real", "pub") == ("sub",)
    assert rt.cache_entries == 1
    # a type with only sender-specific subscriptions is a real one too
    rt.subscribe("sub", "Specific", "someone")
    assert rt.subscribers("Specific", "pub") == ()
    assert rt.subscribers("Specific", "someone") == ("sub",)
    assert rt.cache_entries == 2
    rt.unsubscribe("sub", "Specific", "someone")
    assert rt.subscribers("Specific", "someone") == ()
    assert rt.cache_entries == 0


def test_the_routing_cache_is_bounded_in_entries_and_bytes() -> None:
    rt = RoutingTable(max_cache_entries=100, max_cache_bytes=50_000)
    rt.add_peer("sub")
    names = [f"T{i}-" + "x" * 200 for i in range(300)]
    for name in names:
        rt.subscribe("sub", name)
    for sender in ("a" * 200, "b" * 200):
        for name in names:
            assert rt.subscribers(name, sender) == ("sub",)
            assert rt.cache_entries <= 100
            assert rt.cache_bytes <= 50_000


def test_subscriptions_and_handlers_are_capped_in_the_table() -> None:
    rt = RoutingTable(max_subscriptions=2, max_handlers=1)
    rt.add_peer("p")
    rt.subscribe("p", "A")
    rt.subscribe("p", "A")  # the same one again: not a new subscription
    rt.subscribe("p", "A", "q")
    with pytest.raises(BrokerRequestError, match="max_subscriptions=2") as exc:
        rt.subscribe("p", "B")
    assert exc.value.code == "too_many"
    assert rt.subscriptions_of("p") == ["A", "A@q"]
    rt.register_handler("p", "Q")
    rt.register_handler("p", "Q")  # the same one again
    with pytest.raises(BrokerRequestError, match="max_handlers=1"):
        rt.register_handler("p", "R")
    assert rt.unregister_handler("p", "Q")
    rt.register_handler("p", "R")


def test_pending_queries_expire_at_their_deadline_and_are_counted_per_asker() -> None:
    rt = RoutingTable()
    for p in ("a", "b", "h"):
        rt.add_peer(p)
    c1 = rt.open_query("a", 1, "h", "Q", deadline=10.0)
    c2 = rt.open_query("a", 2, "h", "Q", deadline=11.0)
    c3 = rt.open_query("b", 1, "h", "Q", deadline=12.0)
    assert (rt.pending_of("a"), rt.pending_of("b"), rt.pending_of("h")) == (2, 1, 0)
    assert rt.expire(9.9) == []
    assert [pq.corr for pq in rt.expire(11.0)] == [c1, c2]
    assert rt.pending_of("a") == 0 and rt.pending_count() == 1
    assert rt.close_query(c1, "h") is None  # the late answer finds nothing
    assert rt.cancel_query("a", 2) is None
    assert rt.close_query(c3, "h") is not None
    assert rt.pending_of("b") == 0 and rt.expire(100.0) == []
    # without a deadline, never
    rt.open_query("a", 3, "h", "Q")
    assert rt.expire(1e12) == [] and rt.pending_of("a") == 1
    assert rt.remove_peer("a").abandoned_queries == 1
    assert rt.pending_of("a") == 0


def test_a_token_bucket_allows_its_rate_and_a_burst_of_it() -> None:
    bucket = TokenBucket(rate=3.0, stamp=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.2)
    assert bucket.take(0.4) and not bucket.take(0.4)  # one more per third of a second
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped
    slow = TokenBucket(rate=0.5, stamp=0.0)  # below one a second: bursts of one
    assert slow.take(0.0) and not slow.take(1.0) and slow.take(2.0)


def test_fit_bytes_cuts_a_run_where_the_room_ends() -> None:
    bodies = [codec.encode_body(Blob(data=b"x" * n)) for n in (10, 20, 30)]
    run = b"".join(bodies)
    assert fit_bytes(run, 3, len(run)) == (run, 3)
    assert fit_bytes(run, 3, len(run) - 1) == (bodies[0] + bodies[1], 2)
    assert fit_bytes(run, 3, len(bodies[0])) == (bodies[0], 1)
    assert fit_bytes(run, 3, len(bodies[0]) - 1) == (b"", 0)
    assert fit_bytes(run, 3, 0) == (b"", 0)
    assert fit_bytes(b"\xc1\xc1\xc1", 3, 2) == (b"", 0)  # unreadable: nothing fits
    # the newest bodies, for "latest" delivery
    assert fit_bytes(run, 3, len(run) - 1, newest=True) == (bodies[1] + bodies[2], 2)
    assert fit_bytes(run, 3, len(bodies[2]), newest=True) == (bodies[2], 1)
    assert fit_bytes(run, 3, len(bodies[2]) - 1, newest=True) == (b"", 0)


def test_limits_defaults_match_the_brokers() -> None:
    assert Limits.checked() == Broker().limits
    assert Limits.checked().send_queue_bytes == 32 << 20
