"""Smoke tests of the benchmark harness (no speed is asserted here; run `nox -s bench`)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import trio

from peerkit import bench


def test_help_runs_as_a_module() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "peerkit.bench", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    for option in ("--runs", "--quick", "--json", "--only"):
        assert option in out.stdout


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--only", "nonsense"])
    assert exc.value.code == 2
    assert bench.main(["worker", "no-such-role", "{}"]) == 2


def test_payload_round_trip() -> None:
    payload = bench.make_payload(7, 123_456, 100, 1.5)
    assert len(payload) == 100
    assert bench.read_payload(payload) == (7, 123_456, 1.5)
    assert len(bench.make_payload(1, 2, 8192)) == 8192


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 50) == 50.0
    assert bench.percentile(values, 99) == 99.0
    assert bench.percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError):
        bench.percentile([], 50)


def test_run_counter_counts_order_and_stale_messages() -> None:
    counter = bench.RunCounter()
    counter.arm(2, expected=4, latency=True)
    for seq in (0, 1, 3, 2):  # a gap (a drop) is fine, going back is not
        counter.feed(bench.make_payload(2, seq, 100))
    counter.feed(bench.make_payload(1, 9, 100))  # left over from an earlier run
    res = counter.result(dropped=1, complete=True)
    assert res["count"] == 4
    assert res["out_of_order"] == 1
    assert res["stale"] == 1
    assert res["dropped"] == 1
    assert res["last"] >= res["first"] > 0
    assert "lat_median_ms" in res


def test_table_shows_targets_and_whether_they_are_met() -> None:
    figures = [
        bench.Figure("fast", "msgs/s", [10.0, 30.0, 20.0], target=(">=", 15.0)),
        bench.Figure("slow", "ms", [2.0], target=("<=", 1.5), digits=3),
        bench.Figure("check", "", ok=True, text="yes"),
    ]
    assert figures[0].value == 20.0 and figures[0].met is True
    assert figures[1].met is False
    lines = bench.format_table(figures).splitlines()
    assert len(lines) == 5
    assert "≥ 15" in lines[2] and "yes" in lines[2] and "10 30 20" in lines[2]
    assert "2.000" in lines[3] and "NO" in lines[3]
    # aligned: the unit column starts at the same place on every line
    assert lines[0].index("unit") == lines[2].index("msgs/s") == lines[3].index("ms ")


class _StubControl:
    """A bench worker's control, in-process: commands from a channel, events into a list."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.changed = trio.Event()
        self._send, self._recv = trio.open_memory_channel[dict[str, Any]](10)

    async def next(self) -> dict[str, Any]:
        return await self._recv.receive()

    def emit(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, **fields})
        self.changed.set()
        self.changed = trio.Event()

    async def expect(self, event: str) -> dict[str, Any]:
        while True:
            for e in self.events:
                if e["event"] == event:
                    self.events.remove(e)
                    return e
            await self.changed.wait()

    async def send(self, **cmd: Any) -> None:
        await self._send.send(cmd)


async def test_query_workers_make_round_trips_through_the_broker_and_the_bare_relay() -> None:
    """The query group's workers (broker, handler, asker; bare relay, echo, asker), run in
    one process here, answer every asker with its own bytes, intact, in turns."""
    from peerkit.bench._workers import _ROLES

    with trio.fail_after(30):
        broker, relay, handler, echo, asker, bare = (_StubControl() for _ in range(6))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_ROLES["broker"], {}, broker)
            nursery.start_soon(_ROLES["relay"], {}, relay)
            url = (await broker.expect("ready"))["url"]
            relay_url = (await relay.expect("ready"))["url"]
            nursery.start_soon(_ROLES["qhandler"], {"url": url, "peer_id": "h"}, handler)
            nursery.start_soon(_ROLES["bare_echo"], {"url": relay_url}, echo)
            for ctl in (handler, echo):
                await ctl.expect("ready")
            nursery.start_soon(_ROLES["asker"], {"url": url, "peer_id": "a"}, asker)
            nursery.start_soon(_ROLES["bare_asker"], {"url": relay_url}, bare)
            for ctl in (asker, bare):
                await ctl.expect("ready")
            for turn in range(3):
                for ctl in (asker, bare):
                    # the asker checks each reply against its payload (or raises)
                    await ctl.send(cmd="query", run=turn + 1, count=50, size=100)
                    result = await ctl.expect("result")
                    assert result["count"] == 50
                    assert 0 < result["median_ms"] <= result["max_ms"]
            nursery.cancel_scope.cancel()
