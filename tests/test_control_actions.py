"""Control actions beyond start/stop/close, end to end with ``peerkit ctl``: any other
action goes to the peer's ``_control_action`` hook."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytest
import trio

from peerkit import Broker, Peer, PeerState
from peerkit.cli import main
from peerkit.errors import RemoteError
from peerkit.messages import OkMsg, PeerControlMessage
from peerkit.states import CustomState
from peerkit.testing import PeerFactory, wait_for_condition

log = logging.getLogger("peerkit.peer")

IMPEDANCE_CHECK = CustomState("impedance_check", counts_as=PeerState.connected)


class AmpMixin:
    """An amplifier with an impedance check, as a control action and a custom state."""

    _VALID_STATES_TRANSITIONS_ = {
        **Peer._VALID_STATES_TRANSITIONS_,
        PeerState.ready: (PeerState.running, PeerState.shutting_down, IMPEDANCE_CHECK),
        IMPEDANCE_CHECK: (PeerState.ready, PeerState.shutting_down),
    }

    def _init_amp(self) -> None:
        self.checks = 0
        self.seen: list[str] = []

    def _state_changed(self, old: Any, new: Any) -> None:
        super()._state_changed(old, new)  # type: ignore[misc]
        self.seen.append(str(new))

    async def _control_action(self, action: str) -> None:
        if action != "impedance_check":
            await super()._control_action(action)  # type: ignore[misc]
            return
        self._state = IMPEDANCE_CHECK
        await trio.sleep(0.01)  # measuring
        self.checks += 1
        self._state = PeerState.ready


class Amp(AmpMixin, Peer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_amp()


async def run_main(argv: Sequence[str]) -> int:
    """``peerkit ARGV`` in a worker thread (it runs its own trio loop)."""
    return await trio.to_thread.run_sync(main, list(argv))


async def _ctl_scenario(broker: Broker, nursery: trio.Nursery, cls: type[Amp], capsys: Any) -> None:
    amp = cls(broker.url, "amp", autostart=False, autoshutdown=False)
    await nursery.start(amp.run)
    await amp.wait_for_state(lambda p: p.is_ready, 5)
    capsys.readouterr()

    assert await run_main(["ctl", "impedance_check", "amp", "--broker", broker.url]) == 0
    assert "amp impedance_check: ready" in capsys.readouterr().out
    assert amp.checks == 1
    assert amp.seen[-2:] == ["impedance_check", "ready"]

    assert await run_main(["ctl", "explode", "amp", "--broker", broker.url]) == 1
    err = capsys.readouterr().err
    assert "peer 'amp' has no control action 'explode'" in err
    assert "overriding _control_action" in err
    assert amp.is_ready and not amp.is_shutting_down  # refusing an action is not fatal

    # the known actions act as before
    assert await run_main(["ctl", "start", "amp", "--broker", broker.url]) == 0
    assert amp.is_running
    assert await run_main(["ctl", "close", "amp", "--broker", broker.url]) == 0
    await amp.wait_finished()
    assert amp.error is None


async def test_custom_control_action_with_peerkit_ctl(
    broker: Broker, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(60):
        await _ctl_scenario(broker, nursery, Amp, capsys)


async def test_custom_action_by_query_and_by_publishing(
    peerkit_peer: PeerFactory, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(60):
        amp = await peerkit_peer(Amp, "amp", autostart=False, autoshutdown=False)
        boss = await peerkit_peer(peer_id="boss")
        await amp.wait_for_state(lambda p: p.is_ready, 5)

        answer = await boss.ask_peer(
            "amp", PeerControlMessage(peer_id="amp", action="impedance_check")
        )
        assert isinstance(answer, OkMsg)
        assert answer.detail == "amp impedance_check: ready"
        with pytest.raises(RemoteError, match="has no control action 'nope'") as info:
            await boss.ask_peer("amp", PeerControlMessage(peer_id="amp", action="nope"))
        assert info.value.error_type == "PeerkitError"

        # published: the action runs; an unknown one is logged, and the peer lives on
        await boss.send_message(PeerControlMessage(peer_id="amp", action="impedance_check"))
        await wait_for_condition(lambda: amp.checks == 2)
        await boss.send_message(PeerControlMessage(peer_id="amp", action="nope"))
        await boss.send_message(PeerControlMessage(peer_id="amp", action="impedance_check"))
        await wait_for_condition(lambda: amp.checks == 3)
        assert amp.is_ready and amp.error is None
