"""Peers for the launcher and CLI tests (imported as ``launchpeers:Class``).

The tests copy this file next to their experiment files, so that launched peer processes
import it from the experiment's directory, as users' peers do.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from peerkit import ConfiguredPeer, Message, Peer, message, param
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
