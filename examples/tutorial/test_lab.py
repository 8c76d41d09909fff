"""Tests of the tutorial's peers (docs/tutorial.rst), with peerkit's pytest plugin.

Run them with ``python -m pytest test_lab.py`` (pytest and pytest-trio installed).
"""

from __future__ import annotations

import pytest
import trio
from lab import GetSummary, Monitor, Reading, Summary, Thermometer

from peerkit import ConfigServer
from peerkit.testing import PeerFactory, wait_for_condition

pytestmark = pytest.mark.trio


async def test_monitor_sums_up_what_it_received(
    peerkit_config_server: ConfigServer, peerkit_peer: PeerFactory
) -> None:
    with trio.fail_after(10):
        monitor = await peerkit_peer(Monitor, "monitor")
        sensor = await peerkit_peer(peer_id="sensor")
        await monitor.wait_for_state(lambda p: p.is_running, 5)
        for celsius in (21.0, 23.5, 22.0):
            await sensor.send_message(Reading(celsius=celsius))
        await wait_for_condition(lambda: len(monitor.readings) == 3)
        summary = await sensor.ask_peer("monitor", GetSummary())
    assert summary == Summary(sender="monitor", count=3, highest=23.5)


async def test_thermometer_readings_rise(
    peerkit_config_server: ConfigServer, peerkit_peer: PeerFactory, autojump_clock: object
) -> None:
    with trio.fail_after(10):
        listener = await peerkit_peer(peer_id="listener")
        async with listener.subscription(Reading) as readings:
            await peerkit_peer(Thermometer, "thermometer", local_params={"rise": 1.5})
            got = [(await readings.receive()).celsius for _ in range(3)]
    assert got == [21.0, 22.5, 24.0]


async def test_monitor_warns_above_its_alarm(
    peerkit_config_server: ConfigServer, peerkit_peer: PeerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        monitor = await peerkit_peer(Monitor, "monitor", local_params={"alarm_above": 22.0})
        sensor = await peerkit_peer(peer_id="sensor")
        await monitor.wait_for_state(lambda p: p.is_running, 5)
        await sensor.send_message(Reading(celsius=21.5))
        await sensor.send_message(Reading(celsius=22.5))
        await wait_for_condition(lambda: len(monitor.readings) == 2)
    warnings = [r.getMessage() for r in caplog.records if r.name == "lab"]
    assert warnings == ["sensor: 22.5 C is above 22.0 C"]
