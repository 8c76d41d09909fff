"""``python -m peerkit._stress.fuzz --inputs 100000``: a fuzz campaign against a live broker.

Attackers connect to the broker over real loopback WebSocket connections (trio-websocket)
and send mutated frames and envelopes (see :mod:`peerkit._stress.mutate`): most of them
after a valid hello, some as the first frame of a connection that has not said hello.
When the broker closes an attacker's connection (as it may: 1008, 1009), the attacker
connects again under a new id. The inputs go in batches; after every batch a well-behaved
pair of peers (connected all along) must still publish a message to each other and answer a
query within ``--check-deadline`` seconds (a failed check is counted, and the pair is
replaced so the campaign goes on).

Reported: inputs tried (frames; envelopes they were made of), by mutation; connections and
how the broker closed them; **crashes** (the broker logged ``connection handler failed``: an
exception escaped the code serving a connection, or the broker stopped); **hangs** (a batch
that did not finish within ``--batch-deadline``); failed checks; broker memory (RSS) at the
start, its peak and at the end. Exit status 0 when there was no crash, no hang and no failed
check, and every input was tried within ``--max-minutes``.

The broker runs in its own process by default (its RSS is its own, and it has a core to
itself); ``--broker inprocess`` runs it in this one. The inputs depend only on ``--seed``:
``--start-batch N --inputs M`` replays batches from N.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import logging
import random
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import trio
import trio_websocket

from ..codec import iter_envelopes
from ..errors import DecodeError
from ..peer import Peer
from ..protocol import Kind
from .harness import BrokerUnderTest, Mode, broker_under_test, mib
from .mutate import (
    FuzzEcho,
    FuzzPing,
    Input,
    Vocabulary,
    hello_frame,
    make,
    make_first,
    mutation_names,
    seed_names,
)

__all__ = ["Campaign", "Results", "main", "run_campaign"]


@attrs.define
class Campaign:
    """What to run (the command line's options)."""

    inputs: int = 100_000
    batch: int = 500
    connections: int = 8
    seed: int = 1
    #: share of inputs sent as the first frame of a connection that has not said hello
    pre_hello: float = 0.05
    batch_deadline: float = 60.0
    check_deadline: float = 10.0
    max_seconds: float = 30 * 60.0
    start_batch: int = 0
    broker: Mode = "process"
    broker_options: dict[str, Any] = attrs.field(factory=dict)
    #: seconds between progress lines
    progress_every: float = 10.0
    #: a file for everything the broker logs (broker in its own process)
    broker_log: str | None = None
    #: seed kinds and mutations left out (to get past a known bug)
    without: frozenset[str] = frozenset()


@attrs.define
class Results:
    """What happened (see the module docstring)."""

    inputs: int = 0
    envelopes: int = 0
    batches: int = 0
    by_mutation: collections.Counter[str] = attrs.field(factory=collections.Counter)
    by_seed: collections.Counter[str] = attrs.field(factory=collections.Counter)
    connections: int = 0
    #: connections the broker refused at the handshake (HTTP) or with a REJECT
    refused: int = 0
    #: connections the broker closed, by close code
    closed_by_broker: collections.Counter[int] = attrs.field(factory=collections.Counter)
    connect_errors: int = 0
    crashes: int = 0
    hangs: list[int] = attrs.field(factory=list)
    checks: int = 0
    failed_checks: list[str] = attrs.field(factory=list)
    rss_start: int | None = None
    rss_peak: int | None = None
    rss_end: int | None = None
    elapsed: float = 0.0
    stopped: str | None = None
    broker_errors: int = 0
    broker_warnings: int = 0
    broker_ended: str | None = None
    last_errors: list[str] = attrs.field(factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.crashes or self.hangs or self.failed_checks or self.stopped or self.broker_ended
        )

    def count(self, item: Input) -> None:
        self.inputs += 1
        self.envelopes += item.envelopes
        self.by_mutation[item.mutation] += 1
        self.by_seed.update(item.seeds)

    def note_rss(self, rss: int | None) -> None:
        if rss is not None and (self.rss_peak is None or rss > self.rss_peak):
            self.rss_peak = rss

    def report(self, campaign: Campaign) -> list[str]:
        rate = self.inputs / self.elapsed if self.elapsed else 0.0
        closes = ", ".join(f"{code} x {n}" for code, n in sorted(self.closed_by_broker.items()))
        lines = [
            f"fuzz campaign: seed {campaign.seed}, broker {campaign.broker}, "
            f"{self.batches} batches of up to {campaign.batch}"
            + (f", without {', '.join(sorted(campaign.without))}" if campaign.without else ""),
            f"  inputs tried: {self.inputs} frames ({self.envelopes} envelopes) in "
            f"{self.elapsed:.0f} s ({rate:.0f}/s)",
            "  by mutation: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_mutation.items())),
            "  by seed: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_seed.items())),
            f"  connections: {self.connections} ({self.refused} refused, "
            f"{self.connect_errors} failed to connect); closed by the broker: {closes or 'none'}",
            f"  crashes: {self.crashes} (broker log: {self.broker_errors} errors, "
            f"{self.broker_warnings} warnings)",
            f"  hangs: {len(self.hangs)}" + (f" (batches {self.hangs})" if self.hangs else ""),
            f"  checks of the well-behaved pair: {self.checks}, failed: {len(self.failed_checks)}",
            f"  broker memory (RSS): start {mib(self.rss_start)}, peak {mib(self.rss_peak)}, "
            f"end {mib(self.rss_end)}",
        ]
        lines += [f"  failed check: {text}" for text in self.failed_checks[:10]]
        if self.broker_ended:
            lines.append(f"  BROKER STOPPED: {self.broker_ended}")
        if self.stopped:
            lines.append(f"  STOPPED EARLY: {self.stopped}")
        lines += [f"  broker error: {text}" for text in self.last_errors[-10:]]
        lines.append("  result: " + ("OK" if self.ok else "FAILED"))
        return lines


# --------------------------------------------------------------------------- the pair


class Pair:
    """Two well-behaved peers: ``alice`` publishes and asks, ``bob`` receives and answers."""

    def __init__(self, url: str, generation: int) -> None:
        self.alice = Peer(url, f"fz-alice-{generation}", request_timeout=30)
        self.bob = Peer(url, f"fz-bob-{generation}", request_timeout=30)
        self.errors: list[str] = []
        self._expect = -1
        self._got = trio.Event()

    @property
    def ids(self) -> tuple[str, str]:
        return self.alice.peer_id, self.bob.peer_id

    async def start(self, nursery: trio.Nursery) -> None:
        for peer in (self.bob, self.alice):
            await nursery.start(self._keep, peer)
        await self.bob.subscribe_for_all_msg_subtype(FuzzPing, self._on_ping)
        await self.bob.register_query_handler(FuzzEcho, self._on_echo)

    async def _keep(self, peer: Peer, *, task_status: trio.TaskStatus[None]) -> None:
        """Run ``peer``; an error after it started is noted (the next check reports it)."""
        try:
            await peer.run(task_status=task_status)
        except Exception as exc:
            self.errors.append(f"{peer.peer_id}: {type(exc).__name__}: {exc}")

    def _on_ping(self, msg: FuzzPing) -> None:
        if msg.sender == self.alice.peer_id and msg.seq == self._expect:
            self._got.set()

    def _on_echo(self, msg: FuzzEcho) -> FuzzEcho:
        return FuzzEcho(seq=msg.seq)

    async def check(self, seq: int, deadline: float) -> str | None:
        """None if a message and a query went through within ``deadline``; else why not."""
        self._expect, self._got = seq, trio.Event()
        step = "publish"
        failure: str | None = None
        try:
            with trio.move_on_after(deadline) as scope:
                await self.alice.send_message(FuzzPing(seq=seq))
                await self._got.wait()
                step = "query"
                answer = await self.alice.query(FuzzEcho(seq=seq), timeout=deadline)
                if not (
                    isinstance(answer, FuzzEcho)
                    and answer.seq == seq
                    and answer.sender == self.bob.peer_id
                ):
                    failure = f"wrong answer {answer!r}"
            if scope.cancelled_caught:
                failure = f"no {step} within {deadline:g} s"
        except Exception as exc:
            failure = f"{step} failed: {type(exc).__name__}: {exc}"
        if self.errors:
            failure = f"a peer of the pair failed: {'; '.join(self.errors)}" + (
                f" ({failure})" if failure else ""
            )
        return None if failure is None else f"check {seq}: {failure}"

    async def stop(self) -> None:
        with trio.move_on_after(10):
            for peer in (self.alice, self.bob):
                with contextlib.suppress(Exception):
                    await peer.async_shutdown()


# --------------------------------------------------------------------------- attackers


def _close_code(exc: trio_websocket.ConnectionClosed) -> int:
    return exc.reason.code if exc.reason is not None else 1006


def _first_kind(frame: bytes | str) -> int | None:
    try:
        return next(iter_envelopes(frame)).kind  # type: ignore[arg-type]
    except (DecodeError, StopIteration):
        return None


class Attacker:
    """One attacker: sends its share of a batch, over as many connections as it takes."""

    def __init__(
        self,
        url: str,
        rng: random.Random,
        budget: int,
        results: Results,
        ids: Iterator[str],
        peers: tuple[str, ...],
        pre_hello: float,
        without: frozenset[str] = frozenset(),
    ) -> None:
        self.url = url
        self.rng = rng
        self.budget = budget
        self.results = results
        self.ids = ids
        self.peers = peers
        self.pre_hello = pre_hello
        self.without = without

    async def run(self) -> None:
        failures = 0
        while self.budget > 0:
            before = self.budget
            try:
                await self._connection()
            except* (trio_websocket.HandshakeError, OSError, trio.BrokenResourceError):
                self.results.connect_errors += 1
            except* trio_websocket.ConnectionClosed as group:
                for exc in group.exceptions:
                    assert isinstance(exc, trio_websocket.ConnectionClosed)
                    self._closed(exc)
            # a broker that takes no input at all does not make this loop spin
            failures = failures + 1 if self.budget == before else 0
            if failures >= 20:
                self.results.stopped = "the broker took no input on 20 connections in a row"
                return

    def _closed(self, exc: trio_websocket.ConnectionClosed) -> None:
        # raised by a send or a receive: the broker closed (or the connection was cut: 1006)
        self.results.closed_by_broker[_close_code(exc)] += 1

    def _send_count(self, item: Input) -> None:
        self.budget -= 1
        self.results.count(item)

    async def _connection(self) -> None:
        vocab = Vocabulary(
            own_id=next(self.ids), peers=(*self.peers, "config_server"), without=self.without
        )
        async with trio_websocket.open_websocket_url(
            self.url,
            max_message_size=256 * 1024 * 1024,
            message_queue_size=64,
            connect_timeout=30,
            disconnect_timeout=5,
        ) as ws:
            self.results.connections += 1
            if self.rng.random() < self.pre_hello:
                await self._before_hello(ws, vocab)
            else:
                await self._after_hello(ws, vocab)

    async def _before_hello(
        self, ws: trio_websocket.WebSocketConnection, vocab: Vocabulary
    ) -> None:
        item = make_first(self.rng, vocab)
        await ws.send_message(item.frame)
        self._send_count(item)
        # the broker answers with a reject and closes, or welcomes a hello that survived
        kind = _first_kind(await ws.get_message())
        if kind != Kind.WELCOME:
            self.results.refused += 1
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                while True:
                    await ws.get_message()

    async def _after_hello(self, ws: trio_websocket.WebSocketConnection, vocab: Vocabulary) -> None:
        await ws.send_message(hello_frame(vocab.own_id))
        if _first_kind(await ws.get_message()) != Kind.WELCOME:
            self.results.refused += 1
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drain, ws)
            while self.budget > 0:
                item = make(self.rng, vocab)
                await ws.send_message(item.frame)
                self._send_count(item)
            nursery.cancel_scope.cancel()

    async def _drain(self, ws: trio_websocket.WebSocketConnection) -> None:
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            while True:
                await ws.get_message()


# --------------------------------------------------------------------------- the campaign


async def run_campaign(
    campaign: Campaign, out: Callable[[str], None] = print, *, inject: BrokerUnderTest | None = None
) -> Results:
    """Run ``campaign`` against a new broker (or ``inject``, one already running)."""
    results = Results()
    if inject is not None:
        await _campaign(campaign, inject, results, out)
        return results
    async with broker_under_test(
        campaign.broker, campaign.broker_options, log_path=campaign.broker_log
    ) as broker:
        await _campaign(campaign, broker, results, out)
    return results


async def _campaign(
    campaign: Campaign, broker: BrokerUnderTest, results: Results, out: Callable[[str], None]
) -> None:
    started = time.monotonic()
    generation = 0
    async with trio.open_nursery() as nursery:
        pair = Pair(broker.url, generation)
        await pair.start(nursery)
        results.rss_start = broker.rss()
        results.note_rss(results.rss_start)
        out(
            f"fuzz: broker at {broker.url} ({campaign.broker}), RSS {mib(results.rss_start)}; "
            f"{campaign.inputs} inputs in batches of {campaign.batch}, seed {campaign.seed}"
        )
        batches = -(-campaign.inputs // campaign.batch)
        last_progress = time.monotonic()
        for number in range(campaign.start_batch, campaign.start_batch + batches):
            if time.monotonic() - started > campaign.max_seconds:
                results.stopped = (
                    f"time bound of {campaign.max_seconds:g} s reached after {results.inputs} "
                    "inputs"
                )
                break
            size = min(
                campaign.batch, campaign.inputs - (number - campaign.start_batch) * campaign.batch
            )
            await _batch(campaign, broker, results, number, size, pair.ids)
            results.batches += 1
            results.note_rss(broker.rss())
            results.checks += 1
            failure = await pair.check(number, campaign.check_deadline)
            if failure is not None:
                results.failed_checks.append(f"after batch {number}: {failure}")
                out(f"fuzz: batch {number}: the pair failed its check: {failure}")
                await pair.stop()
                generation += 1
                pair = Pair(broker.url, generation)
                try:
                    await pair.start(nursery)
                except Exception as exc:
                    results.stopped = f"a new pair could not start: {exc!r}"
                    break
            if not broker.alive:
                break
            if time.monotonic() - last_progress >= campaign.progress_every:
                last_progress = time.monotonic()
                out(
                    f"fuzz: batch {number + 1 - campaign.start_batch}/{batches}: "
                    f"{results.inputs} inputs, {broker.crashes} crashes, {len(results.hangs)} "
                    f"hangs, {len(results.failed_checks)} failed checks, broker RSS "
                    f"{mib(broker.rss())}"
                )
        results.rss_end = broker.rss()
        await pair.stop()
        nursery.cancel_scope.cancel()
    results.elapsed = time.monotonic() - started
    results.crashes = broker.crashes
    results.broker_errors = broker.error_count
    results.broker_warnings = broker.warning_count
    results.broker_ended = broker.ended
    results.last_errors = list(broker.errors)


async def _batch(
    campaign: Campaign,
    broker: BrokerUnderTest,
    results: Results,
    number: int,
    size: int,
    pair_ids: tuple[str, ...],
) -> None:
    ids = (f"fz-{number}-{n}" for n in itertools.count())
    shares = [size // campaign.connections] * campaign.connections
    for i in range(size % campaign.connections):
        shares[i] += 1
    with trio.move_on_after(campaign.batch_deadline) as scope:
        async with trio.open_nursery() as nursery:
            for i, share in enumerate(shares):
                if share:
                    rng = random.Random(f"{campaign.seed}/{number}/{i}")
                    attacker = Attacker(
                        broker.url,
                        rng,
                        share,
                        results,
                        ids,
                        pair_ids,
                        campaign.pre_hello,
                        campaign.without,
                    )
                    nursery.start_soon(attacker.run)
    if scope.cancelled_caught:
        results.hangs.append(number)


# --------------------------------------------------------------------------- command line


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a JSON value), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m peerkit._stress.fuzz",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    d = Campaign()
    parser.add_argument("--inputs", type=int, default=d.inputs, help="inputs to try (frames)")
    parser.add_argument("--batch", type=int, default=d.batch, help="inputs per batch")
    parser.add_argument("--connections", type=int, default=d.connections, help="attackers at once")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--start-batch", type=int, default=0, help="first batch (to replay)")
    parser.add_argument("--broker", choices=["process", "inprocess"], default=d.broker)
    parser.add_argument(
        "--broker-option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Broker option (VALUE in JSON), e.g. max_message_size=65536",
    )
    parser.add_argument("--batch-deadline", type=float, default=d.batch_deadline)
    parser.add_argument("--check-deadline", type=float, default=d.check_deadline)
    parser.add_argument(
        "--max-minutes", type=float, default=d.max_seconds / 60, help="stop after this long"
    )
    parser.add_argument(
        "--broker-log", metavar="FILE", help="write everything the broker logs to FILE"
    )
    names = [*seed_names(), *mutation_names()]
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        choices=names,
        metavar="NAME",
        help="leave out a seed kind or a mutation, to get past a known bug (repeatable): "
        + ", ".join(names),
    )
    parser.add_argument("--verbose", action="store_true", help="show the peers' own logs")
    args = parser.parse_args(argv)
    campaign = Campaign(
        broker_log=args.broker_log,
        without=frozenset(args.without),
        inputs=args.inputs,
        batch=args.batch,
        connections=args.connections,
        seed=args.seed,
        start_batch=args.start_batch,
        broker=args.broker,
        broker_options=dict(args.broker_option),
        batch_deadline=args.batch_deadline,
        check_deadline=args.check_deadline,
        max_seconds=args.max_minutes * 60,
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # the pair receives garbage too, and says so
        logging.getLogger("peerkit.peer").setLevel(logging.CRITICAL)
    results = trio.run(run_campaign, campaign)
    for line in results.report(campaign):
        print(line, flush=True)
    return 0 if results.ok else 1


if __name__ == "__main__":
    sys.exit(main())
