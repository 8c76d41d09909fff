"""Benchmark building blocks without I/O: messages, payloads, statistics, the table.

Used by :mod:`peerkit.bench` (the parent) and :mod:`peerkit.bench._workers` (its worker
processes).
"""

from __future__ import annotations

import math
import statistics
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..messages import Message, message

__all__ = [
    "HEAD",
    "LARGE",
    "MB",
    "SMALL",
    "BenchMsg",
    "BenchQuery",
    "BenchReply",
    "Figure",
    "RunCounter",
    "format_table",
    "make_payload",
    "percentile",
    "read_payload",
]


#: Payload sizes of the figures, and the MB of MB/s (10^6 bytes of payload).
SMALL = 100
LARGE = 8 * 1024
MB = 1_000_000.0


@message(type="peerkit.bench.Msg")
class BenchMsg(Message):
    """A published benchmark message (the payload carries run id, sequence and send time)."""

    payload: bytes


@message(type="peerkit.bench.Query")
class BenchQuery(Message):
    payload: bytes


@message(type="peerkit.bench.Reply")
class BenchReply(Message):
    payload: bytes


HEAD = struct.Struct("<IQd")  # run id, sequence number, time.monotonic() when sent


def make_payload(run: int, seq: int, size: int, sent: float = 0.0) -> bytes:
    """A ``size``-byte payload (at least the 20-byte header) carrying run, seq and send time."""
    head = HEAD.pack(run, seq, sent)
    return head + bytes(max(0, size - len(head)))


def read_payload(payload: bytes) -> tuple[int, int, float]:
    """``(run, seq, sent)`` of a payload made by :func:`make_payload`."""
    run, seq, sent = HEAD.unpack_from(payload)
    return int(run), int(seq), float(sent)


# ------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class RunCounter:
    """Counts one run's messages at a subscriber (and checks their order)."""

    def __init__(self) -> None:
        self.arm(0, 0)

    def arm(self, run: int, expected: int, *, latency: bool = False) -> None:
        self.run = run
        self.expected = expected
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.next_seq = 0
        self.out_of_order = 0
        self.stale = 0
        self.keep_latency = latency
        self.latencies: list[float] = []

    def feed(self, payload: bytes) -> None:
        now = time.monotonic()
        run, seq, sent = HEAD.unpack_from(payload)
        if run != self.run:
            self.stale += 1
            return
        if self.count == 0:
            self.first = now
        self.last = now
        self.count += 1
        if seq < self.next_seq:
            self.out_of_order += 1
        self.next_seq = seq + 1
        if self.keep_latency:
            self.latencies.append(now - sent)

    def result(self, dropped: int, complete: bool) -> dict[str, Any]:
        res: dict[str, Any] = {
            "run": self.run,
            "expected": self.expected,
            "count": self.count,
            "dropped": dropped,
            "first": self.first,
            "last": self.last,
            "out_of_order": self.out_of_order,
            "stale": self.stale,
            "complete": complete,
        }
        if self.keep_latency and self.latencies:
            ms = [x * 1000.0 for x in self.latencies]
            res["lat_median_ms"] = statistics.median(ms)
            res["lat_p99_ms"] = percentile(ms, 99)
        return res


# ------------------------------------------------------------------------------ the table


@dataclass
class Figure:
    """One line of the table: the median of ``runs`` (or a fixed ``value``) and its target."""

    label: str
    unit: str
    runs: list[float] = field(default_factory=list)
    #: ``(">=", bound)`` or ``("<=", bound)``
    target: tuple[str, float] | None = None
    fixed: float | None = None
    digits: int = 0
    note: str = ""
    #: a text shown instead of a number (checks, failures)
    text: str | None = None
    ok: bool | None = None

    @property
    def value(self) -> float | None:
        if self.fixed is not None:
            return self.fixed
        return statistics.median(self.runs) if self.runs else None

    @property
    def met(self) -> bool | None:
        if self.ok is not None:
            return self.ok
        value = self.value
        if self.target is None or value is None:
            return None
        op, bound = self.target
        return value >= bound if op == ">=" else value <= bound

    def fmt(self, v: float) -> str:
        return f"{v:,.{self.digits}f}"

    def value_text(self) -> str:
        if self.text is not None:
            return self.text
        value = self.value
        return "-" if value is None else self.fmt(value)

    def target_text(self) -> str:
        if self.target is None:
            return ""
        op, bound = self.target
        sign = "≥" if op == ">=" else "≤"
        digits = 0 if bound == int(bound) else max(1, self.digits)
        return (
            f"{sign} {bound:,.{digits}f}".rstrip("0")
            if digits > 1
            else f"{sign} {bound:,.{digits}f}"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "unit": self.unit,
            "value": self.value,
            "text": self.text,
            "runs": self.runs,
            "target": None
            if self.target is None
            else {"op": self.target[0], "bound": self.target[1]},
            "met": self.met,
            "note": self.note,
        }


def format_table(figures: Sequence[Figure]) -> str:
    """Plain aligned text: figure, median, unit, target, met, the runs and a note."""
    header = ("figure", "median", "unit", "target", "met", "runs", "notes")
    rows: list[tuple[str, ...]] = [header]
    for f in figures:
        met = {True: "yes", False: "NO", None: ""}[f.met]
        runs = " ".join(f.fmt(v) for v in f.runs) if len(f.runs) > 1 and f.text is None else ""
        rows.append((f.label, f.value_text(), f.unit, f.target_text(), met, runs, f.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {1, 3}
    lines = []
    for n, r in enumerate(rows):
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
