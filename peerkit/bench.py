"""Benchmarks: ``python -m peerkit.bench`` (or ``nox -s bench``).

Every figure is measured with separate OS processes for the broker, the publisher(s) and
the subscriber(s). The parent process only orchestrates: it starts the workers
(``python -m peerkit.bench worker ROLE CONFIG``), talks to them with JSON lines over their
stdin/stdout, reads their results and prints one table with the targets of issue 5 beside
each figure (the median of ``--runs`` runs).

Throughput is measured at the subscriber, from the first to the last message received, for
a fixed number of messages per run (chosen by a warm-up run so that a run lasts about two
seconds). What arrives is counted exactly: messages the broker or the peer dropped are
reported, never hidden, and so is any message that arrives out of order.

Workers cannot outlive the bench: each has a hard timeout (a watchdog thread calls
``os._exit``), exits as soon as its stdin reaches end-of-file (the parent is gone), and the
parent kills every worker it started when a group of measurements ends, however it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio_websocket

from .broker import Broker
from .messages import Message, message
from .peer import Peer

__all__ = [
    "BenchMsg",
    "BenchQuery",
    "BenchReply",
    "Figure",
    "RunCounter",
    "format_table",
    "main",
    "make_payload",
    "percentile",
    "read_payload",
]

# ------------------------------------------------------------------------------ targets
#: Targets of issue 5 (100-byte messages unless said; separate processes; medians).
TARGET_P2P_MSGS = 250_000.0
TARGET_RATIO = 10.0
TARGET_FANOUT_MSGS = 400_000.0
TARGET_8K_MBS = 200.0
TARGET_QUERY_MEDIAN_MS = 0.5
TARGET_QUERY_P99_MS = 1.5
#: A lone message must be sent at once: its one-way latency should stay within the
#: round-trip budget (a batching timer would show up here as milliseconds).
TARGET_LONE_MS = 0.5

SMALL = 100
LARGE = 8 * 1024
FANOUT = 10
MB = 1_000_000.0

# ------------------------------------------------------------------------------ messages


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


_HEAD = struct.Struct("<IQd")  # run id, sequence number, time.monotonic() when sent


def make_payload(run: int, seq: int, size: int, sent: float = 0.0) -> bytes:
    """A ``size``-byte payload (at least the 20-byte header) carrying run, seq and send time."""
    head = _HEAD.pack(run, seq, sent)
    return head + bytes(max(0, size - len(head)))


def read_payload(payload: bytes) -> tuple[int, int, float]:
    """``(run, seq, sent)`` of a payload made by :func:`make_payload`."""
    run, seq, sent = _HEAD.unpack_from(payload)
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
        run, seq, sent = _HEAD.unpack_from(payload)
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
        digits = 0 if bound == int(bound) else 1
        return f"{sign} {bound:,.{digits}f}"

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


# ============================================================================== workers
# Each worker is `python -m peerkit.bench worker ROLE CONFIG-JSON`. Commands arrive as JSON
# lines on stdin ({"cmd": ...}); events leave as JSON lines on stdout ({"event": ...}).


class _LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def readline(self) -> bytes | None:
        """The next line without its newline; None at end of stream."""
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 1]
                return line
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                return None
            self._buf += chunk


class _Control:
    """A worker's side of the conversation with the parent."""

    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[dict[str, Any]](100)

    async def pump(self) -> None:
        """Read commands from stdin; exit the process at once when the parent is gone."""
        reader = _LineReader(trio.lowlevel.FdStream(os.dup(0)))
        while True:
            line = await reader.readline()
            if line is None:
                os._exit(0)  # the parent closed our stdin or died: leave no leftover
            if line.strip():
                await self._send.send(json.loads(line))

    async def next(self) -> dict[str, Any]:
        return await self._recv.receive()

    @staticmethod
    def emit(event: str, **fields: Any) -> None:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()


def _rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (``VmRSS`` of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _await_run(
    counter: RunCounter, dropped: Callable[[], int], start_timeout: float, idle_timeout: float
) -> dict[str, Any]:
    """Wait until ``expected`` messages arrived or were reported dropped, or stalled."""
    base = dropped()
    last_total = 0
    last_change = time.monotonic()
    while True:
        lost = dropped() - base
        total = counter.count + lost
        if total >= counter.expected:
            return counter.result(lost, complete=True)
        now = time.monotonic()
        if total != last_total:
            last_total, last_change = total, now
        if now - last_change > (idle_timeout if total else start_timeout):
            return counter.result(lost, complete=False)
        await trio.sleep(0.05)


async def _w_broker(cfg: dict[str, Any], ctl: _Control) -> None:
    broker = Broker("127.0.0.1", 0, **cfg.get("options", {}))
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.run)
        ctl.emit("ready", url=broker.url, pid=os.getpid())
        while True:
            cmd = await ctl.next()
            if cmd["cmd"] == "status":
                ids = set(broker.peer_ids)
                ctl.emit(
                    "status", peers=len(ids), present=[p for p in cmd.get("ids", []) if p in ids]
                )
            elif cmd["cmd"] == "quit":
                nursery.cancel_scope.cancel()
                return


async def _subscriber_loop(
    ctl: _Control, counter: RunCounter, dropped: Callable[[], int], cfg: dict[str, Any]
) -> None:
    ctl.emit("ready")
    while True:
        cmd = await ctl.next()
        if cmd["cmd"] == "arm":
            counter.arm(cmd["run"], cmd["expected"], latency=cmd.get("latency", False))
            ctl.emit("armed")
            res = await _await_run(
                counter, dropped, cfg.get("start_timeout", 30.0), cfg.get("idle_timeout", 3.0)
            )
            ctl.emit("result", **res)
        elif cmd["cmd"] == "quit":
            return


async def _w_sub(cfg: dict[str, Any], ctl: _Control) -> None:
    counter = RunCounter()
    async with Peer(cfg["url"], cfg["peer_id"]) as peer:

        def on_msg(msg: BenchMsg) -> None:
            counter.feed(msg.payload)

        await peer.subscribe_for_all_msg_subtype(BenchMsg, on_msg)
        await _subscriber_loop(ctl, counter, lambda: peer.dropped_messages, cfg)


async def _w_bare_sub(cfg: dict[str, Any], ctl: _Control) -> None:
    counter = RunCounter()
    async with trio_websocket.open_websocket_url(cfg["url"] + "/sub") as ws:
        if await ws.get_message() != b"ok":
            raise RuntimeError("the relay did not acknowledge the subscriber")

        async def receive() -> None:
            while True:
                frame = await ws.get_message()
                counter.feed(frame)  # type: ignore[arg-type]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await _subscriber_loop(ctl, counter, lambda: 0, cfg)
            nursery.cancel_scope.cancel()


async def _publisher_loop(
    ctl: _Control,
    send: Callable[[bytes], Awaitable[None]],
    send_many: Callable[[int, int, int], Awaitable[None]],
) -> None:
    """``send(payload)`` publishes one message; ``send_many(run, count, size)`` publishes
    ``count`` as fast as it can (a tight loop without an extra coroutine per message)."""
    ctl.emit("ready")
    while True:
        cmd = await ctl.next()
        if cmd["cmd"] == "publish":
            t0 = time.monotonic()
            await send_many(cmd["run"], cmd["count"], cmd["size"])
            ctl.emit("published", seconds=time.monotonic() - t0)
        elif cmd["cmd"] == "lone":
            run, count, size, interval = cmd["run"], cmd["count"], cmd["size"], cmd["interval"]
            for seq in range(count):
                await trio.sleep(interval)
                await send(make_payload(run, seq, size, time.monotonic()))
            ctl.emit("published", seconds=0.0)
        elif cmd["cmd"] == "quit":
            return


async def _w_pub(cfg: dict[str, Any], ctl: _Control) -> None:
    async with Peer(cfg["url"], cfg["peer_id"]) as peer:

        async def send(payload: bytes) -> None:
            await peer.send_message(BenchMsg(payload=payload))

        async def send_many(run: int, count: int, size: int) -> None:
            pad = bytes(max(0, size - _HEAD.size))
            pack, send_message = _HEAD.pack, peer.send_message
            for seq in range(count):
                await send_message(BenchMsg(payload=pack(run, seq, 0.0) + pad))

        await _publisher_loop(ctl, send, send_many)


async def _w_bare_pub(cfg: dict[str, Any], ctl: _Control) -> None:
    async with trio_websocket.open_websocket_url(cfg["url"] + "/pub") as ws:

        async def send_many(run: int, count: int, size: int) -> None:
            pad = bytes(max(0, size - _HEAD.size))
            pack, send_message = _HEAD.pack, ws.send_message
            for seq in range(count):
                await send_message(pack(run, seq, 0.0) + pad)

        await _publisher_loop(ctl, ws.send_message, send_many)


async def _w_relay(cfg: dict[str, Any], ctl: _Control) -> None:
    """A bare trio-websocket relay, one message per frame: each frame from ``/pub`` goes to
    every ``/sub`` connection; each frame from an ``/rpc`` connection goes to every other
    ``/rpc`` connection (a request/echo round trip, the baseline of the query figure)."""
    groups: dict[str, list[trio_websocket.WebSocketConnection]] = {"/sub": [], "/rpc": []}

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        path = request.path
        members = groups.get(path)
        if members is not None:
            members.append(ws)
            await ws.send_message(b"ok")
        try:
            while True:
                frame = await ws.get_message()
                if path == "/pub":
                    for sub in groups["/sub"]:
                        await sub.send_message(frame)
                elif path == "/rpc":
                    for other in groups["/rpc"]:
                        if other is not ws:
                            await other.send_message(frame)
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            if members is not None:
                members.remove(ws)

    async with trio.open_nursery() as nursery:
        server: trio_websocket.WebSocketServer = await nursery.start(
            trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None
        )
        ctl.emit("ready", url=f"ws://127.0.0.1:{server.port}", pid=os.getpid())
        while (await ctl.next())["cmd"] != "quit":
            pass
        nursery.cancel_scope.cancel()


async def _w_bare_echo(cfg: dict[str, Any], ctl: _Control) -> None:
    async with trio_websocket.open_websocket_url(cfg["url"] + "/rpc") as ws:
        if await ws.get_message() != b"ok":
            raise RuntimeError("the relay did not acknowledge the echo")

        async def echo() -> None:
            while True:
                await ws.send_message(await ws.get_message())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            ctl.emit("ready")
            while (await ctl.next())["cmd"] != "quit":
                pass
            nursery.cancel_scope.cancel()


async def _w_qhandler(cfg: dict[str, Any], ctl: _Control) -> None:
    async with Peer(cfg["url"], cfg["peer_id"]) as peer:

        def answer(msg: BenchQuery) -> BenchReply:
            return BenchReply(payload=msg.payload)

        await peer.register_query_handler(BenchQuery, answer)
        ctl.emit("ready")
        while (await ctl.next())["cmd"] != "quit":
            pass


async def _asker_loop(ctl: _Control, ask: Callable[[bytes], Awaitable[bytes]]) -> None:
    ctl.emit("ready")
    while True:
        cmd = await ctl.next()
        if cmd["cmd"] == "query":
            payload = make_payload(cmd["run"], 0, cmd["size"])
            rtts: list[float] = []
            clock = time.perf_counter
            for _ in range(cmd["count"]):
                t0 = clock()
                reply = await ask(payload)
                rtts.append(clock() - t0)
                if reply != payload:
                    raise RuntimeError(f"wrong reply {reply!r}")
            ms = [x * 1000.0 for x in rtts]
            ctl.emit(
                "result",
                count=len(ms),
                median_ms=statistics.median(ms),
                p99_ms=percentile(ms, 99),
                mean_ms=statistics.fmean(ms),
                max_ms=max(ms),
            )
        elif cmd["cmd"] == "quit":
            return


async def _w_asker(cfg: dict[str, Any], ctl: _Control) -> None:
    async with Peer(cfg["url"], cfg["peer_id"]) as peer:

        async def ask(payload: bytes) -> bytes:
            reply = await peer.query(BenchQuery(payload=payload))
            if not isinstance(reply, BenchReply):
                raise RuntimeError(f"wrong reply {reply!r}")
            return reply.payload

        await _asker_loop(ctl, ask)


async def _w_bare_asker(cfg: dict[str, Any], ctl: _Control) -> None:
    async with trio_websocket.open_websocket_url(cfg["url"] + "/rpc") as ws:
        if await ws.get_message() != b"ok":
            raise RuntimeError("the relay did not acknowledge the asker")

        async def ask(payload: bytes) -> bytes:
            await ws.send_message(payload)
            reply = await ws.get_message()
            assert isinstance(reply, bytes)
            return reply

        await _asker_loop(ctl, ask)


async def _w_crowd(cfg: dict[str, Any], ctl: _Control) -> None:
    """Many peers in one process: connect them all at once when told to."""
    n, prefix = cfg["peers"], cfg["prefix"]
    peers = [Peer(cfg["url"], f"{prefix}-{i}", connect_timeout=120.0) for i in range(n)]
    errors: list[str] = []
    got = trio.Event()
    latency: list[float] = []

    async def run_one(p: Peer) -> None:
        try:
            await p.run()
        except Exception as exc:
            errors.append(f"{p.peer_id}: {type(exc).__name__}: {exc}")

    def on_msg(msg: BenchMsg) -> None:
        latency.append(time.monotonic() - read_payload(msg.payload)[2])
        got.set()

    ctl.emit("loaded", pid=os.getpid())
    async with trio.open_nursery() as nursery:
        while True:
            cmd = await ctl.next()
            if cmd["cmd"] == "connect":
                t0 = time.monotonic()
                for p in peers:
                    nursery.start_soon(run_one, p)
                with trio.move_on_after(cfg.get("ready_timeout", 120.0)):
                    for p in peers:
                        await p.wait_for_state(lambda q: q.is_ready or q.is_finished, 1e9)
                t1 = time.monotonic()
                ready = sum(1 for p in peers if p.is_ready)
                ctl.emit("ready", t0=t0, t1=t1, ready=ready, errors=errors[:3], failed=len(errors))
            elif cmd["cmd"] == "check":
                connected = sum(1 for p in peers if p.is_connected)
                ctl.emit("checked", connected=connected, failed=len(errors), errors=errors[:3])
            elif cmd["cmd"] == "subscribe":
                await peers[0].subscribe_for_all_msg_subtype(BenchMsg, on_msg)
                ctl.emit("subscribed")

                async def report() -> None:
                    await got.wait()
                    ctl.emit("received", latency_ms=latency[0] * 1000.0)

                nursery.start_soon(report)
            elif cmd["cmd"] == "publish":
                await peers[-1].send_message(
                    BenchMsg(payload=make_payload(0, 0, SMALL, time.monotonic()))
                )
                ctl.emit("published")
            elif cmd["cmd"] == "freeze":
                # Block the whole process (no heartbeat, no reading) like a hung program,
                # then vanish; unlike SIGSTOP this cannot leave a stopped orphan behind.
                ctl.emit("freezing")
                time.sleep(cmd["seconds"])  # noqa: ASYNC251
                os._exit(0)
            elif cmd["cmd"] == "quit":
                nursery.cancel_scope.cancel()
                return


_ROLES: dict[str, Callable[[dict[str, Any], _Control], Awaitable[None]]] = {
    "broker": _w_broker,
    "sub": _w_sub,
    "pub": _w_pub,
    "relay": _w_relay,
    "bare_sub": _w_bare_sub,
    "bare_pub": _w_bare_pub,
    "qhandler": _w_qhandler,
    "asker": _w_asker,
    "bare_echo": _w_bare_echo,
    "bare_asker": _w_bare_asker,
    "crowd": _w_crowd,
}


async def _worker(role: str, cfg: dict[str, Any]) -> None:
    ctl = _Control()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ctl.pump)
        await _ROLES[role](cfg, ctl)
        nursery.cancel_scope.cancel()


def _worker_main(role: str, cfg_json: str) -> int:
    import logging

    cfg: dict[str, Any] = json.loads(cfg_json)
    limit = float(cfg.get("hard_timeout", 600.0))

    def hard_exit() -> None:
        sys.stderr.write(f"bench worker {role}: hard timeout of {limit} s, exiting\n")
        sys.stderr.flush()
        os._exit(3)

    watchdog = threading.Timer(limit, hard_exit)
    watchdog.daemon = True
    watchdog.start()
    # A subscriber that overflows logs one warning per lost message; the bench counts the
    # losses itself, and writing thousands of log lines would distort the figures.
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    if role not in _ROLES:
        sys.stderr.write(f"unknown worker role {role!r}\n")
        return 2
    try:
        trio.run(_worker, role, cfg)
    except BaseException as exc:
        traceback.print_exc()
        _Control.emit("error", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


# ============================================================================== the parent


class BenchError(Exception):
    """A measurement could not be made (a worker failed, stalled or timed out)."""


class _Child:
    def __init__(self, name: str, proc: trio.Process, err_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.err_path = err_path
        assert proc.stdout is not None
        self._lines = _LineReader(proc.stdout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            text = self.err_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in text[-lines:])

    async def send(self, cmd: str, **fields: Any) -> None:
        assert self.proc.stdin is not None
        data = (json.dumps({"cmd": cmd, **fields}) + "\n").encode()
        try:
            await self.proc.stdin.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise BenchError(f"worker {self.name} is gone\n{self.stderr_tail()}") from None

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        with trio.move_on_after(timeout):
            while True:
                line = await self._lines.readline()
                if line is None:
                    await trio.sleep(0.1)
                    raise BenchError(
                        f"worker {self.name} exited (status {self.proc.poll()}) while the bench "
                        f"waited for {event!r}\n{self.stderr_tail()}"
                    )
                msg: dict[str, Any] = json.loads(line)
                if msg.get("event") == "error":
                    raise BenchError(
                        f"worker {self.name} failed: {msg.get('error')}\n{self.stderr_tail()}"
                    )
                if msg.get("event") == event:
                    return msg
        raise BenchError(f"worker {self.name}: no {event!r} within {timeout} s")


def _open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


class _Workers:
    """Starts workers; :meth:`close` (always called) kills every one of them."""

    def __init__(self, tmp: Path, hard_timeout: float) -> None:
        self.tmp = tmp
        self.hard_timeout = hard_timeout
        self.children: list[_Child] = []

    async def spawn(self, name: str, role: str, **cfg: Any) -> _Child:
        cfg.setdefault("hard_timeout", self.hard_timeout)
        err_path = self.tmp / f"{name}-{len(self.children)}.log"
        err = _open_log(err_path)
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "peerkit.bench", "worker", role, json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        finally:
            os.close(err)  # the child has its own copy
        child = _Child(name, proc, err_path)
        self.children.append(child)
        return child

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            for child in self.children:
                with contextlib.suppress(BenchError, OSError):
                    if child.proc.returncode is None:
                        with trio.move_on_after(0.5):
                            await child.send("quit")
            with trio.move_on_after(1.0):
                for child in self.children:
                    await child.proc.wait()
            for child in self.children:
                if child.proc.returncode is None:
                    with contextlib.suppress(OSError):
                        child.proc.kill()
                with trio.move_on_after(5.0):
                    await child.proc.wait()
                for stream in (child.proc.stdin, child.proc.stdout):
                    if stream is not None:
                        await stream.aclose()
            self.children.clear()


@contextlib.asynccontextmanager
async def _workers(opts: _Options) -> AsyncIterator[_Workers]:
    with tempfile.TemporaryDirectory(prefix="peerkit-bench-") as tmp:
        workers = _Workers(Path(tmp), opts.child_timeout)
        try:
            yield workers
        finally:
            await workers.close()


@dataclass
class _Options:
    runs: int
    quick: bool
    seconds: float
    peers: int
    clients: int
    child_timeout: float
    only: set[str]
    json_path: str | None


def _progress(text: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


class _RunIds:
    def __init__(self) -> None:
        self._next = 1

    def __call__(self) -> int:
        self._next += 1
        return self._next


_run_id = _RunIds()


@dataclass
class _Throughput:
    delivered: int
    expected: int
    dropped: int
    out_of_order: int
    stale: int
    seconds: float
    complete: bool
    #: CPU use of each process (percent of one core) between "publish" and the last result
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0


def _machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (busy time of /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _cpu_of(procs: Sequence[_Child]) -> dict[str, float]:
    cpu = {c.name: _cpu_seconds(c.pid) for c in procs}
    cpu["_machine"] = _machine_busy_seconds()
    return cpu


def _cpu_note(cpu: dict[str, float]) -> str:
    return "CPU " + ", ".join(f"{k} {v:.0f}%" for k, v in cpu.items())


async def _throughput_run(
    subs: Sequence[_Child], pub: _Child, count: int, size: int, server: _Child
) -> _Throughput:
    run = _run_id()
    for s in subs:
        await s.send("arm", run=run, expected=count)
    for s in subs:
        await s.expect("armed", 30)
    procs = [server, pub, *subs]
    cpu0, t0 = _cpu_of(procs), time.monotonic()
    await pub.send("publish", run=run, count=count, size=size)
    results = [await s.expect("result", 600) for s in subs]
    cpu1, wall = _cpu_of(procs), time.monotonic() - t0
    await pub.expect("published", 60)
    cpu = {k: 100.0 * (cpu1[k] - cpu0[k]) / wall for k in cpu0}
    machine = cpu.pop("_machine")
    ours = sum(cpu.values())
    if len(subs) > 1:
        total = sum(v for k, v in cpu.items() if k not in (server.name, pub.name))
        cpu = {server.name: cpu[server.name], pub.name: cpu[pub.name], f"{len(subs)} subs": total}
    # CPU the rest of the machine used meanwhile (other programs distort the figures)
    cpu["others"] = max(0.0, machine - ours)
    first = (
        min(r["first"] for r in results if r["count"]) if any(r["count"] for r in results) else 0.0
    )
    last = max(r["last"] for r in results)
    return _Throughput(
        delivered=sum(r["count"] for r in results),
        expected=count * len(subs),
        dropped=sum(r["dropped"] for r in results),
        out_of_order=sum(r["out_of_order"] for r in results),
        stale=sum(r["stale"] for r in results),
        seconds=max(0.0, last - first),
        complete=all(r["complete"] for r in results),
        cpu=cpu,
    )


def _loss_note(results: Sequence[_Throughput]) -> str:
    dropped = sum(r.dropped for r in results)
    expected = sum(r.expected for r in results)
    delivered = sum(r.delivered for r in results)
    missing = expected - delivered - dropped
    notes = []
    if dropped:
        notes.append(f"DROPPED {dropped:,} of {expected:,} ({100.0 * dropped / expected:.1f}%)")
    if missing > 0:
        notes.append(f"{missing:,} never arrived nor reported")
    ooo = sum(r.out_of_order for r in results)
    if ooo:
        notes.append(f"{ooo:,} OUT OF ORDER")
    return "; ".join(notes) or "no loss, in order"


@dataclass
class _System:
    """Something whose publisher → subscriber throughput is measured."""

    label: str
    server: _Child
    subs: Sequence[_Child]
    pub: _Child
    warmup: int
    count: int = 0
    results: list[_Throughput] = field(default_factory=list)


async def _measure_throughput(opts: _Options, systems: Sequence[_System], size: int) -> None:
    """A warm-up run sizes each system's runs (about ``opts.seconds`` each); then
    ``opts.runs`` rounds, each running every system once, so that they are compared under
    the same conditions (the ratio of peerkit to the bare relay is fair even on a machine
    whose load changes)."""
    for sy in systems:
        w = await _throughput_run(sy.subs, sy.pub, sy.warmup, size, sy.server)
        per_sub = w.rate / max(1, len(sy.subs))
        count = int(min(5_000_000, max(sy.warmup, per_sub * opts.seconds)))
        sy.count = max(1000, round(count, -3))
        _progress(
            f"{sy.label} {size} B: warm-up {sy.warmup:,} msgs → {w.rate:,.0f} msgs/s; "
            f"{opts.runs} run(s) of {sy.count:,} msgs"
        )
    for i in range(opts.runs):
        for sy in systems:
            r = await _throughput_run(sy.subs, sy.pub, sy.count, size, sy.server)
            sy.results.append(r)
            _progress(
                f"{sy.label} {size} B: run {i + 1}/{opts.runs}: {r.rate:,.0f} msgs/s, "
                f"{r.rate * size / MB:,.1f} MB/s, {r.delivered:,}/{r.expected:,} delivered "
                f"in {r.seconds:.2f} s; {_loss_note([r])}; {_cpu_note(r.cpu)}"
            )


async def _lone_latency(
    label: str, opts: _Options, sub: _Child, pub: _Child
) -> tuple[list[float], list[float]]:
    count = 20 if opts.quick else 100
    medians: list[float] = []
    p99s: list[float] = []
    for i in range(opts.runs):
        run = _run_id()
        await sub.send("arm", run=run, expected=count, latency=True)
        await sub.expect("armed", 30)
        await pub.send("lone", run=run, count=count, size=SMALL, interval=0.01)
        res = await sub.expect("result", 120)
        await pub.expect("published", 60)
        if res["count"] == 0:
            raise BenchError(f"{label}: no lone message arrived")
        medians.append(res["lat_median_ms"])
        p99s.append(res["lat_p99_ms"])
        _progress(
            f"{label}: lone-message run {i + 1}/{opts.runs}: median "
            f"{res['lat_median_ms']:.3f} ms, p99 {res['lat_p99_ms']:.3f} ms "
            f"({res['count']}/{count} received)"
        )
    return medians, p99s


# ------------------------------------------------------------------------------ groups


@dataclass
class _Report:
    figures: dict[str, Figure] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _median_cpu(results: Sequence[_Throughput]) -> dict[str, float]:
    return {k: statistics.median(r.cpu[k] for r in results) for k in results[0].cpu}


def _tp_figures(report: _Report, key: str, label: str, size: int, sy: _System) -> None:
    results = sy.results
    rates = [r.rate for r in results]
    note = _loss_note(results) + f"; {sy.count:,} msgs/run"
    report.figures[f"{key}_msgs"] = Figure(label, "msgs/s", rates, note=note)
    report.figures[f"{key}_mbs"] = Figure(
        label,
        "MB/s",
        [r * size / MB for r in rates],
        digits=1,
        note=_cpu_note(_median_cpu(results)),
    )
    report.raw[key] = [vars(r) for r in results]


async def _group_p2p(opts: _Options, report: _Report) -> None:
    """peerkit and the bare relay, publisher → subscriber, runs interleaved."""
    async with _workers(opts) as w:
        broker = await w.spawn("broker", "broker")
        relay = await w.spawn("relay", "relay")
        url = (await broker.expect("ready", 60))["url"]
        relay_url = (await relay.expect("ready", 60))["url"]
        sub = await w.spawn("sub", "sub", url=url, peer_id="bench-sub")
        pub = await w.spawn("pub", "pub", url=url, peer_id="bench-pub")
        bare_sub = await w.spawn("bare_sub", "bare_sub", url=relay_url)
        bare_pub = await w.spawn("bare_pub", "bare_pub", url=relay_url)
        for c in (sub, pub, bare_sub, bare_pub):
            await c.expect("ready", 60)
        for size in (SMALL, LARGE):
            big = size > SMALL
            ours = _System("peerkit", broker, [sub], pub, 2000 if opts.quick or big else 20_000)
            bare = _System(
                "bare relay", relay, [bare_sub], bare_pub, 2000 if opts.quick or big else 5000
            )
            await _measure_throughput(opts, [ours, bare], size)
            _tp_figures(report, f"p2p_{size}", f"1 pub → broker → 1 sub, {size} B", size, ours)
            _tp_figures(
                report,
                f"bare_{size}",
                f"bare trio-websocket relay, 1 msg/frame, {size} B",
                size,
                bare,
            )
        medians, p99s = await _lone_latency("peerkit", opts, sub, pub)
        report.figures["lone"] = Figure(
            "lone message latency, pub → broker → sub (one-way)",
            "ms",
            medians,
            target=("<=", TARGET_LONE_MS),
            digits=3,
            note=f"p99 {statistics.median(p99s):.3f} ms; one message every 10 ms",
        )
        medians, p99s = await _lone_latency("bare relay", opts, bare_sub, bare_pub)
        report.figures["bare_lone"] = Figure(
            "lone message latency, bare relay (one-way)",
            "ms",
            medians,
            digits=3,
            note=f"p99 {statistics.median(p99s):.3f} ms; reference",
        )


async def _group_fanout(opts: _Options, report: _Report) -> None:
    async with _workers(opts) as w:
        broker = await w.spawn("broker", "broker")
        url = (await broker.expect("ready", 60))["url"]
        subs = [
            await w.spawn(f"sub{i}", "sub", url=url, peer_id=f"bench-sub-{i}")
            for i in range(FANOUT)
        ]
        pub = await w.spawn("pub", "pub", url=url, peer_id="bench-pub")
        for s in [*subs, pub]:
            await s.expect("ready", 120)
        sy = _System(
            f"peerkit fan-out x{FANOUT}", broker, subs, pub, 2000 if opts.quick else 10_000
        )
        await _measure_throughput(opts, [sy], SMALL)
        results, count = sy.results, sy.count
        report.figures["fanout_msgs"] = Figure(
            f"1 pub → broker → {FANOUT} subs, {SMALL} B, delivered in total",
            "msgs/s",
            [r.rate for r in results],
            target=(">=", TARGET_FANOUT_MSGS),
            note=_loss_note(results)
            + f"; {count:,} msgs/run x {FANOUT}; "
            + _cpu_note(_median_cpu(results)),
        )
        report.raw["fanout"] = [vars(r) for r in results]


async def _group_query(opts: _Options, report: _Report) -> None:
    """Query round trips through the broker, interleaved with echo round trips through the
    bare relay (the baseline)."""
    async with _workers(opts) as w:
        broker = await w.spawn("broker", "broker")
        relay = await w.spawn("relay", "relay")
        url = (await broker.expect("ready", 60))["url"]
        relay_url = (await relay.expect("ready", 60))["url"]
        handler = await w.spawn("qhandler", "qhandler", url=url, peer_id="bench-handler")
        asker = await w.spawn("asker", "asker", url=url, peer_id="bench-asker")
        echo = await w.spawn("bare_echo", "bare_echo", url=relay_url)
        bare = await w.spawn("bare_asker", "bare_asker", url=relay_url)
        for c in (handler, asker, echo, bare):
            await c.expect("ready", 60)
        warm = 200 if opts.quick else 1000
        counts = {}
        for name, child in (("peerkit", asker), ("bare relay", bare)):
            await child.send("query", run=_run_id(), count=warm, size=SMALL)
            res = await child.expect("result", 120)
            count = int(max(500, min(50_000, opts.seconds / (res["mean_ms"] / 1000.0))))
            counts[name] = round(count, -2)
            _progress(
                f"{name} round trip: warm-up {warm} queries, mean {res['mean_ms']:.3f} ms; "
                f"{opts.runs} run(s) of {counts[name]:,}"
            )
        results: dict[str, list[dict[str, Any]]] = {"peerkit": [], "bare relay": []}
        for i in range(opts.runs):
            for name, child in (("peerkit", asker), ("bare relay", bare)):
                await child.send("query", run=_run_id(), count=counts[name], size=SMALL)
                res = await child.expect("result", 600)
                results[name].append(res)
                _progress(
                    f"{name} round trip: run {i + 1}/{opts.runs}: median "
                    f"{res['median_ms']:.3f} ms, p99 {res['p99_ms']:.3f} ms, "
                    f"max {res['max_ms']:.3f} ms"
                )
        ours, base = results["peerkit"], results["bare relay"]
        label = f"query round trip, one at a time, {SMALL} B"
        report.figures["query_median"] = Figure(
            label + ": median",
            "ms",
            [r["median_ms"] for r in ours],
            target=("<=", TARGET_QUERY_MEDIAN_MS),
            digits=3,
            note=f"{counts['peerkit']:,} queries/run",
        )
        report.figures["query_p99"] = Figure(
            label + ": p99",
            "ms",
            [r["p99_ms"] for r in ours],
            target=("<=", TARGET_QUERY_P99_MS),
            digits=3,
        )
        report.figures["bare_rtt"] = Figure(
            f"round trip, bare relay (echo), {SMALL} B: median",
            "ms",
            [r["median_ms"] for r in base],
            digits=3,
            note=f"p99 {statistics.median(r['p99_ms'] for r in base):.3f} ms; reference",
        )
        report.raw["query"] = ours
        report.raw["bare_rtt"] = base


async def _crowd_run(opts: _Options, n: int) -> dict[str, Any]:
    hb_interval, hb_timeout = 0.5, 2.0
    clients = max(1, min(opts.clients, n))
    async with _workers(opts) as w:
        broker = await w.spawn(
            "broker",
            "broker",
            options={"heartbeat_interval": hb_interval, "heartbeat_timeout": hb_timeout},
        )
        url = (await broker.expect("ready", 60))["url"]
        await trio.sleep(0.5)
        rss0 = _rss_kib(broker.pid)
        sizes = [n // clients + (1 if i < n % clients else 0) for i in range(clients)]
        crowd = [
            await w.spawn(f"crowd{i}", "crowd", url=url, peers=k, prefix=f"crowd{i}")
            for i, k in enumerate(sizes)
        ]
        sentinel = await w.spawn("sentinel", "crowd", url=url, peers=1, prefix="sentinel")
        for c in [*crowd, sentinel]:
            await c.expect("loaded", 120)
        clients_rss0 = sum(_rss_kib(c.pid) for c in crowd)
        for c in crowd:
            await c.send("connect")
        readies = [await c.expect("ready", 180) for c in crowd]
        connect_s = max(r["t1"] for r in readies) - min(r["t0"] for r in readies)
        ready = sum(r["ready"] for r in readies)
        failed = sum(r["failed"] for r in readies)
        errors = [e for r in readies for e in r["errors"]]
        _progress(
            f"{n} peers: {ready} ready in {connect_s:.2f} s"
            + (f"; {failed} FAILED, e.g. {errors[0]}" if failed else "")
        )
        await sentinel.send("connect")
        await sentinel.expect("ready", 60)
        rss_ready = _rss_kib(broker.pid)
        # Peers must stay connected past the heartbeat timeout: the broker keeps up with
        # 2 x n heartbeats per second and its monitor does not drop live peers.
        await trio.sleep(max(3.0, hb_timeout * 1.5))
        await broker.send("status", ids=["sentinel-0"])
        status = await broker.expect("status", 30)
        checks = []
        for c in crowd:
            await c.send("check")
            checks.append(await c.expect("checked", 30))
        connected = sum(c["connected"] for c in checks)
        rss_after = _rss_kib(broker.pid)
        client_rss = sum(_rss_kib(c.pid) for c in crowd)
        _progress(
            f"{n} peers: after {max(3.0, hb_timeout * 1.5):.1f} s (heartbeat timeout "
            f"{hb_timeout} s) the broker holds {status['peers']} peers, clients see "
            f"{connected}/{n} connected; broker RSS {rss0 / 1024:.1f} → {rss_after / 1024:.1f} MiB"
        )
        # Routing still works: a message published now reaches a subscriber.
        await crowd[0].send("subscribe")
        await crowd[0].expect("subscribed", 30)
        await crowd[-1].send("publish")
        await crowd[-1].expect("published", 30)
        routed = True
        try:
            got = await crowd[0].expect("received", 10)
            route_ms = float(got["latency_ms"])
        except BenchError:
            routed, route_ms = False, float("nan")
        # Heartbeats are checked: one peer's process freezes; the broker must drop it.
        await sentinel.send("freeze", seconds=hb_timeout * 5)
        await sentinel.expect("freezing", 30)
        t_stop = time.monotonic()
        drop_s = float("nan")
        while time.monotonic() - t_stop < hb_timeout * 5:
            await broker.send("status", ids=["sentinel-0"])
            st = await broker.expect("status", 30)
            if not st["present"]:
                drop_s = time.monotonic() - t_stop
                break
            await trio.sleep(0.05)
        await broker.send("status", ids=[])
        final = await broker.expect("status", 30)
        _progress(
            f"{n} peers: routed after connect: {routed} ({route_ms:.2f} ms); frozen peer "
            f"dropped after {drop_s:.2f} s; broker still holds {final['peers']} peers"
        )
        return {
            "peers": n,
            "clients": clients,
            "ready": ready,
            "failed": failed,
            "errors": errors[:3],
            "connect_s": connect_s,
            "broker_rss_kib": {"before": rss0, "ready": rss_ready, "after_wait": rss_after},
            "broker_kib_per_peer": (rss_after - rss0) / max(1, status["peers"]),
            "client_kib_per_peer": (client_rss - clients_rss0) / n,
            "broker_peers_after_wait": status["peers"],
            "connected_after_wait": connected,
            "routed": routed,
            "route_ms": route_ms,
            "frozen_dropped_s": drop_s,
            "broker_peers_final": final["peers"],
            "heartbeat": [hb_interval, hb_timeout],
        }


async def _group_crowd(opts: _Options, report: _Report) -> None:
    n = opts.peers
    runs = [await _crowd_run(opts, n) for _ in range(opts.runs)]
    report.raw["crowd"] = runs
    hb_i, hb_t = runs[0]["heartbeat"]
    all_ready = all(r["ready"] == n and r["failed"] == 0 for r in runs)
    report.figures["crowd_ready"] = Figure(
        f"{n} peers at once: connected and ready",
        "peers",
        [float(r["ready"]) for r in runs],
        ok=all_ready,
        note="" if all_ready else f"failures, e.g. {runs[0]['errors'][:1]}",
        text=" / ".join(str(r["ready"]) for r in runs),
    )
    report.figures["crowd_connect"] = Figure(
        f"{n} peers at once: time to connect all and be ready",
        "s",
        [r["connect_s"] for r in runs],
        digits=2,
        note=f"{runs[0]['clients']} client processes",
    )
    report.figures["crowd_mem"] = Figure(
        f"{n} peers at once: broker memory per connected peer",
        "KiB",
        [r["broker_kib_per_peer"] for r in runs],
        digits=1,
        note=f"RSS delta / peers; clients use {runs[0]['client_kib_per_peer']:.0f} KiB/peer",
    )
    stayed = all(
        r["broker_peers_after_wait"] == n + 1 and r["connected_after_wait"] == n for r in runs
    )
    dropped_ok = all(not math.isnan(r["frozen_dropped_s"]) for r in runs)
    report.figures["crowd_heartbeat"] = Figure(
        f"{n} peers at once: heartbeats checked",
        "",
        ok=stayed and dropped_ok,
        text="yes" if stayed and dropped_ok else "no",
        note=(
            f"all stayed connected {max(3.0, hb_t * 1.5):.0f} s past start (interval {hb_i} s, "
            f"timeout {hb_t} s); a frozen peer was dropped after "
            + ", ".join(f"{r['frozen_dropped_s']:.2f}" for r in runs)
            + " s"
        ),
    )
    routed = all(r["routed"] for r in runs)
    report.figures["crowd_route"] = Figure(
        f"{n} peers at once: broker still routes",
        "",
        ok=routed,
        text="yes" if routed else "no",
        note="message after all connected arrived in "
        + ", ".join(f"{r['route_ms']:.2f}" for r in runs)
        + " ms",
    )


_GROUPS: dict[str, Callable[[_Options, _Report], Awaitable[None]]] = {
    "p2p": _group_p2p,
    "fanout": _group_fanout,
    "query": _group_query,
    "crowd": _group_crowd,
}

#: The table's lines, in order.
_ORDER = [
    "p2p_100_msgs",
    "p2p_100_mbs",
    "p2p_8192_msgs",
    "p2p_8192_mbs",
    "fanout_msgs",
    "query_median",
    "query_p99",
    "lone",
    "bare_100_msgs",
    "bare_100_mbs",
    "bare_8192_msgs",
    "bare_8192_mbs",
    "bare_lone",
    "bare_rtt",
    "ratio_100",
    "ratio_8192",
    "crowd_ready",
    "crowd_connect",
    "crowd_mem",
    "crowd_route",
    "crowd_heartbeat",
]


def _others_cpu(report: _Report) -> float:
    """The most CPU (percent of one core) other programs used during a throughput run."""
    worst = 0.0
    for runs in report.raw.values():
        for r in runs if isinstance(runs, list) else ():
            if isinstance(r, dict) and isinstance(r.get("cpu"), dict):
                worst = max(worst, float(r["cpu"].get("others", 0.0)))
    return worst


def _finish_figures(report: _Report) -> list[Figure]:
    f = report.figures
    if "p2p_100_msgs" in f:
        f["p2p_100_msgs"].target = (">=", TARGET_P2P_MSGS)
    if "p2p_8192_mbs" in f:
        f["p2p_8192_mbs"].target = (">=", TARGET_8K_MBS)
    if "lone" in f and "bare_lone" in f and f["lone"].value and f["bare_lone"].value:
        extra = f["lone"].value - f["bare_lone"].value
        f["lone"].note += f"; {extra:+.3f} ms over the bare relay"
    for size in (SMALL, LARGE):
        ours, bare = f.get(f"p2p_{size}_msgs"), f.get(f"bare_{size}_msgs")
        if ours is None or bare is None or not ours.value or not bare.value:
            continue
        runs = [a / b for a, b in zip(ours.runs, bare.runs, strict=False) if b]
        f[f"ratio_{size}"] = Figure(
            f"ratio peerkit / bare relay, {size} B",
            "x",
            runs,
            fixed=ours.value / bare.value,
            digits=1,
            target=(">=", TARGET_RATIO) if size == SMALL else None,
            note="ratio of the medians; runs: per-run ratios",
        )
    return [f[key] for key in _ORDER if key in f]


# ------------------------------------------------------------------------------ entry


def machine_info() -> dict[str, Any]:
    """What the figures depend on: cores, CPU, Python and library versions, commit."""

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0:
            commit = out.stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu,
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "executable": sys.executable,
        "trio": version("trio"),
        "trio-websocket": version("trio-websocket"),
        "wsproto": version("wsproto"),
        "msgpack": version("msgpack"),
        "cattrs": version("cattrs"),
        "attrs": version("attrs"),
        "peerkit": f"{version('peerkit')} ({commit})",
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m peerkit.bench",
        description=(
            "Measure peerkit's broker (separate processes for broker, publishers and "
            "subscribers) against the targets of issue 5 and a bare trio-websocket relay."
        ),
        epilog=f"Groups: {', '.join(_GROUPS)}. (`worker ROLE CONFIG` is the internal entry point "
        "of the processes the bench starts.)",
    )
    p.add_argument(
        "--runs", type=int, default=None, help="runs per figure (default 3; 1 with --quick)"
    )
    p.add_argument(
        "--quick", action="store_true", help="a short smoke run: small counts, 100 peers"
    )
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    p.add_argument(
        "--seconds", type=float, default=None, help="approximate length of one run (default 2)"
    )
    p.add_argument(
        "--peers", type=int, default=None, help="peers for the many-peers figure (default 1000)"
    )
    p.add_argument(
        "--clients", type=int, default=4, help="processes holding those peers (default 4)"
    )
    p.add_argument(
        "--only",
        default=",".join(_GROUPS),
        help="comma-separated groups to run (default: all)",
    )
    p.add_argument(
        "--child-timeout",
        type=float,
        default=900.0,
        help="hard limit in seconds on each worker process (default 900)",
    )
    return p


def _options(argv: Sequence[str]) -> _Options:
    parser = _parser()
    a = parser.parse_args(argv)
    only = {g.strip() for g in a.only.split(",") if g.strip()}
    unknown = only - set(_GROUPS)
    if unknown:
        parser.error(
            f"unknown group(s) {', '.join(sorted(unknown))}; choose from {', '.join(_GROUPS)}"
        )
    runs = a.runs if a.runs is not None else (1 if a.quick else 3)
    if runs < 1:
        parser.error("--runs must be at least 1")
    peers = a.peers if a.peers is not None else (100 if a.quick else 1000)
    if peers < 1 or a.clients < 1:
        parser.error("--peers and --clients must be positive")
    seconds = a.seconds if a.seconds is not None else (0.3 if a.quick else 2.0)
    return _Options(runs, a.quick, seconds, peers, a.clients, a.child_timeout, only, a.json)


async def _bench(opts: _Options) -> _Report:
    report = _Report()
    for name, group in _GROUPS.items():
        if name not in opts.only:
            continue
        _progress(f"--- {name}")
        try:
            await group(opts, report)
        except BenchError as exc:
            text = f"{name}: {exc}"
            report.errors.append(text)
            _progress(f"FAILED {text}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks (or, with ``worker ROLE CONFIG``, one worker process)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["worker"]:
        if len(args) != 3:
            sys.stderr.write("usage: python -m peerkit.bench worker ROLE CONFIG-JSON\n")
            return 2
        return _worker_main(args[1], args[2])
    opts = _options(args)
    command = shlex.join(["python", "-m", "peerkit.bench", *args])
    info = machine_info()
    print(f"command: {command}")
    print(
        f"machine: nproc={info['nproc']} (affinity {info['affinity']}), {info['cpu']}, "
        f"{info['platform']}"
    )
    print(
        f"python:  {info['python']}; trio {info['trio']}, trio-websocket "
        f"{info['trio-websocket']}, wsproto {info['wsproto']}, msgpack {info['msgpack']}, "
        f"cattrs {info['cattrs']}; peerkit {info['peerkit']}"
    )
    sys.stdout.flush()
    started = time.monotonic()
    try:
        report = trio.run(_bench, opts)
    except KeyboardInterrupt:
        _progress("interrupted; every worker process was stopped")
        return 130
    figures = _finish_figures(report)
    elapsed = time.monotonic() - started
    print()
    print(
        f"peerkit bench: medians of {opts.runs} run(s); separate processes for broker, "
        f"publisher(s), subscriber(s); MB = 10^6 bytes of payload; {elapsed:.0f} s in all"
    )
    print(format_table(figures))
    for err in report.errors:
        print(f"\nFAILED {err}")
    others = _others_cpu(report)
    if others > 25.0:
        print(
            f"\nWARNING: other programs used up to {others:.0f}% of a core during the "
            "throughput runs (see 'others' in the CPU notes); those figures are unreliable."
        )
    met = [f.met for f in figures if f.met is not None]
    print(f"\ntargets met: {sum(met)} of {len(met)}")
    if opts.json_path:
        data = {
            "command": command,
            "machine": info,
            "runs": opts.runs,
            "quick": opts.quick,
            "figures": {k: v.as_json() for k, v in report.figures.items()},
            "raw": report.raw,
            "errors": report.errors,
        }
        Path(opts.json_path).write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"figures written to {opts.json_path}")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
