"""The broker under test, in this process or in its own (internal).

:func:`broker_under_test` starts a broker (and a config server beside it) and gives a
:class:`BrokerUnderTest`: its URL, its memory (RSS), whether it still runs, and the errors it
logged -- ``connection handler failed`` is a *crash*: an exception escaped the code serving
one connection. In its own process (``python -m peerkit._stress.serve``, the default of the
campaigns) the RSS is the broker's alone and the broker has a core to itself; in this
process (the smoke tests) the RSS is the whole process's.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import trio

from ..broker import Broker
from ..config_server import ConfigServer

__all__ = ["CRASH_TEXT", "BrokerUnderTest", "broker_under_test", "mib", "rss_of"]

#: What the broker logs when an exception escaped the code serving a connection.
CRASH_TEXT = "connection handler failed"

Mode = Literal["process", "inprocess"]

#: the directory holding this peerkit package (the broker's process imports it from there)
_ROOT = str(Path(__file__).resolve().parents[2])


def rss_of(pid: int | str = "self") -> int | None:
    """Resident memory of process ``pid`` in bytes (Linux ``/proc``; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return None
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


def mib(size: int | None) -> str:
    """``size`` bytes as ``12.3 MiB`` (``?`` when unknown)."""
    return "?" if size is None else f"{size / (1 << 20):.1f} MiB"


class BrokerUnderTest:
    """A running broker, seen from the campaign (see the module docstring)."""

    def __init__(self, url: str, pid: int | None) -> None:
        self.url = url
        #: the broker's process (None: this process)
        self.pid = pid
        #: exceptions that escaped the code serving a connection
        self.crashes = 0
        #: error lines the broker logged (the last few)
        self.errors: collections.deque[str] = collections.deque(maxlen=20)
        #: error records the broker logged
        self.error_count = 0
        #: warning records the broker logged
        self.warning_count = 0
        #: why the broker is no longer running (None while it runs)
        self.ended: str | None = None

    def rss(self) -> int | None:
        """The broker's resident memory in bytes (its process's, or this process's)."""
        return rss_of(self.pid if self.pid is not None else "self")

    @property
    def alive(self) -> bool:
        return self.ended is None

    def note(self, level: int, text: str) -> None:
        """A log line of the broker's."""
        if level >= logging.ERROR:
            self.error_count += 1
            self.errors.append(text)
        elif level >= logging.WARNING:
            self.warning_count += 1
        if CRASH_TEXT in text:
            self.crashes += 1


class _Counter(logging.Handler):
    def __init__(self, target: BrokerUnderTest) -> None:
        super().__init__(logging.WARNING)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.note(record.levelno, record.getMessage())


@contextlib.asynccontextmanager
async def broker_under_test(
    mode: Mode = "process",
    options: dict[str, Any] | None = None,
    *,
    config_server: bool = True,
    log_path: str | None = None,
) -> AsyncIterator[BrokerUnderTest]:
    """A broker with ``options`` (and a config server), until the block ends. In its own
    process, everything it logs is also written to ``log_path`` if given."""
    options = dict(options or {})
    if mode == "inprocess":
        async with _in_process(options, config_server) as broker:
            yield broker
    else:
        async with _in_own_process(options, config_server, log_path) as broker:
            yield broker


@contextlib.asynccontextmanager
async def _in_process(
    options: dict[str, Any], config_server: bool
) -> AsyncIterator[BrokerUnderTest]:
    logger = logging.getLogger("peerkit.broker")
    broker = Broker(**options)
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.run)
        target = BrokerUnderTest(broker.url, None)
        handler = _Counter(target)
        logger.addHandler(handler)
        propagate, logger.propagate = logger.propagate, False  # counted, not printed
        try:

            async def watch() -> None:
                await broker._finished.wait()
                target.ended = target.ended or "the broker stopped"

            nursery.start_soon(watch)
            server: ConfigServer | None = None
            if config_server:
                server = ConfigServer(broker.url)
                await nursery.start(server.run)
            yield target
            if server is not None:
                with trio.move_on_after(5):
                    await server.async_shutdown()
            target.ended = "shut down"
            await broker.shutdown()
        finally:
            logger.removeHandler(handler)
            logger.propagate = propagate
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def _in_own_process(
    options: dict[str, Any], config_server: bool, log_path: str | None
) -> AsyncIterator[BrokerUnderTest]:
    command = [sys.executable, "-m", "peerkit._stress.serve", "--options", json.dumps(options)]
    if not config_server:
        command.append("--no-config-server")
    env = dict(os.environ)
    # the broker runs the same peerkit as this process
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
    async with trio.open_nursery() as nursery:
        run = functools.partial(
            trio.run_process,
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            check=False,
        )
        process: trio.Process = await nursery.start(run)
        assert process.stdout is not None and process.stderr is not None
        lines = _lines(process.stdout)
        with trio.fail_after(30):
            first = await lines.__anext__()
        if not first.startswith("url "):
            raise RuntimeError(f"the broker process did not start: {first!r}")
        target = BrokerUnderTest(first[4:], process.pid)

        async def watch_logs() -> None:
            assert process.stderr is not None
            in_error = False
            log_file = open(log_path, "w") if log_path else None  # noqa: SIM115, ASYNC230
            async for line in _lines(process.stderr):
                if log_file is not None:
                    log_file.write(line + "\n")
                level = logging.getLevelName(line.split(" ", 1)[0])
                if isinstance(level, int):
                    target.note(level, line)
                    in_error = level >= logging.ERROR
                elif in_error:  # a traceback's lines follow their record
                    target.errors.append(line)
            if log_file is not None:
                log_file.close()
            await process.wait()
            target.ended = target.ended or f"the broker process exited ({process.returncode})"

        nursery.start_soon(watch_logs)
        try:
            yield target
        finally:
            target.ended = target.ended or "shut down"
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
            with trio.move_on_after(15):
                await process.wait()
            if process.returncode is None:
                process.kill()
            nursery.cancel_scope.cancel()


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", "replace")
    if buffer:
        yield buffer.decode("utf-8", "replace")
