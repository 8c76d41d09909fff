"""The peer's lifecycle on trio: states, hooks, tasks, shutdown and errors."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from peerkit import (
    Broker,
    BrokerConnectError,
    DuplicatePeerId,
    Message,
    NotConnectedException,
    Peer,
    PeerkitError,
    PeerState,
    ShuttingDownException,
    message,
)
from peerkit.messages import OkMsg, PanickMsg, PeerControlMessage


@message
class Note(Message):
    text: str


class Recorder(Peer):
    """Records the state at each hook call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, PeerState]] = []
        self.during_shutdown: list[str] = []

    async def _connections_established(self) -> None:
        self.calls.append(("connections_established", self.state))

    async def _start(self) -> None:
        self.calls.append(("start", self.state))

    async def _stop(self) -> None:
        self.calls.append(("stop", self.state))

    async def _shutting_down(self) -> None:
        self.calls.append(("shutting_down", self.state))
        for what, attempt in (
            ("create_task", lambda: self.create_task(trio.sleep, 0)),
            ("start", None),
        ):
            try:
                if attempt is not None:
                    attempt()
                else:
                    await self.start()
            except ShuttingDownException:
                self.during_shutdown.append(what)
        try:
            await self.send_message(Note(text="late"))
        except ShuttingDownException:
            self.during_shutdown.append("send_message")


async def test_state_flow(broker: Broker) -> None:
    """OBCI's test_peer_state_flow, on trio."""
    with trio.fail_after(10):
        peer = Recorder(broker.url, "master", autostart=False, autoshutdown=False)
        assert peer.state is PeerState.initializing
        assert not peer.is_connected and not peer.is_shutting_down
        ran = trio.Event()

        async def early_task() -> None:
            assert peer.is_connected
            ran.set()

        peer.create_task(early_task)  # allowed while initializing: queued
        with pytest.raises(NotConnectedException):
            await peer.send_message(Note(text="too early"))
        with pytest.raises(NotConnectedException):
            await peer.subscribe_for_all_msg_subtype(Note, lambda m: None)

        async with trio.open_nursery() as nursery:
            await nursery.start(peer.run)
            assert peer.is_connected
            await ran.wait()
            await peer.send_message(Note(text="hello"))
            await peer.subscribe_for_all_msg_subtype(Note, lambda m: None)
            await peer.wait_for_state(lambda p: p.is_ready, timeout=5)
            assert peer.state is PeerState.ready and not peer.is_running
            await peer.start()
            assert peer.is_running and peer.is_ready and peer.is_connected
            await peer.start()  # idempotent
            await peer.stop()
            assert peer.state is PeerState.ready
            await peer.stop()  # idempotent
            await peer.start()
            await peer.async_shutdown()
            assert peer.is_finished and peer.is_shutting_down
            assert not peer.is_connected
            for call in (peer.start, peer.stop, lambda: peer.send_message(Note(text="x"))):
                with pytest.raises(ShuttingDownException):
                    await call()
            with pytest.raises(ShuttingDownException):
                peer.create_task(trio.sleep, 0)
            await peer.async_shutdown()  # idempotent
        assert peer.calls == [
            ("connections_established", PeerState.connected),
            ("start", PeerState.ready),
            ("stop", PeerState.running),
            ("start", PeerState.ready),
            ("stop", PeerState.shutting_down),  # a running peer is stopped on shutdown
            ("shutting_down", PeerState.shutting_down),
        ]
        assert peer.during_shutdown == ["create_task", "start", "send_message"]


async def test_autostart_and_autoshutdown(broker: Broker) -> None:
    with trio.fail_after(10):
        async with Peer(broker.url, "auto") as peer:
            await peer.wait_for_state(lambda p: p.is_running, timeout=5)
            await peer.stop()  # autoshutdown: stop ends the peer
            assert peer.is_finished


async def test_user_tasks_cancelled_with_reason_on_shutdown(broker: Broker) -> None:
    with trio.fail_after(10):
        cancelled: list[trio.Cancelled] = []
        started = trio.Event()

        async def forever() -> None:
            try:
                started.set()
                await trio.sleep_forever()
            except trio.Cancelled as exc:
                cancelled.append(exc)
                raise

        async with Peer(broker.url, "p") as peer:
            peer.create_task(forever)
            await started.wait()
        assert peer.is_finished
        assert len(cancelled) == 1
        assert "async with" in str(cancelled[0]) or "shut" in str(cancelled[0])


async def test_async_shutdown_from_inside_a_task(broker: Broker) -> None:
    with trio.fail_after(10):
        peer = Peer(broker.url, "self-closer")
        after: list[str] = []

        async def closer() -> None:
            await peer.async_shutdown()
            await peer.async_shutdown()
            after.append("not reached")  # pragma: no cover

        async with trio.open_nursery() as nursery:
            await nursery.start(peer.run)
            peer.create_task(closer)
        assert peer.is_finished
        assert after == []
        assert peer.error is None


class Crasher(Peer):
    async def _start(self) -> None:
        self.create_task(self.crash)

    async def crash(self) -> None:
        raise ValueError("sensor on fire")


async def test_task_error_panics_and_run_reraises(broker: Broker) -> None:
    with trio.fail_after(10):
        left: list[tuple[str, str]] = []
        broker.on_peer_left = lambda pid, reason: left.append((pid, reason))
        panics: list[PanickMsg] = []
        got = trio.Event()

        def on_panic(msg: PanickMsg) -> None:
            panics.append(msg)
            got.set()

        async with Peer(broker.url, "watcher") as watcher:
            await watcher.subscribe_for_all_msg_subtype(PanickMsg, on_panic)
            crasher = Crasher(broker.url, "crasher")
            with pytest.raises(ValueError, match="sensor on fire"):
                await crasher.run()
            await got.wait()
        assert crasher.is_finished
        assert isinstance(crasher.error, ValueError)
        assert panics[0].sender == "crasher"
        assert panics[0].message == "sensor on fire"
        assert panics[0].error_type == "ValueError"
        assert ("crasher", "goodbye (ValueError: sensor on fire)") in left


async def test_run_reraises_single_exception_not_group(broker: Broker) -> None:
    with trio.fail_after(10):
        crasher = Crasher(broker.url, "c2")
        with pytest.raises(ValueError):  # not an ExceptionGroup
            await crasher.run()


async def test_async_with_reraises_peer_error(broker: Broker) -> None:
    with trio.fail_after(10), pytest.raises(ValueError, match="sensor"):
        async with Crasher(broker.url, "c3"):
            await trio.sleep_forever()


async def test_handler_error_kills_peer(broker: Broker) -> None:
    with trio.fail_after(10):

        def bad_handler(msg: Note) -> None:
            raise KeyError(msg.text)

        victim = Peer(broker.url, "victim")
        with pytest.raises(KeyError):
            async with victim:
                await victim.subscribe_for_all_msg_subtype(Note, bad_handler)
                async with Peer(broker.url, "sender") as sender:
                    await sender.send_message(Note(text="boom"))
                    await victim.wait_finished()
        assert victim.is_finished


async def test_control_messages_drive_the_peer(broker: Broker) -> None:
    with trio.fail_after(10):
        async with (
            Peer(broker.url, "ctl") as ctl,
            Peer(broker.url, "target", autostart=False, autoshutdown=False) as target,
        ):
            await target.wait_for_state(lambda p: p.is_ready, timeout=5)
            await ctl.send_message(PeerControlMessage(peer_id="target", action="start"))
            await target.wait_for_state(lambda p: p.is_running, timeout=5)
            answer = await ctl.ask_peer(
                "target", PeerControlMessage(peer_id="target", action="stop")
            )
            assert isinstance(answer, OkMsg)
            assert target.state is PeerState.ready
            await ctl.send_message(PeerControlMessage(peer_id="someone-else", action="close"))
            await ctl.send_message(PeerControlMessage(peer_id="target", action="close"))
            await target.wait_finished()
            assert target.error is None
            assert ctl.is_running


async def test_duplicate_peer_id_is_rejected(broker: Broker) -> None:
    with trio.fail_after(10):
        async with Peer(broker.url, "twin"):
            with pytest.raises(DuplicatePeerId, match="already connected"):
                async with Peer(broker.url, "twin"):
                    pass  # pragma: no cover


async def test_connect_gives_up_with_clear_error(autojump_clock: trio.abc.Clock) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    with trio.fail_after(60):
        peer = Peer(f"ws://127.0.0.1:{port}", "lonely", connect_timeout=3)
        with pytest.raises(BrokerConnectError, match=r"within 3\.0 s"):
            await peer.run()
        assert peer.is_finished


async def test_peer_started_before_broker_connects(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(10):
        probe = trio.socket.socket()
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        peer = Peer(f"ws://127.0.0.1:{port}", "early")
        async with trio.open_nursery() as inner:
            inner.start_soon(peer.run)
            # virtual time: the peer's back-off sleeps pass at once, and every connection
            # it tries is refused at once (loopback), so it has retried several times
            await trio.sleep(0.5)
            assert peer.state is PeerState.initializing
            broker = Broker(port=port)
            await nursery.start(broker.run)
            await peer.wait_for_state(lambda p: p.is_running, timeout=5)
            await peer.async_shutdown()
        await broker.shutdown()


async def test_run_only_once(broker: Broker) -> None:
    with trio.fail_after(10):
        async with Peer(broker.url, "once") as peer:
            pass
        with pytest.raises(PeerkitError, match="already called"):
            await peer.run()


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(PeerkitError, match="ws://"):
        Peer("http://localhost:1")
    with pytest.raises(PeerkitError, match="peer_id"):
        Peer("ws://127.0.0.1:1", "")
    with pytest.raises(PeerkitError, match="grace_period"):
        Peer("ws://127.0.0.1:1", grace_period=-1)


async def test_shutdown_before_run_finishes_at_once() -> None:
    with trio.fail_after(5):
        peer = Peer("ws://127.0.0.1:1", "never")
        await peer.async_shutdown()
        assert peer.is_finished


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="peerkit")


class LateSender(Peer):
    async def _shutting_down(self) -> None:
        await self.send_message(Note(text="too late"))  # refused: shutdown has begun


async def test_refusal_after_shutdown_began_is_not_an_error(broker: Broker) -> None:
    """Code that races the shutdown gets ShuttingDownException; the peer ends cleanly."""
    with trio.fail_after(10):
        async with LateSender(broker.url, "late") as peer:
            pass
        assert peer.is_finished and peer.error is None


def test_subclass_cannot_shadow_the_lifecycle_state() -> None:
    with pytest.raises(TypeError, match="_state"):

        class Shadow(Peer):
            _state = "idle"

    class Clobber(Peer):
        def __init__(self) -> None:
            super().__init__("ws://127.0.0.1:1", "clobber")
            self._state = {"filter": "on"}  # type: ignore[assignment]

    with pytest.raises(AssertionError, match="not a PeerState"):
        Clobber()
