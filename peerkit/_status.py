"""The launcher's status display (internal): a live table on a terminal, log lines elsewhere.

Two implementations of one small interface: :class:`TerminalView` redraws a table in place
with ANSI escapes and prints events above it; :class:`LogView` prints every event as a
timestamped line and a one-line summary every ``summary_interval`` seconds, for output that
is not a terminal (CI logs, files, pipes). Neither does any I/O but writing to its stream.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import Protocol, TextIO

import attrs

__all__ = ["LogView", "PeerRow", "StatusView", "TerminalView", "format_table"]


@attrs.frozen
class PeerRow:
    """One line of the status table."""

    peer_id: str
    state: str
    pid: int | None = None
    #: messages per second the peer receives / sends (as counted by the broker)
    rate_in: float = 0.0
    rate_out: float = 0.0
    dropped: int = 0
    essential: bool = True
    last_error: str = ""


class StatusView(Protocol):
    """Where the launcher shows what happens."""

    def event(self, elapsed: float, text: str) -> None:
        """Something happened (a peer changed state, failed, the experiment stops...)."""

    def update(self, elapsed: float, title: str, rows: Sequence[PeerRow]) -> None:
        """The current state of every peer (called a few times a second)."""

    def close(self) -> None:
        """The run is over: leave the last table on screen, stop redrawing."""


def _rate(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == 0 else f"{value:.1f}"


_HEADERS = ("PEER", "PID", "STATE", "IN/s", "OUT/s", "DROPPED", "LAST ERROR")


def format_table(rows: Sequence[PeerRow], width: int = 100) -> list[str]:
    """The status table as lines no longer than ``width`` characters."""
    cells = [
        (
            r.peer_id + ("" if r.essential else " (n/e)"),
            "-" if r.pid is None else str(r.pid),
            r.state,
            _rate(r.rate_in),
            _rate(r.rate_out),
            str(r.dropped),
            r.last_error.replace("\n", " "),
        )
        for r in rows
    ]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(_HEADERS)]
    right = {3, 4, 5}

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(widths[i]) if i in right else v.ljust(widths[i])
            for i, v in enumerate(values[:-1])
        ]
        text = "  ".join([*parts, values[-1]]).rstrip()
        return text if len(text) <= width else text[: max(width - 1, 0)] + "…"

    return [line(_HEADERS), *(line(c) for c in cells)]


def _stamp(elapsed: float) -> str:
    return f"[{elapsed:7.1f}s]"


class TerminalView:
    """Redraws the table in place; events scroll above it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._drawn = 0
        self._last: list[str] = []

    def _erase(self) -> None:
        if self._drawn:
            # to the start of the first table line, then clear to the end of the screen
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        for text in self._last:
            self.stream.write(text + "\n")
        self._drawn = len(self._last)
        self.stream.flush()

    def event(self, elapsed: float, text: str) -> None:
        self._erase()
        self.stream.write(f"{_stamp(elapsed)} {text}\n")
        self._draw()

    def update(self, elapsed: float, title: str, rows: Sequence[PeerRow]) -> None:
        width = shutil.get_terminal_size((100, 24)).columns
        self._erase()
        self._last = ["", f"{title}  [{elapsed:.1f} s]"[:width], *format_table(rows, width)]
        self._draw()

    def close(self) -> None:
        self._drawn = 0  # the last table stays where it is
        self.stream.flush()


class LogView:
    """Plain lines: each event, and a summary of every peer each ``summary_interval`` s."""

    def __init__(self, stream: TextIO, summary_interval: float = 10.0) -> None:
        self.stream = stream
        self.summary_interval = summary_interval
        self._next_summary: float | None = None

    def event(self, elapsed: float, text: str) -> None:
        self.stream.write(f"{_stamp(elapsed)} {text}\n")
        self.stream.flush()

    def update(self, elapsed: float, title: str, rows: Sequence[PeerRow]) -> None:
        if self._next_summary is None:
            self._next_summary = elapsed + self.summary_interval
            return
        if elapsed < self._next_summary:
            return
        self._next_summary = elapsed + self.summary_interval
        parts = [
            f"{r.peer_id} {r.state} in {_rate(r.rate_in)}/s out {_rate(r.rate_out)}/s"
            + (f" dropped {r.dropped}" if r.dropped else "")
            for r in rows
        ]
        self.event(elapsed, "status: " + "; ".join(parts))

    def close(self) -> None:
        self.stream.flush()
