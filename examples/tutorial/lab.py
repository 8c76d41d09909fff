"""The tutorial's peers (docs/tutorial.rst): a thermometer publishes readings, a monitor
keeps them, warns about high ones and answers questions about them."""

from __future__ import annotations

import logging
from typing import Any

import trio

from peerkit import ConfiguredPeer, Message, message, param, query_handler, subscribe

log = logging.getLogger("lab")


@message
class Reading(Message):
    """A temperature; ``sender`` says which thermometer measured it."""

    celsius: float


@message
class GetSummary(Message):
    """A question for the monitor: what have you seen?"""


@message
class Summary(Message):
    """The monitor's answer."""

    count: int
    highest: float | None


class Monitor(ConfiguredPeer):
    """Keeps every reading, warns about those above ``alarm_above`` and answers
    :class:`GetSummary` queries."""

    alarm_above: float = param(25.0, doc="warn about readings above this (degrees Celsius)")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.readings: list[float] = []

    @subscribe(Reading)
    def on_reading(self, msg: Reading) -> None:
        self.readings.append(msg.celsius)
        if msg.celsius > self.alarm_above:
            log.warning("%s: %.1f C is above %.1f C", msg.sender, msg.celsius, self.alarm_above)

    @query_handler(GetSummary)
    def summary(self, msg: GetSummary) -> Summary:
        return Summary(count=len(self.readings), highest=max(self.readings, default=None))

    async def _control_action(self, action: str) -> None:
        if action == "reset":  # peerkit ctl reset monitor
            self.readings.clear()
        else:
            await super()._control_action(action)

    async def _shutting_down(self) -> None:
        log.info("kept %d readings", len(self.readings))


class Thermometer(ConfiguredPeer):
    """Publishes a :class:`Reading` every ``interval`` seconds while it is running, each
    ``rise`` degrees warmer than the one before."""

    interval: float = param(1.0, doc="seconds between two readings")
    celsius: float = param(21.0, doc="the first reading")
    rise: float = param(0.5, doc="how much warmer each reading is")

    async def _start(self) -> None:
        self._measuring = trio.CancelScope()
        self.create_task(self.measure, self._measuring)

    async def _stop(self) -> None:
        self._measuring.cancel()

    async def measure(self, scope: trio.CancelScope) -> None:
        with scope:
            celsius = self.celsius
            while True:
                await self.send_message(Reading(celsius=celsius))
                celsius += self.rise
                await trio.sleep(self.interval)
