"""Issue 12, item 10: the fuzz campaign and the soak run work (short runs of each), and they
see what they are meant to see (a broker broken on purpose: crashes, hangs, silent loss).

The real runs are ``nox -s fuzz`` and ``nox -s soak``; these stay within a few seconds each.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from peerkit import Broker, codec
from peerkit._dispatch import Dispatcher
from peerkit._stress import mutate
from peerkit._stress.fuzz import Campaign, run_campaign
from peerkit._stress.harness import broker_under_test, rss_of
from peerkit._stress.soak import Soak, SoakResults, SoakTick, run_soak
from peerkit.codec import Envelope
from peerkit.errors import DecodeError
from peerkit.protocol import Kind

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------- the inputs


def test_every_seed_and_mutation_makes_a_frame() -> None:
    rng = random.Random(7)
    vocab = mutate.Vocabulary(own_id="fz-0-0", peers=("alice", "bob"))
    mutations = [name for name, _, _ in mutate.MUTATIONS] + ["many"]
    for seed in mutate.seed_names():
        for mutation in mutations:
            for _ in range(5):
                item = mutate.make(rng, vocab, seed=seed, mutation=mutation)
                assert item.mutation == mutation
                assert isinstance(item.frame, str if mutation == "text" else bytes)
                assert len(item.frame) < 3 * (1 << 20)
                assert item.envelopes >= 1


def test_inputs_depend_only_on_the_seed() -> None:
    vocab = mutate.Vocabulary(own_id="fz-0-0")

    def inputs(seed: int) -> list[bytes | str]:
        rng = random.Random(seed)
        return [mutate.make(rng, vocab).frame for _ in range(200)]

    assert inputs(3) == inputs(3)
    assert inputs(3) != inputs(4)


def test_valid_seeds_are_valid_and_mutations_mostly_are_not() -> None:
    rng = random.Random(1)
    vocab = mutate.Vocabulary(own_id="fz-0-0")
    for seed in mutate.seed_names():
        frame = mutate.make(rng, vocab, seed=seed, mutation="valid").frame
        assert isinstance(frame, bytes)
        assert len(list(codec.iter_envelopes(frame))) == 1
    broken = 0
    for _ in range(500):
        frame = mutate.make(rng, vocab, mutation="bitflip").frame
        try:
            list(codec.iter_envelopes(frame))
        except DecodeError:
            broken += 1
    assert broken > 100  # a bit flip often breaks the frame, not always


def test_hello_frame_is_a_valid_hello() -> None:
    (env,) = codec.iter_envelopes(mutate.hello_frame("fz-1"))
    assert env.kind == Kind.HELLO
    assert msgpack.unpackb(env.body)["peer_id"] == "fz-1"


# --------------------------------------------------------------------- the fuzz campaign


def attacker(peer_id: str) -> bool:
    """Attackers are named fz-BATCH-N (the pair fz-alice-G and fz-bob-G)."""
    return peer_id.startswith("fz-") and peer_id[3:4].isdigit()


def small_campaign(**changes: Any) -> Campaign:
    options: dict[str, Any] = {
        "inputs": 300,
        "batch": 100,
        "connections": 4,
        "broker": "inprocess",
        "batch_deadline": 20.0,
        "check_deadline": 5.0,
    }
    options.update(changes)
    return Campaign(**options)


async def test_a_short_fuzz_campaign() -> None:
    lines: list[str] = []
    with trio.fail_after(60):
        results = await run_campaign(small_campaign(), lines.append)
    report = "\n".join(results.report(small_campaign()))
    assert results.inputs == 300, report
    assert results.batches == results.checks == 3, report
    assert results.envelopes > results.inputs
    assert len(results.by_mutation) >= 10
    assert results.connections >= 4
    assert results.crashes == 0 and not results.hangs and not results.failed_checks, report
    assert results.rss_start is not None and results.rss_end is not None
    assert results.ok and "result: OK" in report
    assert lines[0].startswith("fuzz: broker at ws://127.0.0.1:")


async def test_the_campaign_sees_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker broken on purpose (an exception escapes its handling of state reports)."""
    dispatch = Dispatcher.dispatch

    def broken(self: Dispatcher, conn: Any, env: Envelope) -> None:
        if env.kind == Kind.STATE and attacker(conn.peer_id):
            raise RuntimeError("broken on purpose")
        dispatch(self, conn, env)

    monkeypatch.setattr(Dispatcher, "dispatch", broken)
    with trio.fail_after(60):
        results = await run_campaign(small_campaign(inputs=200), lambda _: None)
    assert results.crashes > 0
    assert not results.ok
    assert "crashes: 0" not in "\n".join(results.report(small_campaign()))


async def test_the_campaign_sees_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker broken on purpose: it never answers an attacker's hello."""
    accept = Broker._accept_hello

    async def stuck(self: Broker, ws: Any, frame: bytes | str, *args: Any) -> Any:
        if isinstance(frame, bytes) and re.search(rb"fz-[0-9]", frame):
            await trio.sleep_forever()
        return await accept(self, ws, frame, *args)

    monkeypatch.setattr(Broker, "_accept_hello", stuck)
    with trio.fail_after(30):
        results = await run_campaign(
            small_campaign(inputs=20, batch=10, batch_deadline=0.5), lambda _: None
        )
    assert results.hangs == [0, 1]
    assert not results.ok


async def test_the_broker_in_its_own_process() -> None:
    with trio.fail_after(30):
        async with broker_under_test("process", {"heartbeat_interval": 0.5}) as broker:
            assert broker.url.startswith("ws://127.0.0.1:")
            assert broker.pid is not None and broker.alive
            rss = broker.rss()
            assert rss is None or rss > 1 << 20
            campaign = small_campaign(inputs=100, broker="process")
            results = await run_campaign(campaign, lambda _: None, inject=broker)
            assert results.inputs == 100 and results.ok
        assert broker.ended == "shut down"


def test_the_fuzz_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "peerkit._stress.fuzz", "--inputs", "60", "--batch", "30"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "inputs tried: 60 frames" in done.stdout
    assert "broker memory (RSS): start" in done.stdout
    assert "result: OK" in done.stdout


def test_rss_of_this_process() -> None:
    rss = rss_of()
    if rss is None:
        pytest.skip("no /proc here")
    assert rss > 1 << 20


# --------------------------------------------------------------------- the soak run


def small_soak(**changes: Any) -> Soak:
    options: dict[str, Any] = {
        "seconds": 2.5,
        "rate": 300,
        "query_rate": 30,
        "churn": 2,
        "churn_every": 0.4,
        "report_every": 1.0,
        "warmup": 1.0,
        "broker": "inprocess",
    }
    options.update(changes)
    return Soak(**options)


async def test_a_short_soak() -> None:
    lines: list[str] = []
    with trio.fail_after(60):
        results = await run_soak(small_soak(), lines.append)
    assert results.published > 300
    assert results.received >= results.published  # two steady subscribers, and churn ones
    assert results.silent == 0 and results.disorder == 0
    assert results.queries_ok > 20 and results.failed_queries == 0
    assert results.joined > 7 and results.left >= 2
    assert len(results.memory) >= 2 and results.baseline is not None
    assert results.verdict(small_soak()) == []
    assert any("broker RSS" in line for line in lines)


async def test_the_soak_sees_silent_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker broken on purpose: it loses every 50th tick without telling anyone."""
    publish = Dispatcher.publish
    seen = 0

    def leaky(self: Dispatcher, sender: str, msg_type: str, body: bytes, count: int = 1) -> None:
        nonlocal seen
        if msg_type == SoakTick.message_type():
            seen += 1
            if seen % 50 == 0:
                return
        publish(self, sender, msg_type, body, count)

    monkeypatch.setattr(Dispatcher, "publish", leaky)
    with trio.fail_after(60):
        results = await run_soak(small_soak(seconds=1.5), lambda _: None)
    assert results.silent > 0
    assert any("lost silently" in why for why in results.verdict(small_soak()))


def test_soak_verdict_on_memory_growth() -> None:
    soak = Soak(max_growth=10)
    results = SoakResults(memory=[(30.0, 40 << 20), (600.0, 45 << 20)], baseline=40 << 20)
    assert results.verdict(soak) == []
    results.memory.append((630.0, 60 << 20))
    assert results.verdict(soak) == ["broker memory grew by 20.0 MiB (limit 10 MiB)"]


def test_left_out_seeds_and_mutations_never_come() -> None:
    rng = random.Random(5)
    without = frozenset({"goodbye", "pub", "oversized", "many", "bitflip"})
    vocab = mutate.Vocabulary(own_id="fz-0-0", without=without)
    items = [mutate.make(rng, vocab) for _ in range(2000)]
    assert not {i.mutation for i in items} & without
    assert not {s for i in items for s in i.seeds} & without
    assert len({i.mutation for i in items}) == len(mutate.mutation_names()) - 3
