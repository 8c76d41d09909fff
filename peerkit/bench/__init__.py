"""Benchmarks: ``python -m peerkit.bench`` (or ``nox -s bench``).

Every figure is measured with separate OS processes for the broker, the publisher(s) and
the subscriber(s). The parent process only orchestrates: it starts the workers
(``python -m peerkit.bench worker ROLE CONFIG``), talks to them with JSON lines over their
stdin/stdout, reads their results and prints one table with the targets beside
each figure (the median of ``--runs`` runs).

Throughput is measured at the subscriber, from the first to the last message received, for
a fixed number of messages per run (chosen by a warm-up run so that a run lasts about two
seconds). What arrives is counted exactly: messages the broker or the peer dropped are
reported, never hidden, and so is any message that arrives out of order.

Workers cannot outlive the bench: each has a hard timeout (a watchdog thread calls
``os._exit``), exits as soon as its stdin reaches end-of-file (the parent is gone), and the
parent kills every worker it started when a group of measurements ends, however it ends.

This module is the command line and the final table; the measurements are in
:mod:`peerkit.bench._groups`, the worker processes in :mod:`peerkit.bench._workers` and the
I/O-free pieces (payloads, statistics, the table's layout) in :mod:`peerkit.bench._stats`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from ._groups import (
    GROUPS,
    TARGET_FANOUT_OVER_BASELINE,
    TARGET_LONE_OVER_BARE_MS,
    TARGET_QUERY_OVER_BARE,
    TARGET_QUERY_P99_OVER_BARE,
    TARGET_RATIO,
    TARGET_RATIO_8K,
    BenchError,
    Options,
    Report,
    progress,
)
from ._stats import (
    LARGE,
    SMALL,
    BenchMsg,
    BenchQuery,
    BenchReply,
    Figure,
    RunCounter,
    format_table,
    make_payload,
    percentile,
    read_payload,
)
from ._workers import worker_main

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

#: The table's lines, in order.
_ORDER = [
    "p2p_100_msgs",
    "p2p_100_mbs",
    "p2p_8192_msgs",
    "p2p_8192_mbs",
    "fanout_msgs",
    "fanout_baseline",
    "query_median",
    "query_p99",
    "lone",
    "lossless_delivered",
    "lossless_pub_rate",
    "bare_100_msgs",
    "bare_100_mbs",
    "bare_8192_msgs",
    "bare_8192_mbs",
    "bare_lone",
    "bare_rtt",
    "bare_rtt_p99",
    "ratio_100",
    "ratio_8192",
    "crowd_ready",
    "crowd_connect",
    "crowd_mem",
    "crowd_route",
    "crowd_heartbeat",
]


def _others_cpu(report: Report) -> float:
    """The most CPU (percent of one core) other programs used during a throughput run."""
    worst = 0.0
    for runs in report.raw.values():
        for r in runs if isinstance(runs, list) else ():
            if isinstance(r, dict) and isinstance(r.get("cpu"), dict):
                worst = max(worst, float(r["cpu"].get("others", 0.0)))
    return worst


def _finish_figures(report: Report) -> list[Figure]:
    f = report.figures
    for key, ref_key, factor, what in (
        ("query_median", "bare_rtt", TARGET_QUERY_OVER_BARE, "the bare relay's echo"),
        ("query_p99", "bare_rtt_p99", TARGET_QUERY_P99_OVER_BARE, "the bare relay's p99"),
    ):
        fig, ref = f.get(key), f.get(ref_key)
        if fig is not None and fig.value and ref is not None and ref.value:
            fig.target = ("<=", factor * ref.value)
            fig.note += (
                f"{'; ' if fig.note else ''}{fig.value / ref.value:.2f}x {what} "
                f"(target: at most {factor}x)"
            )
    fan, base = f.get("fanout_msgs"), f.get("fanout_baseline")
    if fan is not None and fan.value and base is not None and base.value:
        fan.target = (">=", TARGET_FANOUT_OVER_BASELINE * base.value)
        fan.note += (
            f"; {fan.value / base.value:.2f}x the baseline, interleaved "
            f"(target: at least {TARGET_FANOUT_OVER_BASELINE}x)"
        )
    if "lone" in f and "bare_lone" in f and f["lone"].value and f["bare_lone"].value:
        extra = f["lone"].value - f["bare_lone"].value
        # batching must add no delay: within a margin of the one-message-per-frame relay
        f["lone"].target = ("<=", f["bare_lone"].value + TARGET_LONE_OVER_BARE_MS)
        f["lone"].note += (
            f"; {extra:+.3f} ms against the bare relay (target: at most "
            f"+{TARGET_LONE_OVER_BARE_MS} ms)"
        )
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
            target=(">=", TARGET_RATIO if size == SMALL else TARGET_RATIO_8K),
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
            "subscribers) against its targets and a bare trio-websocket relay (the transport's "
            "own floor)."
        ),
        epilog=f"Groups: {', '.join(GROUPS)}. (`worker ROLE CONFIG` is the internal entry point "
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
        "--baseline",
        metavar="TREE",
        help="a checkout of an earlier peerkit (e.g. made with `git worktree add`): the "
        "fan-out figure is measured with it too, interleaved, and compared",
    )
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
        default=",".join(GROUPS),
        help="comma-separated groups to run (default: all)",
    )
    p.add_argument(
        "--child-timeout",
        type=float,
        default=900.0,
        help="hard limit in seconds on each worker process (default 900)",
    )
    return p


def _options(argv: Sequence[str]) -> Options:
    parser = _parser()
    a = parser.parse_args(argv)
    only = {g.strip() for g in a.only.split(",") if g.strip()}
    unknown = only - set(GROUPS)
    if unknown:
        parser.error(
            f"unknown group(s) {', '.join(sorted(unknown))}; choose from {', '.join(GROUPS)}"
        )
    runs = a.runs if a.runs is not None else (1 if a.quick else 3)
    if runs < 1:
        parser.error("--runs must be at least 1")
    peers = a.peers if a.peers is not None else (100 if a.quick else 1000)
    if peers < 1 or a.clients < 1:
        parser.error("--peers and --clients must be positive")
    seconds = a.seconds if a.seconds is not None else (0.3 if a.quick else 2.0)
    baseline = None
    if a.baseline:
        tree = Path(a.baseline).resolve()
        if not any((tree / "peerkit" / p).is_file() for p in ("bench.py", "bench/__init__.py")):
            parser.error(f"--baseline {a.baseline}: no peerkit checkout there (no peerkit/bench)")
        baseline = str(tree)
    return Options(
        runs, a.quick, seconds, peers, a.clients, a.child_timeout, only, a.json, baseline
    )


async def _bench(opts: Options) -> Report:
    report = Report()
    for name, group in GROUPS.items():
        if name not in opts.only:
            continue
        progress(f"--- {name}")
        try:
            await group(opts, report)
        except BenchError as exc:
            text = f"{name}: {exc}"
            report.errors.append(text)
            progress(f"FAILED {text}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks (or, with ``worker ROLE CONFIG``, one worker process)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["worker"]:
        if len(args) != 3:
            sys.stderr.write("usage: python -m peerkit.bench worker ROLE CONFIG-JSON\n")
            return 2
        return worker_main(args[1], args[2])
    opts = _options(args)
    command = shlex.join(["python", "-m", "peerkit.bench", *args])
    info = machine_info()
    print(f"command: {command}")
    print(
        f"machine: nproc={info['nproc']} (affinity {info['affinity']}), {info['cpu']}, "
        f"{info['platform']}"
    )
    print(
        f"python:  {info['python']}; trio {info['trio']}, "
        f"trio-websocket {info['trio-websocket']} (wsproto {info['wsproto']}), "
        f"msgpack {info['msgpack']}, cattrs {info['cattrs']}; peerkit {info['peerkit']}"
    )
    sys.stdout.flush()
    started = time.monotonic()
    try:
        report = trio.run(_bench, opts)
    except KeyboardInterrupt:
        progress("interrupted; every worker process was stopped")
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
