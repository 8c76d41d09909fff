"""How the launcher's peers run (internal): their records, restart budgets, run directory and
log files, and the command line, environment and process-group kill of peer processes.

:mod:`peerkit.launch` orchestrates; this module holds what is about one peer.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any, Literal, TextIO

import attrs
import trio

from ..peer import Peer
from .experiment import PeerSpec, RestartPolicy

__all__ = [
    "LOG_FORMAT",
    "RUN_DIR_ENV",
    "Outcome",
    "PeerRecord",
    "RestartBudget",
    "RunDirHandler",
    "current_run_dir",
    "kill_process_group",
    "log_target",
    "peer_command",
    "peer_environment",
    "run_dir_var",
    "tail",
]

#: Environment variable giving launched peer processes the run directory.
RUN_DIR_ENV = "PEERKIT_RUN_DIR"

run_dir_var: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "peerkit_run_dir", default=None
)
log_target: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "peerkit_log_target", default=None
)

_READY_STATES = frozenset({"ready", "running"})


def current_run_dir() -> Path | None:
    """The run directory of the experiment this code was launched in, or None.

    Peers use it for their output files: in a launched subprocess it comes from the
    ``PEERKIT_RUN_DIR`` environment variable, in an in-process peer from the launcher.
    """
    value = run_dir_var.get()
    if value is not None:
        return value
    env = os.environ.get(RUN_DIR_ENV)
    return Path(env) if env else None


@attrs.define
class RestartBudget:
    """The restarts of one peer: how many in all, and when the recent ones were (sans-IO).

    The launcher asks :meth:`next_delay` when a run of the peer ends and, if it gets a
    delay, calls :meth:`note` and restarts the peer after that delay.
    """

    policy: RestartPolicy
    #: restarts so far
    total: int = 0
    _times: list[float] = attrs.field(factory=list)

    def recent(self, now: float) -> int:
        """Restarts within the last ``restart_window`` seconds before ``now``."""
        window = self.policy.restart_window
        self._times = [t for t in self._times if now - t < window]
        return len(self._times)

    def next_delay(self, now: float, failed: bool) -> float | None:
        """The back-off before restarting a run that ended at ``now`` (a failure if
        ``failed``), or None: the policy does not restart such an end, or the restarts
        within the window are used up."""
        if not self.policy.applies(failed):
            return None
        done = self.recent(now)
        if done >= self.policy.max_restarts:
            return None
        return self.policy.delay(done + 1)

    def note(self, now: float) -> None:
        """A restart decided at ``now``."""
        self._times.append(now)
        self.total += 1


@attrs.frozen
class Outcome:
    """How one run of a peer ended: ``finished`` (cleanly), ``failed`` or ``killed`` (by
    the launcher, as it stopped the peer)."""

    kind: Literal["finished", "failed", "killed"]
    detail: str

    @property
    def failed(self) -> bool:
        return self.kind == "failed"


@attrs.define(eq=False)
class PeerRecord:
    """What the launcher knows about one peer (read it; the launcher updates it).

    A peer may run more than once (its restart policy): ``pid``, ``process``, ``peer``,
    ``returncode`` and ``killed`` are about the current (or last) run, ``restarts`` counts
    the runs after the first, ``error`` is the last error of any run. ``exited`` is set once
    the peer has ended for good.
    """

    spec: PeerSpec
    log_path: Path
    #: pending, starting, connected, ready, running, shutting_down, left, disconnected,
    #: restarting, finished, failed, killed, not started, not restarted; or a custom state
    #: the peer reported (``base`` says which base state it counts as)
    state: str = "pending"
    #: the base state of the state the peer last reported ("" when it reports none)
    base: str = ""
    pid: int | None = None
    returncode: int | None = None
    error: str = ""
    failed: bool = False
    #: the launcher asked it to stop (or killed it)
    stopping: bool = False
    killed: bool = False
    exited: trio.Event = attrs.field(factory=trio.Event)
    #: the peer object (in-process peers) or the process running it
    peer: Peer | None = None
    process: trio.Process | None = None
    #: cancels an in-process peer's task (its last resort)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    rate_in: float = 0.0
    rate_out: float = 0.0
    dropped: int = 0
    #: runs after the first
    restarts: int = 0
    budget: RestartBudget = attrs.field(
        default=attrs.Factory(lambda self: RestartBudget(self.spec.restart), takes_self=True)
    )
    #: a run is going on (a process or a task)
    live: bool = False
    #: 1 for the first run, 2 for the first restart...
    run: int = 0
    #: why the current run failed, noted before it ended (a panic, not ready in time)
    run_failure: str | None = None
    #: the broker lost the current run's connection and the peer has not reconnected yet
    lost: bool = False
    _sample: tuple[float, int, int] | None = None

    @property
    def peer_id(self) -> str:
        return self.spec.peer_id

    @property
    def is_ready(self) -> bool:
        """A run is going on and its peer reported a state that counts as ready or running
        (a custom state counts by its base)."""
        return self.live and self.base in _READY_STATES

    def begin_run(self) -> None:
        """Forget the last run: a new one begins."""
        self.run += 1
        self.state = "starting"
        self.base = ""
        self.pid = self.returncode = None
        self.process = None
        self.peer = None
        self.killed = False
        self.run_failure = None
        self.lost = False
        self.scope = trio.CancelScope()
        self.live = True

    @property
    def has_exited(self) -> bool:
        return self.exited.is_set()


def peer_command(
    python: str, rec: PeerRecord, broker_url: str, run_dir: Path, kwargs: dict[str, Any]
) -> list[str]:
    """The command line running ``rec``'s peer: ``python -m peerkit run ...``, its constructor
    arguments in ``<run dir>/<peer_id>.args.json``."""
    args_file = run_dir / f"{rec.peer_id}.args.json"
    args_file.write_text(json.dumps(kwargs, indent=2) + "\n")
    cmd = [
        python,
        "-m",
        "peerkit",
        "run",
        rec.spec.class_path,
        "--broker",
        broker_url,
        "--id",
        rec.peer_id,
        "--no-autostart",
        "--args-file",
        str(args_file),
    ]
    if not rec.spec.essential:
        cmd.append("--non-essential")
    return cmd


def peer_environment(directory: Path, run_dir: Path, token: str | None) -> dict[str, str]:
    """The environment of a peer process: the experiment's directory first on
    ``PYTHONPATH``, the run directory in ``PEERKIT_RUN_DIR``, unbuffered output."""
    env = dict(os.environ)
    paths = [str(directory)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env[RUN_DIR_ENV] = str(run_dir)
    env["PYTHONUNBUFFERED"] = "1"
    if token is not None:
        env["PEERKIT_TOKEN"] = token
    return env


#: Format of the log lines the launcher and ``peerkit run`` write.
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class RunDirHandler(logging.Handler):
    """Writes each record to ``<run dir>/<peer>.log`` for in-process peers (by context),
    everything else to ``<run dir>/launcher.log``."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = run_dir
        self._files: dict[str, TextIO] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            name = "launcher" if record.name == "peerkit.launch" else log_target.get()
            name = name or "launcher"
            stream = self._files.get(name)
            if stream is None:
                stream = (self.run_dir / f"{name}.log").open("a", encoding="utf-8")
                self._files[name] = stream
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        for stream in self._files.values():
            stream.close()
        self._files.clear()
        super().close()


def kill_process_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def tail(path: Path, count: int) -> list[str]:
    """The last ``count`` non-empty lines of a text file (nothing if it does not exist)."""
    if count <= 0:
        return []
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(size - 64 * 1024, 0))
            data = f.read()
    except OSError:
        return []
    lines = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-count:]
