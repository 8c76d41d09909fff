"""The broker against raw WebSocket clients: handshake, bad input, limits, liveness."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio_websocket

from peerkit import (
    Broker,
    BrokerLostError,
    HandshakeRejected,
    Message,
    Peer,
    PeerkitError,
    codec,
    message,
)
from peerkit.codec import control, pack_envelope
from peerkit.messages import MessagesDropped, PanickMsg, PeerLeft
from peerkit.protocol import PROTOCOL_VERSION, Hello, Kind, Reject, RequestFailed, Welcome


@message
class Blob(Message):
    data: bytes


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="peerkit")


@asynccontextmanager
async def raw(
    url: str, peer_id: str | None = None, version: int = PROTOCOL_VERSION
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A bare WebSocket client; says hello first if ``peer_id`` is given."""
    async with trio_websocket.open_websocket_url(
        url, max_message_size=64 << 20, connect_timeout=5, disconnect_timeout=5
    ) as ws:
        if peer_id is not None:
            await ws.send_message(
                control(Kind.HELLO, Hello(peer_id=peer_id, protocol_version=version))
            )
            (env,) = codec.iter_envelopes(await ws.get_message())  # type: ignore[arg-type]
            assert env.kind == Kind.WELCOME
            assert isinstance(codec.decode_body(Welcome, env.body), Welcome)
        yield ws


async def next_envelope(ws: trio_websocket.WebSocketConnection, kind: Kind) -> codec.Envelope:
    while True:
        for env in codec.iter_envelopes(await ws.get_message()):  # type: ignore[arg-type]
            if env.kind == kind:
                return env


async def assert_broker_still_routes(broker: Broker) -> None:
    async with (
        Peer(broker.url, "check-a") as a,
        Peer(broker.url, "check-b") as b,
        b.subscription(Blob) as stream,
    ):
        await a.send_message(Blob(data=b"still alive"))
        assert (await stream.receive()).data == b"still alive"


async def test_garbage_before_hello_is_rejected(broker: Broker) -> None:
    with trio.fail_after(10):
        async with raw(broker.url) as ws:
            await ws.send_message(b"\xc1\xc1 not msgpack")
            env = await next_envelope(ws, Kind.REJECT)
            reject = codec.decode_body(Reject, env.body)
            assert isinstance(reject, Reject) and reject.reason == "bad_hello"
        async with raw(broker.url) as ws:
            await ws.send_message("a text frame")
            env = await next_envelope(ws, Kind.REJECT)
        await assert_broker_still_routes(broker)


async def test_wrong_protocol_version_is_rejected(broker: Broker) -> None:
    with trio.fail_after(10):
        async with raw(broker.url) as ws:
            await ws.send_message(control(Kind.HELLO, Hello(peer_id="old", protocol_version=99)))
            env = await next_envelope(ws, Kind.REJECT)
            reject = codec.decode_body(Reject, env.body)
            assert isinstance(reject, Reject)
            assert reject.reason == "bad_version" and "99" in reject.detail


async def test_garbage_after_hello_keeps_everyone_served(broker: Broker) -> None:
    with trio.fail_after(10):
        async with raw(broker.url, "rogue") as ws:
            for junk in (
                b"\x00\x01\x02",
                b"\x93\x01\x02\x03",
                "text!",
                pack_envelope(99, "x"),
                pack_envelope(int(Kind.REG), "", body=b"\xff"),
            ):
                await ws.send_message(junk)
            errors = 0
            while errors < 4:
                env = await next_envelope(ws, Kind.ERROR)
                failure = codec.decode_body(RequestFailed, env.body)
                assert isinstance(failure, RequestFailed)
                assert failure.code in ("bad_frame", "unexpected")
                errors += 1
            nack = await next_envelope(ws, Kind.NACK)
            assert nack.kind == Kind.NACK
            assert "rogue" in broker.peer_ids  # still connected
            await assert_broker_still_routes(broker)


async def test_oversized_body_refused_with_error_connection_kept(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        broker = Broker(max_message_size=1000)
        await nursery.start(broker.run)
        async with raw(broker.url, "big") as ws:
            body = codec.encode_body(Blob(data=b"z" * 5000))
            await ws.send_message(pack_envelope(int(Kind.PUB), "Blob", "", 1, "", body))
            env = await next_envelope(ws, Kind.ERROR)
            failure = codec.decode_body(RequestFailed, env.body)
            assert isinstance(failure, RequestFailed)
            assert failure.code == "too_large" and "max_message_size" in failure.detail
            assert "big" in broker.peer_ids
            # a frame beyond even the WebSocket limit closes that connection only
            with pytest.raises(trio_websocket.ConnectionClosed):
                await ws.send_message(b"\x00" * (8 << 20))
                while True:
                    await ws.get_message()
        await assert_broker_still_routes(broker)
        await broker.shutdown()


async def test_silent_peer_is_dropped_and_panick_published(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        broker = Broker(heartbeat_interval=1, heartbeat_timeout=3)
        await nursery.start(broker.run)
        left: list[tuple[str, str]] = []
        broker.on_peer_left = lambda pid, reason: left.append((pid, reason))
        async with Peer(broker.url, "watcher") as watcher:
            async with watcher.subscription(PanickMsg) as panics:
                async with raw(broker.url, "zombie"):
                    start = trio.current_time()
                    panic = await panics.receive()
                    elapsed = trio.current_time() - start
                assert panic.sender == "zombie"
                assert "no heartbeat" in panic.message
                assert 3 <= elapsed <= 5
            # a live peer that heartbeats is not dropped meanwhile
            assert watcher.is_running
        assert left[0][0] == "zombie"
        await broker.shutdown()


async def test_peer_notices_lost_broker(
    vanishing_broker: tuple[Broker, trio.CancelScope], autojump_clock: trio.abc.Clock
) -> None:
    broker, broker_scope = vanishing_broker
    with trio.fail_after(60):
        peer_error: list[BaseException] = []
        async with trio.open_nursery() as outer:
            peer = Peer(broker.url, "orphan")

            async def run_peer() -> None:
                try:
                    await peer.run()
                except BrokerLostError as exc:
                    peer_error.append(exc)

            outer.start_soon(run_peer)
            await peer.wait_for_state(lambda p: p.is_running, timeout=5)
            broker_scope.cancel()  # abrupt: no BrokerShutdownMsg
            await peer.wait_finished()
        assert peer_error and "broker" in str(peer_error[0])


async def test_clean_broker_shutdown_finishes_peers(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        broker = Broker()
        await nursery.start(broker.run)
        peers = [Peer(broker.url, f"p{i}") for i in range(3)]
        async with trio.open_nursery() as inner:
            for p in peers:
                await inner.start(p.run)
            await broker.shutdown()
        assert all(p.is_finished and p.error is None for p in peers)


async def test_broker_tells_subscriber_how_many_were_dropped(nursery: trio.Nursery) -> None:
    """A subscriber that does not read: the broker drops and reports the count."""
    n = 3000
    with trio.fail_after(30):
        broker = Broker(send_queue_size=20)
        await nursery.start(broker.run)
        async with raw(broker.url, "stuck") as ws:
            await ws.send_message(pack_envelope(int(Kind.SUB), "Blob", "", 1))
            await next_envelope(ws, Kind.ACK)
            async with Peer(broker.url, "pub") as pub:
                for _ in range(n):
                    await pub.send_message(Blob(data=b"q" * 10_000))
                await pub.broker_info()  # the broker has handled everything published
            (info,) = [p for p in broker.info().peers if p.peer_id == "stuck"]
            assert info.dropped > 0
            delivered = dropped = 0
            while delivered + dropped < n:
                for env in codec.iter_envelopes(await ws.get_message()):  # type: ignore[arg-type]
                    if env.kind == Kind.PUB:
                        delivered += env.corr
                    elif env.kind == Kind.DROPPED:
                        report = codec.decode_body(MessagesDropped, env.body)
                        assert isinstance(report, MessagesDropped)
                        dropped += report.count
            assert dropped == info.dropped
            assert delivered + dropped == n
        await broker.shutdown()


async def test_overflow_disconnect_policy(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        broker = Broker(send_queue_size=20, overflow="disconnect")
        await nursery.start(broker.run)
        left: list[str] = []
        broker.on_peer_left = lambda pid, reason: left.append(pid)
        async with raw(broker.url, "stuck") as ws:
            await ws.send_message(pack_envelope(int(Kind.SUB), "Blob", "", 1))
            await next_envelope(ws, Kind.ACK)
            async with Peer(broker.url, "pub") as pub:
                while "stuck" not in left:
                    await pub.send_message(Blob(data=b"q" * 10_000))
                assert pub.is_running
        await broker.shutdown()


async def test_token_required_and_checked(nursery: trio.Nursery) -> None:
    with pytest.raises(PeerkitError, match="token"):
        Broker(host="0.0.0.0")
    with trio.fail_after(10):
        broker = Broker(token="s3cret")
        await nursery.start(broker.run)
        with pytest.raises(HandshakeRejected, match="token"):
            async with Peer(broker.url, "intruder", token="guess"):
                pass  # pragma: no cover
        async with Peer(broker.url, "friend", token="s3cret") as friend:
            assert friend.is_connected
        await broker.shutdown()


async def test_max_peers(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        broker = Broker(max_peers=1)
        await nursery.start(broker.run)
        async with Peer(broker.url, "first"):
            with pytest.raises(HandshakeRejected, match="max_peers=1"):
                async with Peer(broker.url, "second"):
                    pass  # pragma: no cover
        await broker.shutdown()


def test_bad_broker_options() -> None:
    with pytest.raises(PeerkitError, match="overflow"):
        Broker(overflow="block")  # type: ignore[arg-type]
    with pytest.raises(PeerkitError, match="heartbeat_timeout"):
        Broker(heartbeat_interval=2, heartbeat_timeout=1)
    with pytest.raises(PeerkitError, match="port"):
        Broker(port=70000)
    with pytest.raises(PeerkitError, match="not listening"):
        _ = Broker().url


async def test_peer_vanishing_mid_stream_does_not_hurt_the_broker(broker: Broker) -> None:
    """A subscriber whose TCP connection dies while the broker writes to it."""
    with trio.fail_after(10):
        async with Peer(broker.url, "watcher") as watcher, watcher.subscription(PanickMsg) as p:
            async with raw(broker.url, "vanishing") as ws:
                await ws.send_message(pack_envelope(int(Kind.SUB), "Blob", "", 1))
                await next_envelope(ws, Kind.ACK)
                await trio.aclose_forcefully(ws._stream)  # no close frame, just gone
                async with Peer(broker.url, "pub") as pub:
                    for _ in range(200):
                        await pub.send_message(Blob(data=b"w" * 5000))
                    panic = await p.receive()
            assert panic.sender == "vanishing"
            assert "without goodbye" in panic.message
        assert "vanishing" not in broker.peer_ids
        await assert_broker_still_routes(broker)


async def test_peer_left_is_published_for_clean_and_unclean_leaves(broker: Broker) -> None:
    with trio.fail_after(10):
        async with Peer(broker.url, "watcher") as watcher, watcher.subscription(PeerLeft) as left:
            async with Peer(broker.url, "polite"):
                pass
            async with raw(broker.url, "rude") as ws:
                await trio.aclose_forcefully(ws._stream)
            first, second = await left.receive(), await left.receive()
        assert (first.sender, first.clean, first.reason) == ("polite", True, "goodbye")
        assert (second.sender, second.clean) == ("rude", False)
        assert "without goodbye" in second.reason


async def test_malformed_message_never_crashes_the_receiver(broker: Broker) -> None:
    with trio.fail_after(10):
        async with Peer(broker.url, "sub") as sub, sub.subscription(Blob) as stream:
            async with raw(broker.url, "forger") as ws:
                for body in (b"\xc1", codec.encode_body(PeerLeft(reason="x", clean=True))):
                    await ws.send_message(pack_envelope(int(Kind.PUB), "Blob", "", 1, "", body))
                good = codec.encode_body(Blob(data=b"fine"))
                await ws.send_message(pack_envelope(int(Kind.PUB), "Blob", "", 1, "", good))
                msg = await stream.receive()
            assert msg.data == b"fine" and msg.sender == "forger"
            assert sub.decode_errors == 2
            assert sub.is_running


async def test_malformed_message_with_a_plain_handler(broker: Broker) -> None:
    with trio.fail_after(10):
        got: list[bytes] = []
        arrived = trio.Event()

        def on_blob(msg: Blob) -> None:
            got.append(msg.data)
            arrived.set()

        async with Peer(broker.url, "sub") as sub:
            await sub.subscribe_for_all_msg_subtype(Blob, on_blob)
            async with raw(broker.url, "forger") as ws:
                bad = pack_envelope(int(Kind.PUB), "Blob", "", 1, "", b"\x81\xa4data\x07")
                good = pack_envelope(
                    int(Kind.PUB), "Blob", "", 1, "", codec.encode_body(Blob(data=b"ok"))
                )
                await ws.send_message(bad + good)
                await arrived.wait()
            assert got == [b"ok"]
            assert sub.decode_errors == 1


async def test_a_peer_that_never_reads_its_answers_is_disconnected(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers are never dropped, so their queue is bounded by giving the peer up."""
    monkeypatch.setattr("peerkit._connection.CONTROL_BACKLOG", 64)
    with trio.fail_after(30):
        broker = Broker(send_queue_size=10)
        await nursery.start(broker.run)
        left: list[str] = []
        gone = trio.Event()

        def on_left(pid: str, reason: str) -> None:
            left.append(reason)
            gone.set()

        broker.on_peer_left = on_left
        async with raw(broker.url, "deaf") as ws:
            info = pack_envelope(int(Kind.INFO), "", "", 1)
            with trio.move_on_after(20):
                while not gone.is_set():  # ask and never read: the socket buffers fill
                    await ws.send_message(info * 10)  # fewer than the bound per frame
            await gone.wait()
        assert "does not read" in left[0]
        await assert_broker_still_routes(broker)
        await broker.shutdown()
