"""The launcher: run a whole experiment (broker, config server and peers) and supervise it.

:class:`Launcher` takes a validated :class:`~peerkit.experiment.Experiment` and:

1. starts a :class:`~peerkit.Broker` and a :class:`~peerkit.ConfigServer` in this process;
2. starts every peer in dependency order, as a subprocess (``python -m peerkit run ...``,
   in its own process group, output to ``<run dir>/<peer_id>.log``) or as a trio task in
   this process, always with ``autostart=False``;
3. waits until every peer is ready (bounded by the ready timeout; the error names the peers
   that are not ready and why), then asks each to start with ``PeerControlMessage``, in
   dependency order;
4. shows the state of every peer live (:mod:`peerkit.launch._status`) until SIGINT/SIGTERM, the
   end of ``duration``, the end of every peer, or the failure of an essential peer;
5. stops the peers in reverse dependency order, each with a grace period (SIGTERM for a
   process, ``async_shutdown()`` for a task), then kills what is left; no child process
   outlives the launcher's ``run()``.

The launcher follows the peers through the broker's state events (``PeerJoined``,
``PeerStateChanged``, ``PeerLeft``), which its own peer subscribes to before any peer
starts: a state change reaches the table, and every wait on one, as it happens. Only the
message rates in the table are sampled (from the broker's counters, once a
``status_interval``). A peer is ready when the state it reports counts as ready or running
(a custom state by its base).

A failure is a peer process that exits with a non-zero status or is killed (even with
``kill -9``), an in-process peer whose ``run()`` raises, or a ``PanickMsg`` on the broker
(published by a dying peer, or by the broker for a peer whose connection was lost). Each
peer's :class:`~peerkit.experiment.RestartPolicy` says whether the launcher runs it again
(after a back-off, as a new process or task with the same id and configuration, started
again once it is ready). A failure the policy does not restart -- or one past its
``max_restarts`` -- is final: an essential peer's stops the experiment with exit status 1;
a non-essential one is reported and the rest go on.

This module orchestrates; what is about one peer (its :class:`PeerRecord`, its command line
and environment, the run directory's log files) lives in :mod:`peerkit.launch._peers`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import trio

from .._checks import check_seconds
from ..broker import Broker
from ..config.configured import ConfigServer
from ..errors import PeerkitError, QueryAnswerUnknown
from ..messages import PanickMsg, PeerControlMessage, PeerJoined, PeerLeft, PeerStateChanged
from ..peer import Peer
from ._peers import (
    LOG_FORMAT,
    RUN_DIR_ENV,
    Outcome,
    PeerRecord,
    RunDirHandler,
    current_run_dir,
    kill_process_group,
    log_target,
    peer_command,
    peer_environment,
    run_dir_var,
    tail,
)
from ._status import LogView, PeerRow, StatusView, TerminalView
from .experiment import CONFIG_SERVER_ID, LAUNCHER_ID, Experiment

__all__ = ["LOG_FORMAT", "RUN_DIR_ENV", "Launcher", "PeerRecord", "current_run_dir"]

log = logging.getLogger("peerkit.launch")

_RATE_WINDOW = 1.0
#: the error_type of the PanickMsg the broker publishes for a connection it lost
_LOST = "PeerLost"
_KILL_WAIT = 5.0


class Launcher:
    """Runs one experiment; :meth:`run` returns the exit status (0 ok, 1 failure).

    ``duration``: stop after this many seconds of running (None: until stopped).
    ``inprocess``: run every peer as a trio task here, whatever its ``mode``.
    ``run_dir``: where logs go (default ``runs/<name>-<timestamp>`` in the working
    directory). ``ready_timeout``/``grace_period`` override the experiment file's.
    ``out``: where the status goes (default stdout); ``view``: ``"auto"`` (a live table on
    a terminal, log lines otherwise), ``"terminal"``, ``"log"`` or a
    :class:`~peerkit.launch._status.StatusView`. ``handle_signals``: stop cleanly on SIGINT and
    SIGTERM (a second signal kills at once); the CLI sets it. ``tail``: how many last lines
    of each peer's log to show at the end.
    """

    def __init__(
        self,
        experiment: Experiment,
        *,
        duration: float | None = None,
        inprocess: bool = False,
        run_dir: str | Path | None = None,
        ready_timeout: float | None = None,
        grace_period: float | None = None,
        out: TextIO | None = None,
        view: str | StatusView = "auto",
        handle_signals: bool = False,
        status_interval: float = 0.5,
        summary_interval: float = 10.0,
        tail: int = 3,
        token: str | None = None,
        log_level: int | None = logging.INFO,
        python: str = sys.executable,
        dashboard: bool = False,
        dashboard_port: int = 0,
    ) -> None:
        for name, value in (
            ("duration", duration),
            ("ready_timeout", ready_timeout),
            ("grace_period", grace_period),
        ):
            if value is not None:
                check_seconds(name, value)
        self.experiment = experiment
        self.duration = duration
        self.inprocess = inprocess
        self.ready_timeout = ready_timeout or experiment.ready_timeout
        self.grace_period = grace_period or experiment.grace_period
        if run_dir is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = Path("runs") / f"{experiment.name}-{stamp}-{os.getpid()}"
        self.run_dir = Path(run_dir).resolve()
        self.out: TextIO = out if out is not None else sys.stdout
        if isinstance(view, str):
            if view == "auto":
                view = "terminal" if self.out.isatty() else "log"
            if view == "terminal":
                view = TerminalView(self.out)
            elif view == "log":
                view = LogView(self.out, summary_interval)
            else:
                raise PeerkitError(f"view must be 'auto', 'terminal' or 'log', got {view!r}")
        self.view: StatusView = view
        self.handle_signals = handle_signals
        self.status_interval = status_interval
        self.tail = tail
        self.token = token
        #: serve the live dashboard (a web page) beside the broker; its address is printed
        self.dashboard = bool(dashboard)
        self.dashboard_port = dashboard_port
        self.dashboard_url: str | None = None
        self.log_level = log_level
        self.python = python

        #: every peer, in start order
        self.peers: dict[str, PeerRecord] = {
            pid: PeerRecord(experiment.peers[pid], self.run_dir / f"{pid}.log")
            for pid in experiment.order
        }
        #: the broker's URL once it listens
        self.broker_url: str | None = None
        #: set once every peer was asked to start
        self.running = trio.Event()
        #: why the experiment stopped / failed
        self.stop_reason = ""
        self.failure: str | None = None
        self.exit_status: int | None = None

        self._stop = trio.Event()
        self._hurry = trio.Event()
        self._changed = trio.Event()
        self._t0 = 0.0
        self._phase = "starting"
        self._broker: Broker | None = None
        self._config_server: ConfigServer | None = None
        self._ctl: Peer | None = None
        self._children: trio.Nursery | None = None
        self._pgids: set[int] = set()

    # ------------------------------------------------------------------ public
    def stop(self, reason: str = "stop requested") -> None:
        """Ask the experiment to stop (clean shutdown, exit status 0 unless a failure)."""
        if not self._stop.is_set():
            self.stop_reason = reason
            self._event(f"stopping: {reason}")
            self._stop.set()
            self._notify()

    async def wait_until(self, predicate: Callable[[Launcher], bool], timeout: float) -> None:
        """Wait until ``predicate(launcher)`` holds; re-checked at every change of a peer
        and every sample of the message rates (each ``status_interval``).

        Raises :class:`trio.TooSlowError` after ``timeout`` seconds.
        """
        with trio.fail_after(timeout):
            await self._wait(lambda: predicate(self))

    async def run(self) -> int:
        """Run the experiment to its end; returns the exit status (0 ok, 1 failure)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._t0 = trio.current_time()
        self._event(f"run directory: {self.run_dir}")
        token = run_dir_var.set(self.run_dir)
        try:
            with self._logging():
                log.info("launching %s", self.experiment.path or self.experiment.name)
                try:
                    await self._run()
                except* (PeerkitError, OSError) as group:
                    self._fail("; ".join(f"{type(e).__name__}: {e}" for e in _leaves(group)))
                finally:
                    self._kill_process_groups()
                    self._phase = "stopped"
                    self._render()
                    self.view.close()
        finally:
            run_dir_var.reset(token)
        self.exit_status = 0 if self.failure is None else 1
        self._summary()
        return self.exit_status

    # ------------------------------------------------------------------ main flow
    async def _run(self) -> None:
        exp = self.experiment
        async with trio.open_nursery() as nursery:
            if self.handle_signals:
                await nursery.start(self._watch_signals)
            broker = Broker(exp.host, exp.port, token=self.token)
            await nursery.start(broker.run)
            self._broker = broker
            self.broker_url = broker.url
            self._event(f"broker listening on {broker.url}")
            if self.dashboard:
                from ..dashboard import Dashboard  # hypercorn is only needed for this

                board = Dashboard(broker.url, port=self.dashboard_port, token=self.token)
                await nursery.start(board.run)
                self.dashboard_url = board.url
                self._event(f"dashboard: open {board.url}")
            try:
                config_server = ConfigServer(broker.url, CONFIG_SERVER_ID, token=self.token)
                await nursery.start(config_server.run)
                self._config_server = config_server
                ctl = Peer(broker.url, LAUNCHER_ID, token=self.token)
                await nursery.start(ctl.run)
                self._ctl = ctl
                # before any peer starts, and lossless (they are few, and a missed failure
                # or state would leave the launcher wrong): every event of every peer
                lossless = "lossless"
                every = ctl.subscribe_for_all_msg_subtype
                await every(PanickMsg, self._on_panick, delivery=lossless)
                await every(PeerJoined, self._on_joined, delivery=lossless)
                await every(PeerStateChanged, self._on_state, delivery=lossless)
                await every(PeerLeft, self._on_left, delivery=lossless)
                nursery.start_soon(self._monitor)
                async with trio.open_nursery() as children:
                    self._children = children
                    await self._supervise()
                    await self._stop_peers()
                    children.cancel_scope.cancel(reason="the experiment is over")
            finally:
                with trio.CancelScope(shield=True):
                    for helper in (self._ctl, self._config_server):
                        if helper is not None:
                            await helper.async_shutdown()
                    await broker.shutdown()
            nursery.cancel_scope.cancel(reason="the experiment is over")

    async def _supervise(self) -> None:
        assert self._children is not None
        for rec in self.peers.values():
            if self._stop.is_set():
                return
            await self._children.start(self._keep, rec)
        if not await self._wait_ready():
            return
        self._phase = "running"
        self._notify()  # from now on, the keeper of a restarted peer starts it
        for rec in self.peers.values():
            if self._stop.is_set():
                return
            if rec.run == 1 and rec.live and rec.run_failure is None:
                await self._ask_start(rec)
        if self._stop.is_set():
            return
        took = trio.current_time() - self._t0
        until = f" for {self.duration:g} s" if self.duration else "; stop with Ctrl-C"
        self._event(f"all peers started in {took:.1f} s, running{until}")
        self.running.set()
        self._notify()
        if self.duration is None:
            await self._stop.wait()
            return
        with trio.move_on_after(self.duration):
            await self._stop.wait()
        self.stop(f"the duration of {self.duration:g} s is over")

    async def _ask_start(self, rec: PeerRecord) -> None:
        assert self._ctl is not None
        run = rec.run
        action = PeerControlMessage(peer_id=rec.peer_id, action="start")
        try:
            await self._ctl.ask_peer(rec.peer_id, action, timeout=self.grace_period)
        except QueryAnswerUnknown as exc:
            if rec.run == run and rec.live:  # not: it ended meanwhile (its end says why)
                self._run_failed(rec, f"could not be started: {exc}")

    async def _wait_ready(self) -> bool:
        def settled() -> bool:
            return self._stop.is_set() or all(
                rec.is_ready or (not rec.spec.essential and (rec.failed or rec.has_exited))
                for rec in self.peers.values()
            )

        with trio.move_on_after(self.ready_timeout) as scope:
            await self._wait(settled)
        if self._stop.is_set():
            return False
        if scope.cancelled_caught:
            late = [rec for rec in self.peers.values() if not rec.is_ready and not rec.failed]
            details = "; ".join(f"{rec.peer_id} {self._why_not_ready(rec)}" for rec in late)
            self._fail(f"not ready within {self.ready_timeout:g} s: {details}")
            return False
        took = trio.current_time() - self._t0
        self._event(f"all peers ready in {took:.1f} s")
        return True

    def _why_not_ready(self, rec: PeerRecord) -> str:
        if rec.has_exited:
            return f"(exited): {rec.error or rec.state}"
        if rec.state == "restarting":
            return f"(restarting, {rec.restarts} restarts so far): {rec.error}"
        if rec.state in ("pending", "starting"):
            where = f"process {rec.pid}" if rec.pid else "the peer"
            last = tail(rec.log_path, 1)
            return f"({rec.state}): {where} has not connected to the broker" + (
                f" (last log line: {last[0]})" if last else ""
            )
        reason = ""
        cs = self._config_server
        if cs is not None and rec.peer_id in cs.registry.peers:
            reason = cs.registry.why_not_ready(rec.peer_id).removeprefix(f"{rec.peer_id}: ")
        elif rec.spec.configured:
            reason = "not registered with the config server"
        return f"({rec.state})" + (f": {reason}" if reason else "")

    # ------------------------------------------------------------------ one peer's runs
    async def _keep(
        self, rec: PeerRecord, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run ``rec``'s peer, again as often as its restart policy says, and settle how it
        ended (``task_status``: once its first run has begun)."""
        outcome = await self._run_once(rec, task_status)
        while True:
            if rec.failed:  # failed for good while it still ran (a panic, no restart left)
                break
            reason = rec.run_failure or (outcome.detail if outcome.failed else None)
            if rec.stopping or self._stop.is_set() or outcome.kind == "killed":
                self._settle(rec, outcome)
                break
            delay = rec.budget.next_delay(trio.current_time(), failed=reason is not None)
            if delay is None:
                self._settle(rec, Outcome("failed", reason) if reason else outcome)
                break
            rec.budget.note(trio.current_time())
            rec.restarts = rec.budget.total
            if reason is not None:
                rec.error = reason
                if rec.run_failure is None:  # not told yet
                    self._event(f"{rec.peer_id}: FAILED: {reason}")
            else:
                self._event(f"{rec.peer_id}: finished ({outcome.detail})")
            if not await self._backoff(rec, delay):
                rec.state = "not restarted"
                self._event(f"{rec.peer_id}: not restarted: the experiment is stopping")
                break
            async with trio.open_nursery() as helpers:
                helpers.start_soon(self._start_when_ready, rec)
                outcome = await self._run_once(rec, trio.TASK_STATUS_IGNORED)
                helpers.cancel_scope.cancel(reason="the run is over")
        self._exited(rec)

    async def _run_once(self, rec: PeerRecord, task_status: trio.TaskStatus[None]) -> Outcome:
        rec.begin_run()
        self._notify()
        try:
            if rec.spec.mode == "inprocess" or self.inprocess:
                outcome = await self._run_inprocess(rec, task_status)
            else:
                outcome = await self._run_process(rec, task_status)
        finally:
            rec.live = False
            rec.base = ""
            self._notify()
        if rec.run_failure is not None and outcome.kind != "failed":
            return Outcome("failed", rec.run_failure)
        if (
            outcome.kind == "finished"
            and rec.spec.essential
            and not rec.stopping
            and not self.running.is_set()
        ):
            return Outcome("failed", f"ended before the experiment started ({outcome.detail})")
        return outcome

    async def _backoff(self, rec: PeerRecord, delay: float) -> bool:
        """Wait ``delay`` seconds, then until the broker has let the last run go (its id is
        taken until then). False if the experiment or the peer is stopped meanwhile."""
        policy = rec.spec.restart
        recent = rec.budget.recent(trio.current_time())
        rec.state = "restarting"
        self._event(
            f"{rec.peer_id}: restarting in {delay:g} s (restart {recent} of at most "
            f"{policy.max_restarts} within {policy.restart_window:g} s)"
        )

        def over() -> bool:
            return rec.stopping or self._stop.is_set()

        with trio.move_on_after(delay):
            await self._wait(over)
        broker = self._broker
        if broker is not None and not over():
            # PeerLeft wakes this up; a stale connection is bounded by the heartbeat timeout
            with trio.move_on_after(self.grace_period + broker.heartbeat_timeout):
                await self._wait(lambda: over() or rec.peer_id not in broker.peer_ids)
        return not over()

    async def _start_when_ready(self, rec: PeerRecord) -> None:
        """A restarted peer rejoins the experiment: once the experiment runs (:meth:`_supervise`
        starts the first runs) and the peer is ready, ask it to start."""
        await self._wait(lambda: self._phase != "starting")
        if self._phase != "running":
            return
        with trio.move_on_after(self.ready_timeout) as scope:
            await self._wait(lambda: rec.is_ready or rec.stopping or self._stop.is_set())
        if rec.stopping or self._stop.is_set():
            return
        if scope.cancelled_caught:
            why = self._why_not_ready(rec)
            self._run_failed(rec, f"not ready within {self.ready_timeout:g} s of its restart {why}")
            return
        await self._ask_start(rec)

    def _run_failed(self, rec: PeerRecord, reason: str) -> None:
        """The current run failed before it ended (it panicked, could not be started...).

        Final unless the restart policy will run the peer again; then the run is ended
        (killed if it does not end by itself within the grace period) and restarted.
        """
        if rec.failed or rec.run_failure is not None or not rec.live:
            return
        rec.run_failure = reason
        if rec.budget.next_delay(trio.current_time(), failed=True) is None:
            self._peer_failed(rec, self._final(rec, reason))
            return
        rec.state = "failed"
        rec.base = ""
        rec.error = reason
        self._event(f"{rec.peer_id}: FAILED: {reason}")
        self._notify()
        assert self._children is not None
        self._children.start_soon(self._end_run, rec, rec.run)

    async def _end_run(self, rec: PeerRecord, run: int) -> None:
        with trio.move_on_after(self.grace_period):
            await self._wait(lambda: rec.run != run or not rec.live)
        if rec.run == run and rec.live:
            self._event(f"{rec.peer_id}: still running {self.grace_period:g} s after it failed")
            self._kill_run(rec)

    def _kill_run(self, rec: PeerRecord) -> None:
        rec.killed = True
        if rec.process is not None:
            kill_process_group(rec.process.pid)
        rec.scope.cancel(reason="killed by the launcher")

    def _final(self, rec: PeerRecord, reason: str) -> str:
        """``reason``, and why the peer is not restarted when its policy restarts failures."""
        policy = rec.spec.restart
        if not policy.applies(failed=True):
            return reason
        recent = rec.budget.recent(trio.current_time())
        return (
            f"{reason} (restarts used up: {recent} of at most {policy.max_restarts} "
            f"within {policy.restart_window:g} s)"
        )

    def _settle(self, rec: PeerRecord, outcome: Outcome) -> None:
        if outcome.kind == "failed":
            self._peer_failed(rec, self._final(rec, outcome.detail))
        elif outcome.kind == "killed":
            self._peer_killed(rec, outcome.detail)
        else:
            self._peer_finished(rec, outcome.detail)

    # ------------------------------------------------------------------ children
    def _command(self, rec: PeerRecord) -> list[str]:
        assert self.broker_url is not None
        return peer_command(self.python, rec, self.broker_url, self.run_dir, self._peer_kwargs(rec))

    def _peer_kwargs(self, rec: PeerRecord) -> dict[str, Any]:
        kwargs = rec.spec.config_kwargs()
        if rec.spec.configured:
            kwargs["config_timeout"] = self.ready_timeout
        return kwargs

    async def _run_process(self, rec: PeerRecord, task_status: trio.TaskStatus[None]) -> Outcome:
        try:
            with rec.log_path.open("ab") as logfile:
                process = await trio.lowlevel.open_process(
                    self._command(rec),
                    stdin=subprocess.DEVNULL,
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: killed as a whole
                    env=peer_environment(self.experiment.directory, self.run_dir, self.token),
                )
        except OSError as exc:
            task_status.started()
            return Outcome("failed", f"could not start the process: {exc}")
        rec.process = process
        rec.pid = process.pid
        self._pgids.add(process.pid)
        again = f" (restart {rec.restarts})" if rec.restarts else ""
        self._event(f"{rec.peer_id}: started process {process.pid}{again}")
        task_status.started()
        code: int | None = None
        try:
            code = await process.wait()
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    rec.killed = True
                    kill_process_group(process.pid)
                    await process.wait()
                kill_process_group(process.pid)  # whatever it left behind in its group
                self._pgids.discard(process.pid)
                if code is None:  # cancelled: the launcher itself is going away
                    rec.returncode = process.returncode
                    self._peer_killed(rec, "killed: the launcher was cancelled")
                    self._exited(rec)
        rec.returncode = code
        if code == 0 or (rec.stopping and code == -signal.SIGTERM):
            return Outcome("finished", f"exit status {code}")
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            if rec.killed:
                return Outcome("killed", f"killed with {name}")
            return Outcome("failed", f"killed by {name}")
        last = tail(rec.log_path, 1)
        return Outcome("failed", f"exited with status {code}" + (f": {last[0]}" if last else ""))

    async def _run_inprocess(self, rec: PeerRecord, task_status: trio.TaskStatus[None]) -> Outcome:
        assert self.broker_url is not None
        log_target.set(rec.peer_id)
        error: BaseException | None = None
        task_status.started()
        with rec.scope:
            try:
                peer = rec.spec.peer_class(
                    self.broker_url,
                    rec.peer_id,
                    autostart=False,
                    is_essential=rec.spec.essential,
                    token=self.token,
                    **self._peer_kwargs(rec),
                )
                rec.peer = peer
                again = f" (restart {rec.restarts})" if rec.restarts else ""
                self._event(f"{rec.peer_id}: started in this process{again}")
                await peer.run()
            except Exception as exc:
                error = exc
        if rec.scope.cancelled_caught:
            rec.killed = True
            return Outcome("killed", "cancelled")
        if error is not None:
            return Outcome("failed", f"{type(error).__name__}: {error}")
        return Outcome("finished", "finished")

    # ------------------------------------------------------------------ stopping
    async def _stop_peers(self) -> None:
        self._phase = "stopping"
        for rec in reversed(self.peers.values()):
            if not rec.has_exited:
                await self._stop_peer(rec)

    async def _stop_peer(self, rec: PeerRecord) -> None:
        rec.stopping = True
        self._notify()  # a keeper about to restart the peer gives up
        if rec.state == "pending":  # never started
            rec.state = "not started"
            self._exited(rec)
            return
        if not rec.live:  # between two runs: its keeper settles it
            with trio.move_on_after(_KILL_WAIT):
                await rec.exited.wait()
            return
        if rec.process is not None:
            with contextlib.suppress(ProcessLookupError):
                rec.process.send_signal(signal.SIGTERM)
        elif rec.peer is not None and self._children is not None:
            self._children.start_soon(rec.peer.async_shutdown)
        grace = 0.0 if self._hurry.is_set() else self.grace_period
        with trio.move_on_after(grace):
            await self._wait(lambda: rec.has_exited or self._hurry.is_set())
        if rec.has_exited:
            return
        if not self._hurry.is_set():
            self._event(f"{rec.peer_id}: still running after {grace:g} s, killing it")
            if rec.spec.essential:
                self._fail(f"essential peer {rec.peer_id!r} did not stop within {grace:g} s")
        self._kill_run(rec)
        with trio.move_on_after(_KILL_WAIT):
            await rec.exited.wait()

    def _kill_process_groups(self) -> None:
        for pgid in list(self._pgids):
            kill_process_group(pgid)

    async def _watch_signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self._stop.is_set():
                    self.stop(f"{name} received")
                else:
                    self._event(f"{name} received again: killing every peer now")
                    self._hurry.set()
                    self._notify()

    # ------------------------------------------------------------------ outcomes
    def _peer_finished(self, rec: PeerRecord, detail: str) -> None:
        if rec.failed:
            return
        rec.state = "finished"
        self._event(f"{rec.peer_id}: finished ({detail})")

    def _peer_killed(self, rec: PeerRecord, detail: str) -> None:
        if not rec.failed:
            rec.state = "killed"
            rec.error = rec.error or detail
            self._event(f"{rec.peer_id}: {detail}")

    def _peer_failed(self, rec: PeerRecord, reason: str) -> None:
        if rec.failed:
            return
        rec.failed = True
        rec.state = "failed"
        rec.base = ""
        rec.error = reason
        essential = "essential" if rec.spec.essential else "non-essential"
        self._event(f"{rec.peer_id}: FAILED ({essential}): {reason}")
        if rec.spec.essential:
            self._fail(f"essential peer {rec.peer_id!r} failed: {reason}")
        elif not self._stop.is_set():
            self._event(f"{rec.peer_id} is not essential; the experiment goes on")
        self._notify()

    def _exited(self, rec: PeerRecord) -> None:
        rec.exited.set()
        if all(r.has_exited for r in self.peers.values()):
            self.stop("every peer has ended")
        self._notify()

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        log.error("%s", reason)
        self.stop(reason)

    # ------------------------------------------------------------------ events
    def _on_panick(self, msg: PanickMsg) -> None:
        rec = self.peers.get(msg.sender)
        text = f"{msg.error_type}: {msg.message}" if msg.error_type else msg.message
        if rec is None:
            if msg.sender not in (LAUNCHER_ID, CONFIG_SERVER_ID):
                self._event(f"{msg.sender} (not part of the experiment) panicked: {text}")
            return
        if rec.stopping or rec.killed or not rec.live:
            rec.error = rec.error or text
            return
        if msg.error_type == _LOST and self._children is not None:
            # the broker lost the connection, not the peer its life: it may come back
            rec.lost = True
            rec.error = text
            self._children.start_soon(self._await_return, rec, rec.run, text)
            return
        self._run_failed(rec, f"panicked: {text}")

    async def _await_return(self, rec: PeerRecord, run: int, text: str) -> None:
        """A peer whose connection the broker lost has ``ready_timeout`` seconds to reconnect
        (peers do by default) or to end (its end says how it went); else its run failed."""
        with trio.move_on_after(self.ready_timeout):
            await self._wait(lambda: rec.run != run or not rec.live or not rec.lost)
        if rec.run == run and rec.live and rec.lost and not rec.stopping:
            wait = f"{self.ready_timeout:g} s"
            self._run_failed(
                rec, f"lost its connection and did not reconnect within {wait}: {text}"
            )

    def _on_joined(self, msg: PeerJoined) -> None:
        rec = self.peers.get(msg.sender)
        if rec is not None and rec.live and msg.resumed:
            rec.lost = False
            if not rec.stopping:
                self._event(f"{rec.peer_id}: reconnected")
        self._notify()

    def _on_state(self, msg: PeerStateChanged) -> None:
        rec = self.peers.get(msg.sender)
        if rec is None or not rec.live or rec.failed or rec.run_failure is not None:
            return  # not ours, or between runs: the run's end tells
        rec.base = msg.base or msg.new
        if msg.new != rec.state:
            rec.state = msg.new
            if not rec.stopping:
                counts = f" (counts as {rec.base})" if rec.base != msg.new else ""
                self._event(f"{rec.peer_id}: {msg.new}{counts}")
        self._notify()

    def _on_left(self, msg: PeerLeft) -> None:
        rec = self.peers.get(msg.sender)
        if rec is not None and rec.live and not rec.failed and rec.run_failure is None:
            rec.base = ""
            new = "left" if msg.clean else "disconnected"
            if new != rec.state:
                rec.state = new
                if not rec.stopping:
                    self._event(f"{rec.peer_id}: {new}" + ("" if msg.clean else f" ({msg.reason})"))
        self._notify()  # also wakes a keeper waiting for the broker to let a run go

    # ------------------------------------------------------------------ monitoring
    async def _monitor(self) -> None:
        """Samples the message rates and redraws the table each ``status_interval`` (the
        states come with the broker's events)."""
        while True:
            self._sample_rates()
            self._notify()  # waiters on rates re-check at every sample
            self._render()
            await trio.sleep(self.status_interval)

    def _sample_rates(self) -> None:
        if self._broker is None:
            return
        now = trio.current_time()
        infos = {p.peer_id: p for p in self._broker.info().peers}
        for rec in self.peers.values():
            info = infos.get(rec.peer_id)
            if info is None:
                rec.rate_in = rec.rate_out = 0.0
                rec._sample = None
                continue
            rec.dropped = info.dropped
            # the broker counts what it receives from the peer (the peer's output)
            sample = (now, info.msgs_out, info.msgs_in)
            if rec._sample is None:
                rec._sample = sample
            elif now - rec._sample[0] >= _RATE_WINDOW:
                dt = now - rec._sample[0]
                rec.rate_in = (sample[1] - rec._sample[1]) / dt
                rec.rate_out = (sample[2] - rec._sample[2]) / dt
                rec._sample = sample

    def _render(self) -> None:
        title = f"{self.experiment.name}: {self._phase}  broker {self.broker_url}"
        self.view.update(self._elapsed(), title, self.rows())

    def rows(self) -> list[PeerRow]:
        """The status table's rows."""
        return [
            PeerRow(
                peer_id=rec.peer_id,
                state=rec.state,
                pid=rec.pid,
                rate_in=rec.rate_in,
                rate_out=rec.rate_out,
                dropped=rec.dropped,
                essential=rec.spec.essential,
                last_error=rec.error,
                restarts=rec.restarts,
            )
            for rec in self.peers.values()
        ]

    # ------------------------------------------------------------------ helpers
    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    def _elapsed(self) -> float:
        try:
            return trio.current_time() - self._t0
        except RuntimeError:
            return 0.0

    def _event(self, text: str) -> None:
        log.info("%s", text)
        self.view.event(self._elapsed(), text)

    @contextlib.contextmanager
    def _logging(self) -> Iterator[None]:
        handler = RunDirHandler(self.run_dir)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root = logging.getLogger()
        old_level = root.level
        root.addHandler(handler)
        if self.log_level is not None:
            root.setLevel(self.log_level)
        try:
            yield
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)
            handler.close()

    def _summary(self) -> None:
        out = self.out
        out.write(f"\nrun directory: {self.run_dir}\n")
        width = max(len(pid) for pid in self.peers) if self.peers else 0
        for rec in self.peers.values():
            code = "" if rec.returncode is None else f" (exit {rec.returncode})"
            again = f", restarted {_times(rec.restarts)}" if rec.restarts else ""
            error = f": {rec.error}" if rec.error and rec.state != "finished" else ""
            out.write(f"  {rec.peer_id.ljust(width)}  {rec.state}{code}{again}{error}\n")
            for line in tail(rec.log_path, self.tail):
                out.write(f"  {' ' * width}  | {line}\n")
        if self.failure is not None:
            out.write(f"FAILED: {self.failure}\n")
        out.write(f"exit status {self.exit_status}\n")
        out.flush()


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
