"""The peers of the restarts example (``examples/restarts.toml``).

* :class:`FlakySensor` publishes a :class:`Reading` ``rate`` times a second while running; in
  each of its first ``crash_runs`` runs it dies of an error after ``crash_after`` readings
  (a simulated hardware fault). The launcher restarts it (``restart = "on-failure"``).
* :class:`Logbook` records the sensor's readings, run by run, and its state events
  (``PeerJoined``, ``PeerStateChanged``, ``PeerLeft``, which the broker publishes on the
  sensor's behalf), and writes them to ``logbook.json`` in the run directory at shutdown.

Run it with::

    peerkit launch examples/restarts.toml --duration 10
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from peerkit import ConfiguredPeer, Message, message, param
from peerkit.launch import current_run_dir
from peerkit.messages import PeerJoined, PeerLeft, PeerStateChanged

log = logging.getLogger("restart_peers")


@message
class Reading(Message):
    """One reading of the sensor; ``run`` counts the sensor's runs (1, 2, ...)."""

    run: int
    seq: int
    value: float


def _run_dir() -> Path:
    return current_run_dir() or Path.cwd()


class FlakySensor(ConfiguredPeer):
    """Publishes readings; its first ``crash_runs`` runs crash after ``crash_after`` of them.

    It counts its runs in ``<run dir>/<peer_id>.runs``: a restarted process is a new
    process, so the count has to live outside it.
    """

    rate: float = param(20.0, doc="readings per second")
    crash_after: int = param(10, doc="readings before a crash, in the runs that crash")
    crash_runs: int = param(2, doc="how many runs crash (the first ones)")

    run_number = 0

    async def _dependencies_are_ready(self) -> None:
        runs = _run_dir() / f"{self.peer_id}.runs"
        self.run_number = len(runs.read_text().splitlines()) + 1 if runs.exists() else 1
        with runs.open("a") as f:
            f.write(f"{self.run_number}\n")
        log.info("%s: run %d", self.peer_id, self.run_number)

    async def _start(self) -> None:
        self.create_task(self._measure)

    async def _measure(self) -> None:
        seq = 0
        while True:
            await self.send_message(Reading(run=self.run_number, seq=seq, value=seq / self.rate))
            seq += 1
            if self.run_number <= self.crash_runs and seq == self.crash_after:
                raise RuntimeError(f"sensor fault (simulated) after {seq} readings")
            await trio.sleep(1 / self.rate)


class Logbook(ConfiguredPeer):
    """Records the readings of the peer bound to the config source ``sensor``, per run,
    and that peer's state events; writes ``logbook.json`` at shutdown."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.readings: Counter[int] = Counter()
        self.events: list[str] = []

    async def _dependencies_are_ready(self) -> None:
        sensor = self.config.config_sources.get("sensor", "sensor")
        await self.subscribe_for_specific_msg_subtype(Reading, sensor, self._on_reading)
        # the broker publishes these on the sensor's behalf: a sender filter picks its own
        await self.subscribe_for_specific_msg_subtype(PeerJoined, sensor, self._on_event)
        await self.subscribe_for_specific_msg_subtype(PeerStateChanged, sensor, self._on_event)
        await self.subscribe_for_specific_msg_subtype(PeerLeft, sensor, self._on_event)

    def _on_reading(self, msg: Reading) -> None:
        if msg.run not in self.readings:
            log.info("first reading of %s's run %d", msg.sender, msg.run)
        self.readings[msg.run] += 1

    def _on_event(self, msg: PeerJoined | PeerStateChanged | PeerLeft) -> None:
        if isinstance(msg, PeerJoined):
            text = "joined"
        elif isinstance(msg, PeerStateChanged):
            text = f"{msg.old} -> {msg.new}"
        else:
            text = "left" + ("" if msg.clean else f" ({msg.reason})")
        self.events.append(f"{msg.sender}: {text}")
        log.info("%s: %s", msg.sender, text)

    async def _shutting_down(self) -> None:
        report = {
            "readings_per_run": {str(run): n for run, n in sorted(self.readings.items())},
            "events": self.events,
        }
        (_run_dir() / "logbook.json").write_text(json.dumps(report, indent=2) + "\n")
        await super()._shutting_down()
