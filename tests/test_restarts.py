"""Supervised restarts: each restart policy, the restart budget and its window, the bounded
back-off, essential and non-essential peers, and a restarted peer's rejoining (its
configuration again, registered and ready with the config server, started again).

In-process runs use the autojump clock: the back-offs pass at once, and the clock readings
the peers write (``launchpeers.runs``) are the test's clock.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from launchhelpers import Run, alive, launched
from launchpeers import Crash, OnDemand, runs

from peerkit import Peer
from peerkit.config_messages import ConfigSnapshot, ConfigSnapshotQuery
from peerkit.experiment import RestartPolicy, load_experiment
from peerkit.launch import Launcher
from peerkit.launch._peers import RestartBudget


def experiment(worker: str, *, witness: bool = True) -> str:
    """A worker (``OnDemand``, label "again") with the restart keys ``worker`` and, unless
    told otherwise, an essential witness that keeps the experiment going."""
    text = f"""
        [peers.worker]
        class = "launchpeers:OnDemand"
        {worker}
        [peers.worker.local_params]
        label = "again"
    """
    if witness:
        text += """
        [peers.witness]
        class = "launchpeers:Sleeper"
        """
    return text


@asynccontextmanager
async def own_peer(run: Run) -> AsyncIterator[Peer]:
    """A peer of the test's own on the experiment's broker."""
    assert run.launcher.broker_url is not None
    async with Peer(run.launcher.broker_url, "tester") as peer:
        yield peer


async def crash(run: Run, peer_id: str = "worker", *, clean: bool = False) -> None:
    async with own_peer(run) as peer:
        await peer.send_message(Crash(peer_id=peer_id, clean=clean))


# ----------------------------------------------------------------------------- policies


@pytest.mark.parametrize(
    ("restart", "clean", "restarted"),
    [
        ("never", False, False),
        ("never", True, False),
        ("on-failure", False, True),
        ("on-failure", True, False),
        ("always", False, True),
        ("always", True, True),
    ],
)
async def test_each_policy(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    restart: str,
    clean: bool,
    restarted: bool,
) -> None:
    text = experiment(f'restart = "{restart}"\nessential = false')
    with trio.fail_after(60):
        async with launched(tmp_path, text, inprocess=True) as run:
            await run.launcher.running.wait()
            worker = run.peers["worker"]
            await crash(run, clean=clean)
            if restarted:
                await run.wait(lambda lr: worker.restarts == 1 and worker.state == "running")
                assert worker.peer is not None and worker.peer.is_running
            else:
                await run.wait(lambda lr: worker.has_exited)
                assert worker.restarts == 0
                assert worker.state == ("finished" if clean else "failed")
                assert worker.failed is not clean
            assert run.peers["witness"].state == "running" and not run.done.is_set()
            run.launcher.stop()
            assert await run.result() == 0
        assert len(runs(tmp_path / "run", "worker")) == (2 if restarted else 1)
        assert ("restarting in" in run.text()) is restarted


async def test_a_restarted_peer_gets_its_configuration_again_and_rejoins(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(60):
        async with launched(tmp_path, experiment('restart = "on-failure"'), inprocess=True) as run:
            await run.launcher.running.wait()
            worker = run.peers["worker"]
            first = worker.peer
            await crash(run)
            await run.wait(lambda lr: worker.restarts == 1 and worker.state == "running")
            second = worker.peer
            assert isinstance(second, OnDemand) and second is not first
            assert second.run_number == 2 and second.label == "again"
            assert "crashed on demand" in worker.error  # the last error stays shown
            async with own_peer(run) as peer:
                snapshot = await peer.query(ConfigSnapshotQuery())
            assert isinstance(snapshot, ConfigSnapshot)
            (info,) = [p for p in snapshot.peers if p.peer_id == "worker"]
            assert info.ready and info.params["label"] == "again"
            (row,) = [r for r in run.launcher.rows() if r.peer_id == "worker"]
            assert (row.restarts, row.state) == (1, "running")
            assert not run.done.is_set()  # an essential peer: restarted, not a failure
            run.launcher.stop()
            assert await run.result() == 0
        text = run.text()
        assert "worker: FAILED: panicked: RuntimeError: run 1 crashed on demand" in text
        assert "worker: restarting in 0.5 s (restart 1 of at most 3 within 60 s)" in text
        assert "worker: started in this process (restart 1)" in text
        assert "worker   finished, restarted once" in text


async def test_a_process_peer_is_restarted_as_a_new_process(tmp_path: Path) -> None:
    text = experiment('restart = "on-failure"\nrestart_delay = 0.1')
    with trio.fail_after(60):
        async with launched(tmp_path, text) as run:
            await run.launcher.running.wait()
            worker = run.peers["worker"]
            first = worker.pid
            await crash(run)
            await run.wait(lambda lr: worker.restarts == 1 and worker.state == "running", 30)
            assert first is not None and worker.pid not in (None, first)
            assert not alive(first)
            run.launcher.stop()
            assert await run.result() == 0
        assert len(run.all_pids()) == 3  # worker twice, witness once
        assert "worker: started process" in run.text()
        assert "(restart 1)" in run.text()
        assert "run 2, label again" in (tmp_path / "run" / "worker.log").read_text()


async def test_a_peer_restarted_before_the_experiment_starts_is_started_with_the_rest(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # its first run dies before it is ready: the launcher waits for the second to be ready
    worker = """restart = "on-failure"
        [peers.worker.local_params]
        crash_runs = 1
        crash_at = "ready"
    """
    text = experiment(worker).replace('[peers.worker.local_params]\n        label = "again"\n', "")
    with trio.fail_after(60):
        async with launched(tmp_path, text, inprocess=True) as run:
            await run.launcher.running.wait()
            worker_rec = run.peers["worker"]
            await run.wait(lambda lr: worker_rec.state == "running")
            assert worker_rec.restarts == 1 and run.launcher.failure is None
            run.launcher.stop()
            assert await run.result() == 0
        text = run.text()
        assert "run 1 crashed before it was ready" in text
        assert text.index("worker: restarting in") < text.index("all peers ready")


# ----------------------------------------------------------------------------- used up


@pytest.mark.parametrize("essential", [True, False])
async def test_restarts_used_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, essential: bool
) -> None:
    worker = f"""restart = "on-failure"
        max_restarts = 2
        essential = {str(essential).lower()}
        [peers.worker.local_params]
        crash_runs = 100
    """
    text = experiment(worker).replace('[peers.worker.local_params]\n        label = "again"\n', "")
    with trio.fail_after(60):
        async with launched(tmp_path, text, inprocess=True) as run:
            rec = run.peers["worker"]
            await run.wait(lambda lr: rec.failed)
            assert rec.restarts == 2 and rec.state == "failed"
            assert "(restarts used up: 2 of at most 2 within 60 s)" in rec.error
            if essential:
                assert await run.result() == 1
                assert run.launcher.failure is not None
                assert run.launcher.failure.startswith("essential peer 'worker' failed: ")
                assert run.peers["witness"].state == "finished"
            else:
                await run.launcher.running.wait()
                assert run.peers["witness"].state == "running" and not run.done.is_set()
                run.launcher.stop()
                assert await run.result() == 0
        assert len(runs(tmp_path / "run", "worker")) == 3
        text = run.text()
        # the experiment went on through both restarts: it stopped after the last failure
        assert text.count("worker: restarting in") == 2
        if essential:
            assert text.index("restarting in 1 s") < text.index("stopping: essential peer")
            assert "FAILED: essential peer 'worker' failed" in text


async def test_the_window_forgets_old_restarts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    text = experiment('restart = "on-failure"\nmax_restarts = 1\nrestart_window = 10')
    with trio.fail_after(120):
        async with launched(tmp_path, text, inprocess=True) as run:
            await run.launcher.running.wait()
            worker = run.peers["worker"]
            await crash(run)
            await run.wait(lambda lr: worker.restarts == 1 and worker.state == "running")
            await trio.sleep(11)  # the first restart is out of the window now
            await crash(run)
            await run.wait(lambda lr: worker.restarts == 2 and worker.state == "running")
            await crash(run)  # within 10 s of the second restart: that was the last one
            assert await run.result() == 1
            assert worker.restarts == 2
            assert "(restarts used up: 1 of at most 1 within 10 s)" in worker.error
        # the back-off started again from restart_delay after the quiet window
        assert run.text().count("restarting in 0.5 s (restart 1 of at most 1") == 2


async def test_the_back_off_doubles_up_to_its_cap(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    worker = """restart = "always"
        max_restarts = 5
        restart_delay = 1
        max_restart_delay = 3
        essential = false
        [peers.worker.local_params]
        crash_runs = 100
    """
    text = experiment(worker).replace('[peers.worker.local_params]\n        label = "again"\n', "")
    with trio.fail_after(120):
        async with launched(tmp_path, text, inprocess=True) as run:
            await run.wait(lambda lr: lr.peers["worker"].failed, 100)
            run.launcher.stop()
            assert await run.result() == 0
    delays = [float(d) for d in re.findall(r"restarting in (\S+) s", run.text())]
    assert delays == [1, 2, 3, 3, 3]
    starts = runs(tmp_path / "run", "worker")
    assert len(starts) == 6
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # each run lasts a moment (it crashes when started), then the back-off passes
    for gap, delay in zip(gaps, delays, strict=True):
        assert delay <= gap < delay + 1, (gaps, delays)


# ----------------------------------------------------------------------------- stopping


async def test_stopping_during_the_back_off_does_not_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    text = experiment('restart = "on-failure"\nrestart_delay = 30\nmax_restart_delay = 30')
    with trio.fail_after(60):
        async with launched(tmp_path, text, inprocess=True) as run:
            await run.launcher.running.wait()
            worker = run.peers["worker"]
            await crash(run)
            await run.wait(lambda lr: worker.state == "restarting")
            started = trio.current_time()
            run.launcher.stop("enough")
            assert await run.result() == 0
            assert trio.current_time() - started < 30  # the back-off did not hold the stop
        assert worker.state == "not restarted" and worker.restarts == 1
        assert len(runs(tmp_path / "run", "worker")) == 1
        assert "worker: not restarted: the experiment is stopping" in run.text()


# ----------------------------------------------------------------------------- the example


async def test_the_restarts_example(tmp_path: Path) -> None:
    """examples/restarts.toml as a user runs it (peer processes): the sensor crashes in its
    first two runs and is restarted; the logbook saw every run's readings and the events."""
    example = load_experiment(Path(__file__).parent.parent / "examples" / "restarts.toml")
    launcher = Launcher(example, run_dir=tmp_path, out=io.StringIO(), view="log")
    sensor = launcher.peers["sensor"]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            status: list[int] = []
            nursery.start_soon(_collect, launcher, status)
            await launcher.wait_until(lambda lr: sensor.restarts == 2, 50)
            await launcher.wait_until(lambda lr: sensor.state == "running", 20)
            launcher.stop("seen enough")
    assert status == [0]
    report = json.loads((tmp_path / "logbook.json").read_text())
    assert report["readings_per_run"]["1"] == report["readings_per_run"]["2"] == 10
    # it subscribed once the sensor was ready (its launch dependency): from the start on
    run = ["joined", "initializing -> connected", "connected -> ready", "ready -> running"]
    end = ["running -> shutting_down", "left"]
    expected = [*run[-1:], *end, *run, *end, *run[:-1]]  # the last may come after the stop
    assert report["events"][: len(expected)] == [f"sensor: {e}" for e in expected]
    assert "sensor: restarting in 1 s (restart 2 of at most 3 within 30 s)" in _text(launcher)


async def _collect(launcher: Launcher, status: list[int]) -> None:
    status.append(await launcher.run())


def _text(launcher: Launcher) -> str:
    assert isinstance(launcher.out, io.StringIO)
    return launcher.out.getvalue()


# ----------------------------------------------------------------------------- sans-IO


def test_the_budget_counts_restarts_within_the_window() -> None:
    budget = RestartBudget(RestartPolicy(restart="on-failure", max_restarts=2, restart_window=10))
    assert budget.next_delay(0.0, failed=False) is None  # a clean end: not for on-failure
    assert budget.next_delay(0.0, failed=True) == 0.5
    budget.note(0.0)
    assert budget.next_delay(1.0, failed=True) == 1.0  # doubled
    budget.note(1.0)
    assert budget.next_delay(2.0, failed=True) is None  # 2 within 10 s: used up
    assert budget.recent(10.5) == 1  # the first is out of the window
    assert budget.next_delay(10.5, failed=True) == 1.0
    assert budget.next_delay(20.0, failed=True) == 0.5  # a quiet window: from the start
    assert budget.total == 2

    always = RestartBudget(RestartPolicy(restart="always", max_restarts=1))
    assert always.next_delay(0.0, failed=False) == 0.5
    never = RestartBudget(RestartPolicy())
    assert never.next_delay(0.0, failed=True) is None


def test_the_back_off_is_bounded() -> None:
    policy = RestartPolicy(restart="always", restart_delay=0.25, max_restart_delay=2.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert policy.delay(10_000) == 2.0  # no overflow, however many
