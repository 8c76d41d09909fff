"""Status displays (internal): the launcher's live view, and ``peerkit peers``' listing.

The launcher's view has two implementations of one small interface: :class:`TerminalView`
redraws a table in place with ANSI escapes and prints events above it; :class:`LogView` prints
every event as a timestamped line and a one-line summary every ``summary_interval`` seconds,
for output that is not a terminal (CI logs, files, pipes). Neither does any I/O but writing to
its stream.

:func:`peer_records` and :func:`peers_table` turn the broker's :class:`~peerkit.protocol.PeerInfo`
records into ``peerkit peers --json`` and its table. Both read the message counts through one
function, :func:`peer_counts`, so the table and the JSON cannot disagree on their direction.
:func:`event_line` and :func:`event_record` do the same for ``peerkit peers --watch``: the
broker's state events as a line, or as a JSON object.
"""

from __future__ import annotations

import datetime
import shutil
from collections.abc import Sequence
from typing import Any, Protocol, TextIO

import attrs

from ..messages import PeerJoined, PeerLeft, PeerStateChanged
from ..protocol import PeerInfo

__all__ = [
    "LogView",
    "PeerRow",
    "StatusEvent",
    "StatusView",
    "TerminalView",
    "event_line",
    "event_record",
    "format_table",
    "peer_counts",
    "peer_records",
    "peers_table",
]


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
    #: runs after the first (the restart policy's)
    restarts: int = 0


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


_HEADERS = ("PEER", "PID", "STATE", "IN/s", "OUT/s", "DROPPED", "RESTARTS", "LAST ERROR")


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
            str(r.restarts),
            r.last_error.replace("\n", " "),
        )
        for r in rows
    ]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(_HEADERS)]
    right = {3, 4, 5, 6}

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
            + (f" restarts {r.restarts}" if r.restarts else "")
            for r in rows
        ]
        self.event(elapsed, "status: " + "; ".join(parts))

    def close(self) -> None:
        self.stream.flush()


# ----------------------------------------------------------------------------- peerkit peers


def peer_counts(info: PeerInfo) -> dict[str, int]:
    """A peer's message counts, named from the peer's point of view.

    ``sent``: messages it published (the broker's ``msgs_in``); ``received``: published
    messages the broker delivered to it (``msgs_out``); ``queued``: published messages
    waiting in the broker to go to it; ``dropped``: published messages meant for it that the
    broker dropped.
    """
    return {
        "sent": info.msgs_in,
        "received": info.msgs_out,
        "queued": info.queued,
        "dropped": info.dropped,
    }


def peer_records(infos: Sequence[PeerInfo]) -> list[dict[str, Any]]:
    """``peerkit peers --json``: one object per peer (the counts of :func:`peer_counts`)."""
    return [
        {
            "peer_id": p.peer_id,
            "state": p.state,
            **peer_counts(p),
            "subscriptions": list(p.subscriptions),
            "query_handlers": list(p.query_handlers),
        }
        for p in infos
    ]


def peers_table(infos: Sequence[PeerInfo]) -> list[str]:
    """``peerkit peers``' table: a line per peer, its subscriptions and handlers below it."""
    if not infos:
        return ["no peers connected"]
    counts = [peer_counts(p) for p in infos]
    keys = list(counts[0])
    headers = ("PEER", "STATE", *(k.upper() for k in keys))
    cells = [
        (p.peer_id, p.state, *(str(c[k]) for k in keys)) for p, c in zip(infos, counts, strict=True)
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    numeric = range(2, len(headers))

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(widths[i]) if i in numeric else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return "  ".join(parts).rstrip()

    lines = [line(headers)]
    for p, row in zip(infos, cells, strict=True):
        lines.append(line(row))
        if p.subscriptions:
            lines.append(f"    subscribes to: {', '.join(p.subscriptions)}")
        if p.query_handlers:
            lines.append(f"    answers:       {', '.join(p.query_handlers)}")
    return lines


# ---------------------------------------------------------------------- peerkit peers --watch

#: The broker's state events, which ``peerkit peers --watch`` shows.
StatusEvent = PeerJoined | PeerStateChanged | PeerLeft

#: peer ids up to this long keep the --watch columns aligned
_WATCH_ID_WIDTH = 16


def _what(msg: StatusEvent) -> str:
    if isinstance(msg, PeerJoined):
        return "joined (resumed)" if msg.resumed else "joined"
    if isinstance(msg, PeerStateChanged):
        counts = f" (counts as {msg.base})" if msg.base and msg.base != msg.new else ""
        return f"{msg.old} -> {msg.new}{counts}"
    if msg.clean:
        return "left (clean)" if msg.reason == "goodbye" else f"left (clean: {msg.reason})"
    return f"left ({msg.reason})"


def event_line(msg: StatusEvent, when: datetime.datetime) -> str:
    """One event as ``12:00:01.234  amplifier         ready -> running``."""
    stamp = when.strftime("%H:%M:%S.%f")[:-3]
    return f"{stamp}  {msg.sender.ljust(_WATCH_ID_WIDTH)}  {_what(msg)}"


def event_record(msg: StatusEvent, when: datetime.datetime) -> dict[str, Any]:
    """One event as a JSON object: ``time`` (ISO 8601), ``peer_id``, ``event`` (``joined``,
    ``state`` or ``left``) and the event's own fields."""
    record: dict[str, Any] = {"time": when.isoformat(), "peer_id": msg.sender}
    if isinstance(msg, PeerJoined):
        record.update(event="joined", resumed=msg.resumed)
    elif isinstance(msg, PeerStateChanged):
        record.update(event="state", old=msg.old, new=msg.new, base=msg.base or msg.new)
    else:
        record.update(event="left", clean=msg.clean, reason=msg.reason)
    return record
