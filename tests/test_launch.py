"""The launcher: peers in-process and as subprocesses, failure policies, shutdown, signals."""

from __future__ import annotations

import functools
import io
import json
import os
import re
import signal
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import trio
import trio.testing
from launchhelpers import alive, launched, write_experiment
from launchpeers import Sleeper, Tick

import peerkit.launch.launcher
from peerkit import Broker, Peer
from peerkit.experiment import load_experiment
from peerkit.launch import Launcher, current_run_dir
from peerkit.launch._status import LogView, PeerRow, TerminalView, format_table
from peerkit.messages import (
    PanickMsg,
    PeerControlMessage,
    PeerJoined,
    PeerLeft,
    PeerStateChanged,
)
from peerkit.testing import wait_for_condition

TICK = """
    [peers.ticker]
    class = "launchpeers:Ticker"
    [peers.ticker.local_params]
    rate = 100

    [peers.counter]
    class = "launchpeers:Counter"
    [peers.counter.config_sources]
    src = "ticker"
    [peers.counter.launch_dependencies]
    src = "ticker"
"""


@pytest.mark.parametrize("inprocess", [True, False], ids=["inprocess", "subprocess"])
async def test_launch_runs_peers_and_stops_cleanly(tmp_path: Path, inprocess: bool) -> None:
    with trio.fail_after(30):
        async with launched(tmp_path, TICK, inprocess=inprocess) as run:
            await run.launcher.running.wait()
            await run.wait(lambda lr: all(r.state == "running" for r in lr.peers.values()))
            if inprocess:
                counter = run.peers["counter"].peer
                await run.wait(lambda lr: counter.count >= 10)  # type: ignore[union-attr]
                assert run.pids() == []
            else:
                pids = run.pids()
                assert len(pids) == 2 and all(alive(pid) for pid in pids)
                # the counter receives ticks: the broker counts what it sends to it
                await run.wait(lambda lr: lr.peers["counter"].rate_in > 10)
            run.launcher.stop("enough")
            assert await run.result() == 0
        text = run.text()
        assert "all peers ready" in text and "all peers started" in text
        assert "stopping: enough" in text
        # reverse dependency order
        assert text.index("counter: finished") < text.index("ticker: finished")
        assert all(r.state == "finished" for r in run.peers.values())
        logs = {p.name for p in (tmp_path / "run").iterdir()}
        assert {"launcher.log", "ticker.log", "counter.log"} <= logs


async def test_the_launcher_follows_state_events_and_counts_custom_states_by_base(
    tmp_path: Path,
) -> None:
    """No look at the broker between two samples of the rates (an hour apart here): every
    state reaches the launcher as the broker's event. ``warming_up`` counts as ready."""
    text = """
        [peers.warm]
        class = "launchpeers:WarmingUp"
        [peers.sleeper]
        class = "launchpeers:Sleeper"
    """
    with trio.fail_after(30):
        async with launched(tmp_path, text, inprocess=True, status_interval=3600) as run:
            await run.launcher.running.wait()  # ready by its base: started
            warm = run.peers["warm"]
            await run.wait(lambda lr: warm.state == "running")
            assert run.launcher.broker_url is not None
            async with Peer(run.launcher.broker_url, "tester") as tester:
                action = PeerControlMessage(peer_id="warm", action="warm_up")
                await tester.ask_peer("warm", action, timeout=5)
                await run.wait(lambda lr: warm.state == "warming_up")
                assert warm.base == "ready" and warm.is_ready
                await tester.ask_peer("warm", PeerControlMessage(peer_id="warm", action="start"))
                await run.wait(lambda lr: warm.state == "running")
            run.launcher.stop()
            assert await run.result() == 0
        text = run.text()
        assert "warm: warming_up (counts as ready)" in text
        assert text.index("warm: warming_up (counts as ready)") < text.index("all peers ready")
        assert "warm: ready\n" in text  # on its way back to warming_up: every state is told


async def test_duration_ends_the_run(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with launched(tmp_path, TICK, inprocess=True, duration=0.3) as run:
            assert await run.result() == 0
        assert "the duration of 0.3 s is over" in run.text()


async def test_essential_failure_stops_everything(tmp_path: Path) -> None:
    text = """
        [peers.ticker]
        class = "launchpeers:Ticker"
        [peers.sleeper]
        class = "launchpeers:Sleeper"
        [peers.crasher]
        class = "launchpeers:Crasher"
        launch_dependencies = ["ticker"]
    """
    with trio.fail_after(30):
        async with launched(tmp_path, text) as run:
            assert await run.result() == 1
            pids = run.pids()
        assert run.launcher.failure is not None
        assert "essential peer 'crasher' failed" in run.launcher.failure
        assert "boom" in run.launcher.failure
        assert run.peers["crasher"].state == "failed"
        assert run.peers["sleeper"].state == "finished"
        assert run.peers["ticker"].state == "finished"
        assert len(pids) == 3 and not any(alive(pid) for pid in pids)
        assert "FAILED: essential peer 'crasher' failed" in run.text()
        assert "exit status 1" in run.text()


async def test_non_essential_failure_lets_the_rest_run(tmp_path: Path) -> None:
    text = (
        TICK
        + """
        [peers.crasher]
        class = "launchpeers:Crasher"
        essential = false
    """
    )
    with trio.fail_after(30):
        async with launched(tmp_path, text) as run:
            await run.wait(lambda lr: lr.peers["crasher"].failed)
            assert "boom" in run.peers["crasher"].error
            await run.launcher.running.wait()
            # the others still run: ticks keep flowing to a new subscriber
            assert run.launcher.broker_url is not None
            async with (
                Peer(run.launcher.broker_url, "observer") as observer,
                observer.subscription(Tick, sender="ticker") as ticks,
            ):
                await ticks.receive()
            assert run.peers["ticker"].state == "running"
            assert run.peers["counter"].state == "running"
            assert all(alive(run.peers[p].pid or 0) for p in ("ticker", "counter"))
            run.launcher.stop()
            assert await run.result() == 0
        assert "crasher is not essential; the experiment goes on" in run.text()


@pytest.mark.parametrize("essential", [True, False])
async def test_kill_9_of_a_peer_process(tmp_path: Path, essential: bool) -> None:
    text = f"""
        [peers.victim]
        class = "launchpeers:Sleeper"
        essential = {str(essential).lower()}
        [peers.witness]
        class = "launchpeers:Sleeper"
    """
    with trio.fail_after(30):
        async with launched(tmp_path, text) as run:
            await run.launcher.running.wait()
            victim = run.peers["victim"]
            assert victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)
            await run.wait(lambda lr: victim.failed)
            assert "SIGKILL" in victim.error or "connection lost" in victim.error
            if essential:
                assert await run.result() == 1
                assert run.peers["witness"].state == "finished"
            else:
                witness = run.peers["witness"]
                await run.wait(lambda lr: victim.has_exited)
                assert witness.state == "running" and alive(witness.pid or 0)
                assert not run.done.is_set()
                run.launcher.stop()
                assert await run.result() == 0
            pids = run.pids()
        assert not any(alive(pid) for pid in pids)


async def test_a_frozen_peer_dropped_by_the_broker_fails_after_ready_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker drops a frozen peer (a PanickMsg for its lost connection): the launcher
    shows it disconnected and gives it ready_timeout to reconnect or end; then it failed."""
    quick = functools.partial(Broker, heartbeat_interval=0.2, heartbeat_timeout=1.0)
    monkeypatch.setattr(peerkit.launch.launcher, "Broker", quick)
    text = """
        [peers.frozen]
        class = "launchpeers:Sleeper"
        essential = false
        [peers.witness]
        class = "launchpeers:Sleeper"
    """
    with trio.fail_after(40):
        async with launched(tmp_path, text, ready_timeout=2.0) as run:
            await run.launcher.running.wait()
            frozen = run.peers["frozen"]
            assert frozen.pid is not None
            os.kill(frozen.pid, signal.SIGSTOP)
            try:
                await run.wait(lambda lr: frozen.lost, 10)
                assert frozen.state == "disconnected" and not frozen.failed
                await run.wait(lambda lr: frozen.failed, 10)
            finally:
                os.kill(frozen.pid, signal.SIGCONT)
            assert "did not reconnect within 2 s: PeerLost: peer 'frozen' " in frozen.error
            assert run.peers["witness"].state == "running"
            run.launcher.stop()
            assert await run.result() == 0


async def test_a_peer_that_reconnects_is_not_a_failure(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """What the broker publishes when a peer's connection drops and the peer resumes
    (PanickMsg of error type PeerLost, PeerLeft, then PeerJoined(resumed=True)), handed to
    the launcher as its peer receives them."""
    text = '[peers.amp]\nclass = "launchpeers:Sleeper"\n'
    with trio.fail_after(60):
        async with launched(tmp_path, text, inprocess=True) as run:
            await run.launcher.running.wait()
            amp, launcher = run.peers["amp"], run.launcher
            launcher._on_panick(
                PanickMsg(
                    message="peer 'amp' connection lost without goodbye",
                    error_type="PeerLost",
                    sender="amp",
                )
            )
            launcher._on_left(
                PeerLeft(
                    reason="connection lost without goodbye",
                    clean=False,
                    peer_id="amp",
                    sender="amp",
                )
            )
            assert amp.lost and amp.state == "disconnected" and not amp.is_ready
            await trio.sleep(5)  # less than ready_timeout (15 s here)
            launcher._on_joined(PeerJoined(peer_id="amp", resumed=True, sender="amp"))
            launcher._on_state(
                PeerStateChanged(
                    peer_id="amp", old="initializing", new="running", base="running", sender="amp"
                )
            )
            await trio.sleep(30)  # past ready_timeout: it came back, nothing happens
            assert amp.state == "running" and not amp.failed and not amp.lost
            assert not run.done.is_set()
            run.launcher.stop()
            assert await run.result() == 0
        assert "amp: disconnected (connection lost without goodbye)" in run.text()
        assert "amp: reconnected" in run.text()


async def test_ready_timeout_names_the_peers_and_why(tmp_path: Path) -> None:
    text = """
        [peers.slow]
        class = "launchpeers:NeverReady"
        [peers.waiter]
        class = "launchpeers:Counter"
        launch_dependencies = ["slow"]
    """
    with trio.fail_after(20):
        async with launched(tmp_path, text, inprocess=True, ready_timeout=0.5) as run:
            assert await run.result() == 1
        failure = run.launcher.failure
        assert failure is not None
        assert failure.startswith("not ready within 0.5 s: ")
        assert "slow (connected): peer 'slow' is registered but not ready yet" in failure
        assert "waiter (connected): waiter → slow: " in failure


async def test_a_peer_that_ignores_the_stop_is_killed(tmp_path: Path) -> None:
    text = """
        [peers.stubborn]
        class = "launchpeers:Stubborn"
        essential = false
        [peers.sleeper]
        class = "launchpeers:Sleeper"
    """
    with trio.fail_after(30):
        async with launched(tmp_path, text, grace_period=0.5) as run:
            await run.launcher.running.wait()
            pids = run.pids()
            run.launcher.stop()
            assert await run.result() == 0
        assert run.peers["stubborn"].state == "killed"
        assert "stubborn: still running after 0.5 s, killing it" in run.text()
        assert not any(alive(pid) for pid in pids)


async def test_peers_see_the_run_directory_in_both_modes(tmp_path: Path) -> None:
    text = """
        [peers.here]
        class = "launchpeers:Sleeper"
        mode = "inprocess"
        [peers.there]
        class = "launchpeers:Sleeper"
    """
    with trio.fail_after(20):
        async with launched(tmp_path, text) as run:
            await run.launcher.running.wait()
            here = run.peers["here"]
            assert here.pid is None and run.peers["there"].pid is not None
            assert isinstance(here.peer, Sleeper) and here.peer.run_dir == tmp_path / "run"
    assert f"there: run directory {tmp_path / 'run'}" in (tmp_path / "run/there.log").read_text()
    # the in-process peer's log lines go to its own file, not the launcher's
    assert f"here: run directory {tmp_path / 'run'}" in (tmp_path / "run/here.log").read_text()
    assert "here: run directory" not in (tmp_path / "run/launcher.log").read_text()
    # ...and the launcher's own lines about it go to the launcher's file
    assert "here: started in this process" in (tmp_path / "run/launcher.log").read_text()
    assert "peerkit.launch" not in (tmp_path / "run/here.log").read_text()
    assert current_run_dir() is None


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_a_signal_to_the_launcher_stops_cleanly(tmp_path: Path, signum: int) -> None:
    path = write_experiment(tmp_path, TICK)
    cmd = [sys.executable, "-m", "peerkit", "launch", str(path), "--view", "log"]
    cmd += ["--run-dir", str(tmp_path / "run")]
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path
        )
        assert process.stdout is not None
        output = b""
        pids: list[int] = []
        try:
            while b"all peers started" not in output:
                chunk = await process.stdout.receive_some()
                assert chunk, output.decode()
                output += chunk
            pids = [int(p) for p in re.findall(rb"started process (\d+)", output)]
            assert len(pids) == 2 and all(alive(pid) for pid in pids)
            process.send_signal(signum)
            async for chunk in process.stdout:
                output += chunk
            assert await process.wait() == 0, output.decode()
        finally:
            if process.returncode is None:  # the test failed: leave nothing behind
                process.kill()
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                await process.wait()
    text = output.decode()
    assert f"stopping: {signal.Signals(signum).name} received" in text
    assert "exit status 0" in text
    assert "counter: finished (exit status 0)" in text and "ticker: finished" in text
    assert not any(alive(pid) for pid in pids)


async def test_a_broker_that_cannot_listen_is_a_clear_failure(tmp_path: Path) -> None:
    with trio.fail_after(20):
        taken = trio.socket.socket()
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = f'[broker]\nport = {port}\n[peers.a]\nclass = "launchpeers:Sleeper"\n'
        with taken:
            async with launched(tmp_path, text) as run:
                assert await run.result() == 1
    assert run.launcher.failure is not None and "OSError" in run.launcher.failure
    assert run.peers["a"].state == "pending" and run.pids() == []


@pytest.mark.parametrize("inprocess", [True, False], ids=["inprocess", "subprocess"])
async def test_the_demo_records_without_gaps(tmp_path: Path, inprocess: bool) -> None:
    demo = load_experiment(Path(__file__).parent.parent / "examples" / "demo.toml")
    launcher = Launcher(
        demo, duration=1.0, inprocess=inprocess, run_dir=tmp_path, out=io.StringIO(), view="log"
    )
    with trio.fail_after(30):
        assert await launcher.run() == 0
    report = json.loads((tmp_path / "recording.json").read_text())
    assert report["gaps"] == 0 and report["lost_chunks"] == 0
    assert report["first_seq"] == 0 and report["channel_count"] == 32
    assert report["sampling_rate"] == 512  # external parameter, through the filter
    assert report["samples"] >= 256
    assert (tmp_path / "recording.f32").stat().st_size == report["samples"] * 32 * 4
    assert "0 gaps (0 chunks lost)" in (tmp_path / "recorder.log").read_text()


async def test_the_status_shows_state_rates_and_last_error(tmp_path: Path) -> None:
    text = (
        TICK
        + """
        [peers.crasher]
        class = "launchpeers:Crasher"
        essential = false
        mode = "inprocess"
    """
    )
    with trio.fail_after(30):
        async with launched(tmp_path, text) as run:
            await run.wait(lambda lr: lr.peers["crasher"].failed and lr.running.is_set())
            # the rates are measured over a second of broker counts
            # the rates are sampled at their own pace: wait until both show traffic
            await run.wait(
                lambda lr: lr.peers["counter"].rate_in > 10 and lr.peers["ticker"].rate_out > 10
            )
            rows = {row.peer_id: row for row in run.launcher.rows()}
            assert rows["ticker"].state == rows["counter"].state == "running"
            assert rows["ticker"].rate_out > 10 and rows["counter"].rate_in > 10
            assert rows["crasher"].state == "failed" and "boom" in rows["crasher"].last_error
            assert not rows["crasher"].essential
            lines = format_table(list(rows.values()), width=200)
            assert lines[0].split() == [
                "PEER",
                "PID",
                "STATE",
                "IN/s",
                "OUT/s",
                "DROPPED",
                "RESTARTS",
                "LAST",
                "ERROR",
            ]
            crasher_line = next(line for line in lines if line.startswith("crasher (n/e)"))
            assert "failed" in crasher_line and "boom" in crasher_line


def test_terminal_view_redraws_in_place_and_log_view_prints_lines() -> None:
    rows = [
        PeerRow("amp", "running", pid=12, rate_in=1.0, rate_out=16.0),
        PeerRow("rec", "failed", rate_in=16.0, essential=False, last_error="OSError: disk full"),
    ]
    out = io.StringIO()
    view = TerminalView(out)
    view.update(1.0, "demo: running", rows)
    view.event(1.5, "rec: FAILED")
    view.update(2.0, "demo: running", rows)
    view.close()
    text = out.getvalue()
    # the 5-line block (blank, title, header, 2 rows) is erased before each redraw
    assert text.count("\x1b[5F\x1b[J") == 2
    assert "[    1.5s] rec: FAILED\n" in text
    amp = next(line for line in text.splitlines() if line.startswith("amp "))
    assert amp.split() == ["amp", "12", "running", "1.0", "16", "0", "0"]
    assert "rec (n/e)" in text and "OSError: disk full" in text

    out = io.StringIO()
    log_view = LogView(out, summary_interval=1.0)
    log_view.update(0.0, "demo", rows)  # the first summary comes one interval later
    log_view.update(1.0, "demo", rows)
    assert "\x1b" not in out.getvalue()
    assert out.getvalue() == (
        "[    1.0s] status: amp running in 1.0/s out 16/s; rec failed in 16/s out 0/s\n"
    )


def test_the_view_degrades_to_log_lines_when_not_a_terminal(tmp_path: Path) -> None:
    exp = load_experiment(write_experiment(tmp_path, TICK))
    assert isinstance(Launcher(exp, out=io.StringIO()).view, LogView)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(Launcher(exp, out=Tty()).view, TerminalView)


async def test_launch_with_the_dashboard_serves_the_page(tmp_path: Path) -> None:
    """``--dashboard``: the page is served beside the broker while the experiment runs,
    and its address is printed; the recorder reports the end-to-end latency."""
    demo = load_experiment(Path(__file__).parent.parent / "examples" / "demo.toml")
    out = io.StringIO()
    launcher = Launcher(
        demo, duration=1.5, inprocess=True, run_dir=tmp_path, out=out, view="log", dashboard=True
    )
    pages: list[bytes] = []

    async def fetch_the_page() -> None:
        await wait_for_condition(lambda: launcher.dashboard_url is not None, 20)
        assert launcher.dashboard_url is not None
        url = urllib.parse.urlsplit(launcher.dashboard_url)
        stream = await trio.open_tcp_stream(url.hostname or "127.0.0.1", url.port or 80)
        async with stream:
            await stream.send_all(
                f"GET {url.path or '/'} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
            pages.append(data)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch_the_page)
            assert await launcher.run() == 0
    (page,) = pages
    assert page.startswith(b"HTTP/1.1 200") and b"peerkit" in page
    assert f"dashboard: open {launcher.dashboard_url}" in out.getvalue()
    report = json.loads((tmp_path / "recording.json").read_text())
    latency = report["latency_ms"]
    assert 0 < latency["median"] <= latency["p99"] <= latency["max"]
