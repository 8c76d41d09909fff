"""``python -m peerkit._stress.soak --minutes 10``: steady traffic against a live broker, with
peers joining and leaving, watching for silent loss and memory growth.

Steady peers run from start to end: publishers (numbered messages at ``--rate`` messages a
second between them), subscribers (they note every gap in each publisher's numbers), a query
handler and askers (``--query-rate`` queries a second between them). Every ``--churn-every``
seconds a new peer joins (in turn a subscriber, a publisher, an asker) and, once
``--churn`` of them are up, the oldest leaves: cleanly, or every fourth one by dropping its
connection.

Every ``--report-every`` seconds a line gives the broker's memory (RSS) and the counts so
far. At the end the publishers stop, the subscribers get what was sent, and the verdict is
given: messages lost (gaps, and the end of a steady publisher's numbers that never came) are
compared with what the subscribers were told was dropped (``dropped_messages``): loss
beyond that is **silent loss**. Exit status 1 on silent loss, on a failed query, or when the
broker's memory grew by more than ``--max-growth`` MiB between the first report after
``--warmup`` seconds and the end.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ..errors import PeerkitError
from ..messages import Message, message
from ..peer import Peer
from .harness import BrokerUnderTest, Mode, broker_under_test, mib

__all__ = ["Soak", "SoakResults", "main", "run_soak"]


@message(type="peerkit.soak.Tick")
class SoakTick(Message):
    seq: int
    payload: bytes = b""


@message(type="peerkit.soak.Ask")
class SoakAsk(Message):
    n: int


@message(type="peerkit.soak.Answer")
class SoakAnswer(Message):
    n: int


@attrs.define
class Soak:
    """What to run (the command line's options)."""

    seconds: float = 600.0
    #: messages per second, all steady publishers together
    rate: float = 400.0
    #: queries per second, all steady askers together
    query_rate: float = 40.0
    payload: int = 100
    publishers: int = 2
    subscribers: int = 2
    askers: int = 2
    #: churn peers up at once
    churn: int = 4
    churn_every: float = 1.0
    report_every: float = 30.0
    warmup: float = 30.0
    #: MiB the broker may grow by between the warm-up and the end
    max_growth: float = 32.0
    query_timeout: float = 10.0
    broker: Mode = "process"
    broker_options: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class SoakResults:
    """What happened (see the module docstring)."""

    published: int = 0
    received: int = 0
    #: gaps in the numbers, and the end of steady publishers' numbers that never came
    lost: int = 0
    #: what the subscribers were told was dropped (``dropped_messages``)
    dropped: int = 0
    #: lost beyond what was dropped, subscriber by subscriber
    silent: int = 0
    #: messages out of order or twice (never expected)
    disorder: int = 0
    queries_ok: int = 0
    failed_queries: int = 0
    query_errors: collections.Counter[str] = attrs.field(factory=collections.Counter)
    joined: int = 0
    left: int = 0
    peer_errors: list[str] = attrs.field(factory=list)
    #: (seconds, RSS) every report
    memory: list[tuple[float, int | None]] = attrs.field(factory=list)
    baseline: int | None = None
    elapsed: float = 0.0
    broker_crashes: int = 0
    broker_ended: str | None = None

    @property
    def growth(self) -> int | None:
        end = self.memory[-1][1] if self.memory else None
        if end is None or self.baseline is None:
            return None
        return end - self.baseline

    def verdict(self, soak: Soak) -> list[str]:
        """Why the soak failed (empty: it passed)."""
        why = []
        if self.silent:
            why.append(f"{self.silent} messages lost silently")
        if self.disorder:
            why.append(f"{self.disorder} messages out of order")
        if self.failed_queries:
            why.append(f"{self.failed_queries} failed queries")
        growth = self.growth
        if growth is not None and growth > soak.max_growth * (1 << 20):
            why.append(f"broker memory grew by {mib(growth)} (limit {soak.max_growth:g} MiB)")
        if self.broker_crashes:
            why.append(f"{self.broker_crashes} broker crashes")
        if self.broker_ended:
            why.append(f"the broker stopped: {self.broker_ended}")
        return why


class _Subscriber:
    """Notes gaps in every publisher's numbers."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.last: dict[str, int] = {}
        self.received = 0
        self.gaps = 0
        self.disorder = 0

    def on_tick(self, msg: SoakTick) -> None:
        self.received += 1
        last = self.last.get(msg.sender)
        if last is not None:
            if msg.seq > last + 1:
                self.gaps += msg.seq - last - 1
            elif msg.seq <= last:
                self.disorder += 1
                return
        self.last[msg.sender] = msg.seq


class _Run:
    """One soak run: its peers, counters and tasks."""

    def __init__(self, soak: Soak, broker: BrokerUnderTest, out: Callable[[str], None]) -> None:
        self.soak = soak
        self.broker = broker
        self.out = out
        self.results = SoakResults()
        self.subscribers: list[_Subscriber] = []
        self.steady_subscribers: list[_Subscriber] = []
        self.aborted: set[str] = set()
        self.finished_subscribers: list[_Subscriber] = []
        #: final number of every steady publisher
        self.final: dict[str, int] = {}
        self.published = 0
        self.stopping = False
        self.ids = itertools.count()

    # ------------------------------------------------------------------ peers
    async def _start(self, nursery: trio.Nursery, peer: Peer) -> None:
        async def keep(*, task_status: trio.TaskStatus[None]) -> None:
            try:
                await peer.run(task_status=task_status)
            except Exception as exc:
                if peer.peer_id not in self.aborted:
                    self.results.peer_errors.append(f"{peer.peer_id}: {type(exc).__name__}: {exc}")

        await nursery.start(keep)
        self.results.joined += 1

    def _peer(self, name: str) -> Peer:
        return Peer(self.broker.url, f"soak-{name}-{next(self.ids)}", request_timeout=30)

    async def _subscriber(self, nursery: trio.Nursery, name: str) -> _Subscriber:
        peer = self._peer(name)
        await self._start(nursery, peer)
        sub = _Subscriber(peer)
        self.subscribers.append(sub)
        await peer.subscribe_for_all_msg_subtype(SoakTick, sub.on_tick)
        return sub

    async def _publish(self, peer: Peer, rate: float, steady: bool) -> None:
        payload = b"p" * self.soak.payload
        seq = 0
        tick = 0.01
        owed = 0.0
        next_time = trio.current_time()
        while not self.stopping:
            owed += rate * tick
            while owed >= 1:
                owed -= 1
                try:
                    await peer.send_message(SoakTick(seq=seq, payload=payload))
                except PeerkitError as exc:
                    if not peer.is_shutting_down:
                        self.results.peer_errors.append(f"{peer.peer_id}: publishing: {exc!r}")
                    return
                seq += 1
                self.published += 1
                if steady:
                    self.final[peer.peer_id] = seq - 1
            next_time += tick
            await trio.sleep_until(next_time)

    async def _ask(self, peer: Peer, rate: float) -> None:
        for n in itertools.count():
            if self.stopping:
                return
            deadline = trio.current_time() + 1 / rate
            try:
                answer = await peer.query(SoakAsk(n=n), timeout=self.soak.query_timeout)
            except Exception as exc:
                if peer.is_shutting_down:
                    return  # a churn asker leaving
                self.results.failed_queries += 1
                self.results.query_errors[type(exc).__name__] += 1
            else:
                if isinstance(answer, SoakAnswer) and answer.n == n:
                    self.results.queries_ok += 1
                else:
                    self.results.failed_queries += 1
                    self.results.query_errors["wrong answer"] += 1
            await trio.sleep_until(deadline)

    async def _leave(self, peer: Peer, abrupt: bool) -> None:
        if abrupt:
            self.aborted.add(peer.peer_id)
            await peer._link.abort()
        with trio.move_on_after(peer.grace_period + 10):
            await peer.async_shutdown()
        for sub in [s for s in self.subscribers if s.peer is peer]:
            self.subscribers.remove(sub)
            self.finished_subscribers.append(sub)
        self.results.left += 1

    # ------------------------------------------------------------------ the run
    async def run(self) -> None:
        soak = self.soak
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            handler = self._peer("handler")
            await self._start(nursery, handler)
            await handler.register_query_handler(SoakAsk, lambda m: SoakAnswer(n=m.n))
            for _ in range(soak.subscribers):
                self.steady_subscribers.append(await self._subscriber(nursery, "sub"))
            publishers = []
            for _ in range(soak.publishers):
                peer = self._peer("pub")
                await self._start(nursery, peer)
                publishers.append(peer)
                nursery.start_soon(self._publish, peer, soak.rate / soak.publishers, True)
            for _ in range(soak.askers):
                peer = self._peer("ask")
                await self._start(nursery, peer)
                nursery.start_soon(self._ask, peer, soak.query_rate / soak.askers)
            self.out(
                f"soak: broker at {self.broker.url} ({soak.broker}); {soak.seconds:g} s, "
                f"{soak.rate:g} msg/s, {soak.query_rate:g} queries/s, a peer joins and one "
                f"leaves every {soak.churn_every:g} s; RSS {mib(self.broker.rss())}"
            )
            churn_scope = trio.CancelScope()
            nursery.start_soon(self._churn, nursery, churn_scope)
            end = trio.current_time() + soak.seconds
            next_report = trio.current_time() + soak.report_every
            while trio.current_time() < end and self.broker.alive:
                await trio.sleep_until(min(next_report, end))
                # the last report comes after the end, once the counts are final
                if next_report <= trio.current_time() < end:
                    next_report += soak.report_every
                    self._report(time.monotonic() - started)
            churn_scope.cancel()
            await self._finish()
            self._report(time.monotonic() - started)
            self.results.elapsed = time.monotonic() - started
            nursery.cancel_scope.cancel()

    async def _churn(self, nursery: trio.Nursery, scope: trio.CancelScope) -> None:
        soak = self.soak
        up: collections.deque[Peer] = collections.deque()
        with scope:
            for n in itertools.count():
                await trio.sleep(soak.churn_every)
                role = ("sub", "pub", "ask")[n % 3]
                peer = self._peer(f"churn-{role}")
                await self._start(nursery, peer)
                if role == "sub":
                    sub = _Subscriber(peer)
                    self.subscribers.append(sub)
                    await peer.subscribe_for_all_msg_subtype(SoakTick, sub.on_tick)
                elif role == "pub":
                    peer.create_task(self._publish, peer, 20.0, False)
                else:
                    peer.create_task(self._ask, peer, 5.0)
                up.append(peer)
                if len(up) > soak.churn:
                    nursery.start_soon(self._leave, up.popleft(), n % 4 == 3)
        for peer in up:  # the end: the churn peers leave cleanly
            nursery.start_soon(self._leave, peer, False)

    async def _finish(self) -> None:
        """Stop publishing, let the subscribers get what was sent, and count."""
        self.stopping = True
        final = dict(self.final)
        steady = self.steady_subscribers
        with trio.move_on_after(10):
            while not all(  # noqa: ASYNC110 - waiting on the counters of many handlers
                sub.last.get(pid, -1) >= seq for sub in steady for pid, seq in final.items()
            ):
                await trio.sleep(0.05)
        results = self.results
        results.published = self.published
        for sub in self.subscribers + self.finished_subscribers:
            lost = sub.gaps
            if sub in steady:  # the end of each steady publisher's numbers
                lost += sum(max(0, seq - sub.last.get(pid, -1)) for pid, seq in final.items())
            dropped = sub.peer.dropped_messages
            results.received += sub.received
            results.lost += lost
            results.dropped += dropped
            results.silent += max(0, lost - dropped)
            results.disorder += sub.disorder
        results.broker_crashes = self.broker.crashes
        results.broker_ended = self.broker.ended if not self.broker.alive else None

    def _report(self, elapsed: float) -> None:
        rss = self.broker.rss()
        self.results.memory.append((elapsed, rss))
        if self.results.baseline is None and elapsed >= min(self.soak.warmup, self.soak.seconds):
            self.results.baseline = rss
        received = sum(s.received for s in self.subscribers + self.finished_subscribers)
        gaps = sum(s.gaps for s in self.subscribers + self.finished_subscribers)
        dropped = sum(s.peer.dropped_messages for s in self.subscribers + self.finished_subscribers)
        r = self.results
        self.out(
            f"soak: {elapsed:4.0f} s: broker RSS {mib(rss)}; published {self.published}, "
            f"received {received}, gaps {gaps}, dropped {dropped}; queries ok {r.queries_ok} "
            f"failed {r.failed_queries}; peers joined {r.joined} left {r.left}"
        )


async def run_soak(soak: Soak, out: Callable[[str], None] = print) -> SoakResults:
    """Run ``soak`` against a new broker; returns what happened."""
    async with broker_under_test(soak.broker, soak.broker_options) as broker:
        run = _Run(soak, broker, out)
        await run.run()
        return run.results


def report(soak: Soak, results: SoakResults) -> list[str]:
    """The summary lines."""
    errors = ", ".join(f"{k} x {v}" for k, v in sorted(results.query_errors.items()))
    lines = [
        f"soak: {results.elapsed:.0f} s, broker {soak.broker}",
        f"  messages: published {results.published}, received {results.received}, "
        f"lost {results.lost} (told dropped {results.dropped}, silent {results.silent}), "
        f"out of order {results.disorder}",
        f"  queries: ok {results.queries_ok}, failed {results.failed_queries}"
        + (f" ({errors})" if errors else ""),
        f"  peers: joined {results.joined}, left {results.left}",
        "  broker memory (RSS): " + ", ".join(f"{t:.0f} s {mib(rss)}" for t, rss in results.memory),
        f"  growth since the warm-up: {mib(results.growth)}",
    ]
    lines += [f"  peer error: {text}" for text in results.peer_errors[:10]]
    why = results.verdict(soak)
    lines.append("  result: " + ("OK" if not why else "FAILED: " + "; ".join(why)))
    return lines


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m peerkit._stress.soak")
    d = Soak()
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help=f"how long (default {d.seconds / 60:g})")
    length.add_argument("--seconds", type=float)
    parser.add_argument("--rate", type=float, default=d.rate, help="messages per second")
    parser.add_argument("--query-rate", type=float, default=d.query_rate)
    parser.add_argument("--payload", type=int, default=d.payload, help="bytes per message")
    parser.add_argument("--churn", type=int, default=d.churn, help="churn peers up at once")
    parser.add_argument("--churn-every", type=float, default=d.churn_every)
    parser.add_argument("--report-every", type=float, default=d.report_every)
    parser.add_argument("--warmup", type=float, default=d.warmup)
    parser.add_argument("--max-growth", type=float, default=d.max_growth, help="MiB")
    parser.add_argument("--broker", choices=["process", "inprocess"], default=d.broker)
    parser.add_argument(
        "--broker-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Broker option (VALUE in JSON)",
    )
    parser.add_argument("--verbose", action="store_true", help="show the peers' own logs")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds else (args.minutes or d.seconds / 60) * 60
    options: dict[str, Any] = {}
    for text in args.broker_option:
        key, _, value = text.partition("=")
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)
        options[key] = value
    soak = Soak(
        seconds=seconds,
        rate=args.rate,
        query_rate=args.query_rate,
        payload=args.payload,
        churn=args.churn,
        churn_every=args.churn_every,
        report_every=args.report_every,
        warmup=args.warmup,
        max_growth=args.max_growth,
        broker=args.broker,
        broker_options=options,
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # peers dropped on purpose say so, loudly
        logging.getLogger("peerkit.peer").setLevel(logging.CRITICAL)
    results = trio.run(run_soak, soak, lambda line: print(line, flush=True))
    for line in report(soak, results):
        print(line, flush=True)
    return 1 if results.verdict(soak) else 0


if __name__ == "__main__":
    sys.exit(main())
