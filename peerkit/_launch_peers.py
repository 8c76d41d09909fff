"""How the launcher's peers run (internal): their records, run directory and log files, and
the command line, environment and process-group kill of peer processes.

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
from typing import Any, TextIO

import attrs
import trio

from .experiment import PeerSpec
from .peer import Peer

__all__ = [
    "LOG_FORMAT",
    "RUN_DIR_ENV",
    "PeerRecord",
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


@attrs.define(eq=False)
class PeerRecord:
    """What the launcher knows about one peer (read it; the launcher updates it)."""

    spec: PeerSpec
    log_path: Path
    #: pending, starting, connected, ready, running, shutting_down, disconnected,
    #: finished, failed, killed
    state: str = "pending"
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
    _sample: tuple[float, int, int] | None = None

    @property
    def peer_id(self) -> str:
        return self.spec.peer_id

    @property
    def is_ready(self) -> bool:
        return self.state in _READY_STATES

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
