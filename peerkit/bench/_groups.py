"""The benchmark's measurements, run from the parent process.

Each group starts its worker processes (:mod:`peerkit.bench._workers`), drives them over
their stdin/stdout and adds its figures to the :class:`Report`; every worker a group
started is stopped when the group ends, however it ends.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ._stats import LARGE, MB, SMALL, Figure
from ._workers import LineReader

__all__ = ["GROUPS", "BenchError", "Options", "Report", "progress"]

# ------------------------------------------------------------------------------ targets
#: Targets (100-byte messages unless said; separate processes; medians). Most are relative
#: to the bare trio-websocket relay measured in the same run (the transport's own floor).
TARGET_RATIO = 25.0  #: 1 pub → 1 sub, 100 B, against the bare relay
TARGET_RATIO_8K = 3.5  #: the same with 8 KiB messages
TARGET_QUERY_OVER_BARE = 1.25  #: query round trip median against the bare relay's echo
TARGET_QUERY_P99_OVER_BARE = 2.0  #: ... and its p99 against the bare relay's p99
TARGET_FANOUT_OVER_BASELINE = 0.9  #: fan-out against --baseline, measured interleaved
#: A lone message must be sent at once ("batching must not add latency when traffic is
#: light"): its one-way latency may exceed the bare relay's, which sends every message in
#: its own frame at once, by this much at most (a batching timer would show as milliseconds).
TARGET_LONE_OVER_BARE_MS = 0.1

FANOUT = 10


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


# ============================================================================== the parent


class BenchError(Exception):
    """A measurement could not be made (a worker failed, stalled or timed out)."""


class _Child:
    def __init__(self, name: str, proc: trio.Process, err_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.err_path = err_path
        assert proc.stdout is not None
        self._lines = LineReader(proc.stdout)

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

    async def spawn(self, name: str, role: str, tree: str | None = None, **cfg: Any) -> _Child:
        """Start a worker; with ``tree``, it runs the peerkit found in that directory (an
        earlier checkout, for ``--baseline``) instead of this one."""
        cfg.setdefault("hard_timeout", self.hard_timeout)
        err_path = self.tmp / f"{name}-{len(self.children)}.log"
        err = _open_log(err_path)
        env = None
        if tree is not None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, *sys.path[1:]])}
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "peerkit.bench", "worker", role, json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
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
async def _workers(opts: Options) -> AsyncIterator[_Workers]:
    with tempfile.TemporaryDirectory(prefix="peerkit-bench-") as tmp:
        workers = _Workers(Path(tmp), opts.child_timeout)
        try:
            yield workers
        finally:
            await workers.close()


@dataclass
class Options:
    runs: int
    quick: bool
    seconds: float
    peers: int
    clients: int
    child_timeout: float
    only: set[str]
    json_path: str | None
    baseline: str | None = None


def progress(text: str) -> None:
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


async def _measure_throughput(opts: Options, systems: Sequence[_System], size: int) -> None:
    """A warm-up run sizes each system's runs (about ``opts.seconds`` each); then
    ``opts.runs`` rounds, each running every system once, so that they are compared under
    the same conditions (the ratio of peerkit to the bare relay is fair even on a machine
    whose load changes)."""
    for sy in systems:
        w = await _throughput_run(sy.subs, sy.pub, sy.warmup, size, sy.server)
        per_sub = w.rate / max(1, len(sy.subs))
        count = int(min(5_000_000, max(sy.warmup, per_sub * opts.seconds)))
        sy.count = max(1000, round(count, -3))
        progress(
            f"{sy.label} {size} B: warm-up {sy.warmup:,} msgs → {w.rate:,.0f} msgs/s; "
            f"{opts.runs} run(s) of {sy.count:,} msgs"
        )
    for i in range(opts.runs):
        for sy in systems:
            r = await _throughput_run(sy.subs, sy.pub, sy.count, size, sy.server)
            sy.results.append(r)
            progress(
                f"{sy.label} {size} B: run {i + 1}/{opts.runs}: {r.rate:,.0f} msgs/s, "
                f"{r.rate * size / MB:,.1f} MB/s, {r.delivered:,}/{r.expected:,} delivered "
                f"in {r.seconds:.2f} s; {_loss_note([r])}; {_cpu_note(r.cpu)}"
            )


async def _lone_latency(
    label: str, opts: Options, sub: _Child, pub: _Child
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
        progress(
            f"{label}: lone-message run {i + 1}/{opts.runs}: median "
            f"{res['lat_median_ms']:.3f} ms, p99 {res['lat_p99_ms']:.3f} ms "
            f"({res['count']}/{count} received)"
        )
    return medians, p99s


# ------------------------------------------------------------------------------ groups


@dataclass
class Report:
    figures: dict[str, Figure] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _median_cpu(results: Sequence[_Throughput]) -> dict[str, float]:
    return {k: statistics.median(r.cpu[k] for r in results) for k in results[0].cpu}


def _tp_figures(report: Report, key: str, label: str, size: int, sy: _System) -> None:
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


async def _group_p2p(opts: Options, report: Report) -> None:
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


async def _fanout_system(
    w: _Workers, opts: Options, label: str, tree: str | None = None
) -> _System:
    tag = "base-" if tree else ""
    broker = await w.spawn(f"{tag}broker", "broker", tree=tree)
    url = (await broker.expect("ready", 60))["url"]
    subs = [
        await w.spawn(f"{tag}sub{i}", "sub", tree=tree, url=url, peer_id=f"bench-sub-{i}")
        for i in range(FANOUT)
    ]
    pub = await w.spawn(f"{tag}pub", "pub", tree=tree, url=url, peer_id="bench-pub")
    for s in [*subs, pub]:
        await s.expect("ready", 120)
    return _System(label, broker, subs, pub, 2000 if opts.quick else 10_000)


async def _group_fanout(opts: Options, report: Report) -> None:
    """Fan-out to 10 subscribers; with ``--baseline TREE``, interleaved with the same
    measurement of the peerkit in TREE (an earlier checkout)."""
    async with _workers(opts) as w:
        sy = await _fanout_system(w, opts, f"peerkit fan-out x{FANOUT}")
        systems = [sy]
        if opts.baseline:
            systems.append(
                await _fanout_system(w, opts, f"baseline fan-out x{FANOUT}", opts.baseline)
            )
        await _measure_throughput(opts, systems, SMALL)
        label = f"1 pub → broker → {FANOUT} subs, {SMALL} B, delivered in total"
        for key, system, prefix in zip(
            ("fanout_msgs", "fanout_baseline"), systems, ("", "baseline: "), strict=False
        ):
            results = system.results
            report.figures[key] = Figure(
                prefix + label,
                "msgs/s",
                [r.rate for r in results],
                note=_loss_note(results)
                + f"; {system.count:,} msgs/run x {FANOUT}; "
                + _cpu_note(_median_cpu(results))
                + (f"; peerkit from {opts.baseline}" if prefix else ""),
            )
            report.raw[key] = [vars(r) for r in results]


async def _group_query(opts: Options, report: Report) -> None:
    """Query round trips through the broker, interleaved with echo round trips through the
    bare trio-websocket relay (the baseline: the transport's own floor)."""
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
        askers = (("peerkit", asker), ("bare relay", bare))
        for name, child in askers:
            await child.send("query", run=_run_id(), count=warm, size=SMALL)
            res = await child.expect("result", 120)
            count = int(max(500, min(50_000, opts.seconds / (res["mean_ms"] / 1000.0))))
            counts[name] = round(count, -2)
            progress(
                f"{name} round trip: warm-up {warm} queries, mean {res['mean_ms']:.3f} ms; "
                f"{opts.runs} run(s) of {counts[name]:,}"
            )
        results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in askers}
        for i in range(opts.runs):
            for name, child in askers:
                await child.send("query", run=_run_id(), count=counts[name], size=SMALL)
                res = await child.expect("result", 600)
                results[name].append(res)
                progress(
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
            digits=3,
            note=f"{counts['peerkit']:,} queries/run",
        )
        report.figures["query_p99"] = Figure(
            label + ": p99",
            "ms",
            [r["p99_ms"] for r in ours],
            digits=3,
        )
        report.figures["bare_rtt"] = _reference_rtt(
            f"round trip, bare relay (echo), {SMALL} B", base
        )
        report.figures["bare_rtt_p99"] = Figure(
            f"round trip, bare relay (echo), {SMALL} B: p99",
            "ms",
            [r["p99_ms"] for r in base],
            digits=3,
            note="reference: the query's p99 target is twice this",
        )
        report.raw["query"] = ours
        report.raw["bare_rtt"] = base


def _reference_rtt(label: str, runs: list[dict[str, Any]]) -> Figure:
    """A round trip's median over ``runs``, shown beside the targets as a reference."""
    return Figure(
        label + ": median",
        "ms",
        [r["median_ms"] for r in runs],
        digits=3,
        note=f"p99 {statistics.median(r['p99_ms'] for r in runs):.3f} ms; reference",
    )


async def _crowd_run(opts: Options, n: int) -> dict[str, Any]:
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
        progress(
            f"{n} peers: {ready} ready in {connect_s:.2f} s"
            + (f"; {failed} FAILED, e.g. {errors[0]}" if failed else "")
        )
        await sentinel.send("connect")
        await sentinel.expect("ready", 60)
        rss_ready = _rss_kib(broker.pid)
        # Peers must stay connected past the heartbeat timeout: the broker keeps up with
        # 2 x n heartbeats per second and its monitor does not drop live peers.
        idle_s = max(3.0, hb_timeout * 1.5)
        cpu0 = _cpu_seconds(broker.pid)
        await trio.sleep(idle_s)
        idle_cpu = 100.0 * (_cpu_seconds(broker.pid) - cpu0) / idle_s
        await broker.send("status", ids=["sentinel-0"])
        status = await broker.expect("status", 30)
        checks = []
        for c in crowd:
            await c.send("check")
            checks.append(await c.expect("checked", 30))
        connected = sum(c["connected"] for c in checks)
        rss_after = _rss_kib(broker.pid)
        client_rss = sum(_rss_kib(c.pid) for c in crowd)
        progress(
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
        progress(
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
            "broker_idle_cpu": idle_cpu,
            "connected_after_wait": connected,
            "routed": routed,
            "route_ms": route_ms,
            "frozen_dropped_s": drop_s,
            "broker_peers_final": final["peers"],
            "heartbeat": [hb_interval, hb_timeout],
        }


async def _group_crowd(opts: Options, report: Report) -> None:
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
            f"all still connected {max(3.0, hb_t * 1.5):.0f} s after all were ready (interval "
            f"{hb_i} s, timeout {hb_t} s; broker CPU when idle "
            + ", ".join(f"{r['broker_idle_cpu']:.0f}%" for r in runs)
            + "); a frozen peer was dropped after "
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


async def _publish_and_count(
    sub: _Child, pub: _Child, count: int, idle_timeout: float
) -> tuple[dict[str, Any], float]:
    """One run: the subscriber's result and the publisher's rate (messages per second of
    its own publishing loop)."""
    run = _run_id()
    await sub.send("arm", run=run, expected=count)
    await sub.expect("armed", 30)
    await pub.send("publish", run=run, count=count, size=SMALL)
    published = await pub.expect("published", 900)
    result = await sub.expect("result", 900)
    seconds = float(published["seconds"])
    return result, count / seconds if seconds > 0 else 0.0


async def _group_lossless(opts: Options, report: Report) -> None:
    """A lossless subscriber five times slower than its publisher gets every message, in
    order; the publisher is slowed to its pace. Beside it, the same publisher's rate with
    an ordinary (drop) subscriber that keeps up."""
    count = 50_000 if opts.quick else 1_000_000
    async with _workers(opts) as w:
        broker = await w.spawn("broker", "broker")
        url = (await broker.expect("ready", 60))["url"]
        fast = await w.spawn("sub", "sub", url=url, peer_id="bench-fast", idle_timeout=10.0)
        pub = await w.spawn("pub", "pub", url=url, peer_id="bench-pub")
        for c in (fast, pub):
            await c.expect("ready", 60)
        free_runs: list[float] = []
        for i in range(opts.runs):
            result, rate = await _publish_and_count(fast, pub, 300_000, 10.0)
            free_runs.append(rate)
            progress(f"publisher with a subscriber that keeps up: run {i + 1}: {rate:,.0f} msgs/s")
    free = statistics.median(free_runs)
    work_us = 5e6 / free  # the subscriber takes five times the publisher's time per message
    async with _workers(opts) as w:
        broker = await w.spawn("broker", "broker")
        url = (await broker.expect("ready", 60))["url"]
        slow = await w.spawn(
            "lossless",
            "sub",
            url=url,
            peer_id="bench-lossless",
            delivery="lossless",
            work_us=work_us,
            idle_timeout=30.0,
        )
        pub = await w.spawn("pub", "pub", url=url, peer_id="bench-pub")
        for c in (slow, pub):
            await c.expect("ready", 60)
        progress(f"lossless: {count:,} messages to a subscriber spending {work_us:.1f} us on each")
        result, with_rate = await _publish_and_count(slow, pub, count, 30.0)
    delivered = int(result["count"])
    in_order = result["out_of_order"] == 0 and result["dropped"] == 0
    report.figures["lossless_delivered"] = Figure(
        f"lossless subscriber 5x slower than its publisher: delivered of {count:,}",
        "%",
        [100.0 * delivered / count],
        digits=2,
        target=(">=", 100.0),
        note=(
            "in order, none dropped"
            if in_order
            else f"out of order {result['out_of_order']}, dropped {result['dropped']}"
        )
        + f"; handler work {work_us:.1f} us/message",
    )
    report.figures["lossless_pub_rate"] = Figure(
        "publisher's rate with the lossless slow subscriber",
        "msgs/s",
        [with_rate],
        note=f"without it (a subscriber that keeps up): {free:,.0f} msgs/s",
    )
    report.raw["lossless"] = {"result": result, "free_runs": free_runs, "with": with_rate}


GROUPS: dict[str, Callable[[Options, Report], Awaitable[None]]] = {
    "p2p": _group_p2p,
    "fanout": _group_fanout,
    "query": _group_query,
    "lossless": _group_lossless,
    "crowd": _group_crowd,
}
