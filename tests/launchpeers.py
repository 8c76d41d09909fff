"""Peers for the launcher and CLI tests (imported as ``launchpeers:Class``).

The tests copy this file next to their experiment files, so that launched peer processes
import it from the experiment's directory, as users' peers do.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from peerkit import ConfiguredPeer, CustomState, Message, Peer, PeerState, message, param, subscribe
from peerkit.launch import current_run_dir

log = logging.getLogger("launchpeers")


@message
class Tick(Message):
    n: int


class Ticker(ConfiguredPeer):
    """Publishes ``Tick`` messages at ``rate`` per second while running."""

    rate: float = param(50.0)

    async def _start(self) -> None:
        self.create_task(self._tick)

    async def _tick(self) -> None:
        n = 0
        while True:
            await self.send_message(Tick(n=n))
            n += 1
            await trio.sleep(1 / self.rate)


class Counter(ConfiguredPeer):
    """Counts the ``Tick`` messages of the peer bound to the config source ``src``."""

    count = 0

    async def _dependencies_are_ready(self) -> None:
        source = self.config.config_sources.get("src", "ticker")
        await self.subscribe_for_specific_msg_subtype(Tick, source, self._on_tick)

    def _on_tick(self, msg: Tick) -> None:
        self.count += 1


class Crasher(ConfiguredPeer):
    """Dies of ``RuntimeError("boom")`` as soon as it is started."""

    message: str = param("boom")

    async def _start(self) -> None:
        self.create_task(self._boom)

    async def _boom(self) -> None:
        raise RuntimeError(self.message)


class Sleeper(Peer):
    """A plain peer that does nothing but live (it logs the run directory when started)."""

    run_dir: Path | None = None

    async def _start(self) -> None:
        self.run_dir = current_run_dir()
        log.info("%s: run directory %s", self.peer_id, self.run_dir)


class NeverReady(ConfiguredPeer):
    """Never gets past its dependencies hook: it stays ``connected``."""

    async def _dependencies_are_ready(self) -> None:
        await trio.sleep_forever()


class Stubborn(Peer):
    """Takes its whole grace period (and more) to shut down."""

    async def _shutting_down(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.sleep(30)


@message
class Crash(Message):
    """Tells the :class:`OnDemand` peer ``peer_id`` to die of an error (or, ``clean``, to
    shut down cleanly)."""

    peer_id: str
    clean: bool = False


class OnDemand(ConfiguredPeer):
    """Runs until a ``Crash`` message for it arrives; its first ``crash_runs`` runs die of
    ``RuntimeError`` by themselves as soon as they are started (``crash_at = "start"``) or
    before they get ready (``"ready"``).

    Each run appends a line to ``<run dir>/<peer_id>.runs``: the run's number and trio's
    clock (the test's, for an in-process peer), so tests count the runs and time them.
    """

    label: str = param("default")
    crash_runs: int = param(0)
    crash_at: str = param("start")

    run_number = 0

    async def _dependencies_are_ready(self) -> None:
        run_dir = current_run_dir()
        assert run_dir is not None
        runs = run_dir / f"{self.peer_id}.runs"
        self.run_number = len(runs.read_text().splitlines()) + 1 if runs.exists() else 1
        with runs.open("a") as f:
            f.write(f"{self.run_number} {trio.current_time()!r}\n")
        log.info("%s: run %d, label %s", self.peer_id, self.run_number, self.label)
        if self.crash_at == "ready" and self.run_number <= self.crash_runs:
            raise RuntimeError(f"run {self.run_number} crashed before it was ready")

    async def _start(self) -> None:
        if self.crash_at == "start" and self.run_number <= self.crash_runs:
            self.create_task(self._boom)

    async def _boom(self) -> None:
        raise RuntimeError(f"run {self.run_number} crashed as told")

    @subscribe(Crash)
    async def _on_crash(self, msg: Crash) -> None:
        if msg.peer_id != self.peer_id:
            return
        if msg.clean:
            await self.async_shutdown()
        else:
            raise RuntimeError(f"run {self.run_number} crashed on demand")


def runs(run_dir: Path, peer_id: str) -> list[float]:
    """The clock readings at which ``peer_id``'s runs began (see :class:`OnDemand`)."""
    path = run_dir / f"{peer_id}.runs"
    if not path.exists():
        return []
    return [float(line.split()[1]) for line in path.read_text().splitlines()]


WARMING_UP = CustomState("warming_up", counts_as=PeerState.ready)


class WarmingUp(Peer):
    """Never reports plain ``ready``: it goes from connected to its own ``warming_up``
    state, which counts as ready, and stays there until it is started. Its control action
    ``warm_up`` takes it from running back to ``warming_up``."""

    _VALID_STATES_TRANSITIONS_ = {
        **Peer._VALID_STATES_TRANSITIONS_,
        PeerState.connected: (PeerState.ready, PeerState.shutting_down, WARMING_UP),
        PeerState.ready: (PeerState.running, PeerState.shutting_down, WARMING_UP),
        WARMING_UP: (PeerState.ready, PeerState.running, PeerState.shutting_down),
    }

    async def _connections_established(self) -> None:
        self._state = WARMING_UP
        await trio.sleep_forever()  # ready by its base; the launcher starts it from here

    async def _control_action(self, action: str) -> None:
        if action != "warm_up":
            await super()._control_action(action)
            return
        self._state = PeerState.ready
        self._state = WARMING_UP
