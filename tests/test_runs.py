"""Runs: consecutive publishes of one type travel as one PUB envelope (sans-IO and broker)."""

from __future__ import annotations

import logging

import msgpack
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from test_broker import next_envelope, raw

from peerkit import Broker, Message, Peer, codec, message
from peerkit._batching import MAX_BATCH, batch_limit, take_frame, ws_max_frame
from peerkit._link import Link
from peerkit.codec import decode_run, encode_body, iter_envelopes, pack_envelope, split_run
from peerkit.errors import DecodeError
from peerkit.messages import MessagesDropped
from peerkit.protocol import Kind, RequestFailed
from peerkit.testing import wait_for_condition


@message(type="tr.Item")
class Item(Message):
    n: int
    data: bytes = b""


@message(type="tr.Other")
class OtherItem(Message):
    n: int


@message(type="tr." + "long-type-name-" * 8 + "A")
class LongA(Message):
    n: int


@message(type="tr." + "long-type-name-" * 8 + "B")
class LongB(Message):
    n: int


@message(type="tr.Empty")
class EmptyItem(Message):
    pass


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="peerkit")


def run_of(*msgs: Message) -> bytes:
    return b"".join(encode_body(m) for m in msgs)


# ----------------------------------------------------------------------------- decode_run


def test_decode_run_yields_every_message_in_order_with_the_sender() -> None:
    got = list(decode_run(Item, run_of(*(Item(n=i) for i in range(5))), "pub", 5))
    assert got == [Item(n=i, sender="pub") for i in range(5)]


def test_a_bad_body_in_a_run_is_an_error_in_its_place_and_the_rest_decode() -> None:
    bodies = run_of(Item(n=1)) + msgpack.packb({"n": "two"}) + run_of(Item(n=3))
    got = list(decode_run(Item, bodies, "pub", 3))
    assert got[0] == Item(n=1, sender="pub") and got[2] == Item(n=3, sender="pub")
    assert isinstance(got[1], DecodeError) and "'tr.Item' from 'pub'" in str(got[1])
    not_a_map = list(decode_run(Item, msgpack.packb([1]) + run_of(Item(n=2)), "p", 2))
    assert isinstance(not_a_map[0], DecodeError) and not_a_map[1] == Item(n=2, sender="p")


@pytest.mark.parametrize(
    ("bodies", "count", "why"),
    [
        (run_of(Item(n=1), Item(n=2)), 3, "3 bodies announced, 2 found"),
        (run_of(Item(n=1), Item(n=2)), 1, "more bodies than announced"),
        (run_of(Item(n=1)) + run_of(Item(n=2))[:-1], 2, "truncated"),
        (run_of(Item(n=1)) + b"\xc1", 2, "not valid msgpack"),
    ],
)
def test_malformed_runs_end_with_one_error(bodies: bytes, count: int, why: str) -> None:
    got = list(decode_run(Item, bodies, "", count))
    assert got[0] == Item(n=1)
    assert isinstance(got[-1], DecodeError) and why in str(got[-1])


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200), count=st.integers(1, 5))
def test_arbitrary_bytes_as_a_run_only_yield_messages_or_errors(data: bytes, count: int) -> None:
    for item in decode_run(Item, data, "x", count):
        assert isinstance(item, Item | DecodeError)


def test_more_bodies_than_announced_are_not_delivered() -> None:
    got = decode_run(Item, run_of(*(Item(n=i) for i in range(50))), "p", 2)
    assert got[:2] == [Item(n=0, sender="p"), Item(n=1, sender="p")] and len(got) == 3
    assert isinstance(got[2], DecodeError) and "more bodies than announced" in str(got[2])


@pytest.mark.parametrize("value", [None, False, 0, 0.0, "", b"", [], {"x": 1}])
def test_a_fieldless_message_needs_an_empty_map(value: object) -> None:
    body = msgpack.packb(value, use_bin_type=True)
    (got,) = decode_run(EmptyItem, body, "x", 1)
    assert isinstance(got, DecodeError)
    assert decode_run(EmptyItem, msgpack.packb({}), "x", 1) == [EmptyItem(sender="x")]


def test_split_run_keeps_the_first_bodies() -> None:
    bodies = run_of(*(Item(n=i, data=b"d" * i) for i in range(6)))
    head = split_run(bodies, 4)
    assert list(decode_run(Item, head, "", 4)) == [Item(n=i, data=b"d" * i) for i in range(4)]
    assert split_run(bodies, 6) == bodies
    with pytest.raises(DecodeError):
        split_run(bodies, 7)
    with pytest.raises(DecodeError):
        split_run(b"\xc1\xc1", 1)


def test_fit_run_keeps_what_fits_the_room() -> None:
    bodies = run_of(*(Item(n=i) for i in range(5)))
    assert codec.fit_run(bodies, 5, 5) == (bodies, 5)
    assert codec.fit_run(bodies, 5, 9) == (bodies, 5)
    assert codec.fit_run(bodies, 5, 2) == (split_run(bodies, 2), 2)
    assert codec.fit_run(bodies, 5, 0) == (b"", 0)
    assert codec.fit_run(b"\xc1\xc1", 2, 1) == (b"", 0)  # cannot be cut: nothing fits


# ----------------------------------------------------------------------------- queueing

ops = st.lists(
    st.one_of(
        st.tuples(st.just("pub"), st.sampled_from(["A", "B"]), st.binary(max_size=40)),
        st.tuples(st.just("ctl"), st.just(""), st.just(b"")),
        st.tuples(st.just("take"), st.just(""), st.just(b"")),
    ),
    max_size=80,
)


def unpack_frame(frame: bytes) -> list[tuple[str, bytes] | bytes]:
    """What a frame carries, one entry per published message or control envelope."""
    seen: list[tuple[str, bytes] | bytes] = []
    for env in iter_envelopes(frame):
        if env.kind == Kind.PUB:
            bodies = msgpack.Unpacker()
            bodies.feed(env.body)
            for _ in range(env.corr):
                start = bodies.tell()
                bodies.skip()
                seen.append((env.type, env.body[start : bodies.tell()]))
            assert bodies.tell() == len(env.body)
        else:
            seen.append(pack_envelope(env.kind, env.type, env.sender, env.corr, "", env.body))
    return seen


@settings(max_examples=200, deadline=None)
@given(steps=ops, max_size=st.integers(1, 120), limit=st.integers(1, 400))
def test_publishes_leave_in_order_as_runs_within_limits(
    steps: list[tuple[str, str, bytes]], max_size: int, limit: int
) -> None:
    """Queue publishes and control envelopes, with the writer taking frames in between."""
    link = Link("ws://127.0.0.1:9", "q", lambda env: None)
    link.max_message_size = max_size
    beat = pack_envelope(int(Kind.HEARTBEAT))
    queued: list[tuple[str, bytes] | bytes] = []
    sent: list[tuple[str, bytes] | bytes] = []

    def take() -> None:
        frame, count, published = take_frame(link._out, limit)
        if not link._out:
            link._tail = None  # as the writer does
        got = unpack_frame(frame)
        assert len(got) == count
        assert published == sum(isinstance(item, tuple) for item in got)
        for env in iter_envelopes(frame):  # a run of several bodies fits one message's size
            assert env.kind != Kind.PUB or env.corr == 1 or len(env.body) <= max_size
        sent.extend(got)

    for op, typ, data in steps:
        if op == "pub":
            body = msgpack.packb(data)
            link.publish(typ, body)
            queued.append((typ, body))
        elif op == "ctl":
            link.push(beat)
            queued.append(beat)
        elif link._out:
            take()
    while link._out:
        take()
    assert sent == queued
    assert link._enqueued == len(queued)


def test_a_frame_of_one_message_runs_stays_within_the_websocket_limit() -> None:
    """Alternating types make one run per message: the frame counts their headers too."""
    link = Link("ws://127.0.0.1:9", "q", lambda env: None)
    link.max_message_size = max_size = 16384
    for i in range(MAX_BATCH):
        link.publish((LongA if i % 2 else LongB).message_type(), b"\x81\xa1n\x01")
    frame, count, _ = take_frame(link._out, batch_limit(max_size))
    assert len(frame) <= batch_limit(max_size) + max_size < ws_max_frame(max_size)
    assert count < MAX_BATCH  # it stopped at the byte limit


def test_a_run_holds_at_most_max_batch_messages() -> None:
    link = Link("ws://127.0.0.1:9", "q", lambda env: None)
    link.max_message_size = 1 << 20
    for _ in range(MAX_BATCH + 10):
        link.publish("A", b"\x80")
    frame, count, published = take_frame(link._out, 1 << 20)
    assert count == published == MAX_BATCH and len(link._out) == 1
    (env,) = iter_envelopes(frame)
    assert env.corr == MAX_BATCH and env.body == b"\x80" * MAX_BATCH


# ----------------------------------------------------------------------------- broker


async def test_publisher_batches_arrive_as_runs_in_order(broker: Broker) -> None:
    with trio.fail_after(10):
        async with raw(broker.url, "sub") as ws, Peer(broker.url, "pub") as pub:
            await ws.send_message(pack_envelope(int(Kind.SUB), "tr.Item", "", 1))
            await next_envelope(ws, Kind.ACK)
            for i in range(300):
                await pub.send_message(Item(n=i))
            got: list[int] = []
            runs = 0
            while len(got) < 300:
                for env in iter_envelopes(await ws.get_message()):  # type: ignore[arg-type]
                    if env.kind == Kind.PUB:
                        runs += 1
                        for msg in decode_run(Item, env.body, env.sender, env.corr):
                            assert isinstance(msg, Item) and msg.sender == "pub"
                            got.append(msg.n)
            assert got == list(range(300))
            assert runs < 300  # batched, not one envelope per message


@pytest.mark.parametrize(
    ("count", "bodies"),
    [
        (0, b""),
        (0, run_of(Item(n=1))),
        (10**6, run_of(Item(n=1))),  # more messages than bytes
        (2**64 - 1, b"\x80" * 100),
        (MAX_BATCH + 1, b"\x80" * (MAX_BATCH + 1)),
    ],
)
async def test_pub_envelopes_with_impossible_counts_are_refused(
    broker: Broker, count: int, bodies: bytes
) -> None:
    with trio.fail_after(10):
        async with Peer(broker.url, "sub") as sub, raw(broker.url, "rogue") as ws:
            async with sub.subscription(Item) as items:
                await ws.send_message(
                    pack_envelope(int(Kind.PUB), "tr.Item", "", count, "", bodies)
                )
                env = await next_envelope(ws, Kind.ERROR)
                failure = codec.decode_body(RequestFailed, env.body)
                assert isinstance(failure, RequestFailed) and failure.code == "bad_request"
                assert "rogue" in broker.peer_ids
                # nothing was delivered or counted, and the broker still routes and reports
                await ws.send_message(
                    pack_envelope(int(Kind.PUB), "tr.Item", "", 1, "", run_of(Item(n=7)))
                )
                assert (await items.receive()).n == 7
            assert sub.dropped_messages == 0 and sub.msgs_in == 1
            info = await sub.broker_info()
            assert [p.msgs_in for p in info.peers if p.peer_id == "rogue"] == [1]


async def test_a_run_announcing_fewer_messages_delivers_only_those(broker: Broker) -> None:
    with trio.fail_after(10):
        async with Peer(broker.url, "sub") as sub, raw(broker.url, "rogue") as ws:
            async with sub.subscription(Item) as items, sub.subscription(OtherItem) as marks:
                bodies = run_of(*(Item(n=i) for i in range(50)))
                await ws.send_message(pack_envelope(int(Kind.PUB), "tr.Item", "", 2, "", bodies))
                await ws.send_message(
                    pack_envelope(int(Kind.PUB), "tr.Other", "", 1, "", run_of(OtherItem(n=1)))
                )
                await marks.receive()  # everything before it was handled
                assert [(await items.receive()).n for _ in range(2)] == [0, 1]
                with pytest.raises(trio.WouldBlock):
                    items.receive_nowait()
            assert sub.msgs_in == 3 and sub.decode_errors == 1


async def test_publishing_alternating_types_keeps_the_connection(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        broker = Broker(max_message_size=16384)
        await nursery.start(broker.run)
        got: list[int] = []
        done = trio.Event()

        def on(msg: LongA | LongB) -> None:
            got.append(msg.n)
            if len(got) == 2000:
                done.set()

        async with Peer(broker.url, "sub") as sub, Peer(broker.url, "pub") as pub:
            await sub.subscribe_for_all_msg_subtype(LongA, on)
            await sub.subscribe_for_all_msg_subtype(LongB, on)
            for i in range(2000):
                await pub.send_message((LongA if i % 2 else LongB)(n=i))
            await done.wait()
            assert got == list(range(2000)) and pub.is_connected
            assert pub.msgs_out == 2000  # published messages only, like the broker's msgs_in
            info = await pub.broker_info()
            assert [p.msgs_in for p in info.peers if p.peer_id == "pub"] == [2000]


async def test_a_run_that_half_fits_the_queue_is_split_and_the_rest_counted(
    nursery: trio.Nursery,
) -> None:
    """The broker's queue bound is exact in messages: a run is cut where the room ends."""
    with trio.fail_after(10):
        broker = Broker(send_queue_size=7)
        await nursery.start(broker.run)
        async with raw(broker.url, "stuck") as sub, raw(broker.url, "pub") as pub:
            await sub.send_message(pack_envelope(int(Kind.SUB), "tr.Item", "", 1))
            await next_envelope(sub, Kind.ACK)
            # stop reading "stuck" until both runs are routed: 5 + 5 against room for 7
            first = run_of(*(Item(n=i) for i in range(5)))
            second = run_of(*(Item(n=i) for i in range(5, 10)))
            await pub.send_message(
                pack_envelope(int(Kind.PUB), "tr.Item", "", 5, "", first)
                + pack_envelope(int(Kind.PUB), "tr.Item", "", 5, "", second)
                + pack_envelope(int(Kind.INFO), "", "", 9)
            )
            await next_envelope(pub, Kind.REPLY)  # the broker handled the whole frame
            (info,) = [p for p in broker.info().peers if p.peer_id == "stuck"]
            # the broker routes a whole frame before its writer runs: 5 queued, 2 fit, 3 lost
            assert info.dropped == 3
            got: list[int] = []
            dropped = 0
            while len(got) + dropped < 10:
                for env in iter_envelopes(await sub.get_message()):  # type: ignore[arg-type]
                    if env.kind == Kind.PUB:
                        for msg in decode_run(Item, env.body, "", env.corr):
                            assert isinstance(msg, Item)
                            got.append(msg.n)
                    elif env.kind == Kind.DROPPED:
                        report = codec.decode_body(MessagesDropped, env.body)
                        assert isinstance(report, MessagesDropped)
                        dropped += report.count
            assert got == list(range(len(got))) and len(got) + dropped == 10
            assert dropped == info.dropped


async def test_peer_inbox_takes_the_part_of_a_run_that_fits(broker: Broker) -> None:
    with trio.fail_after(10):
        release = trio.Event()
        started = trio.Event()
        got: list[int] = []

        async def slow(msg: Item) -> None:
            started.set()
            await release.wait()
            got.append(msg.n)

        async with (
            Peer(broker.url, "slow", receive_queue_size=5) as sub,
            raw(broker.url, "pub") as pub,
        ):
            await sub.subscribe_for_all_msg_subtype(Item, slow)
            # first message: in hand (blocked, no longer queued); then a run of 8 where 5 fit
            one = run_of(Item(n=0))
            await pub.send_message(pack_envelope(int(Kind.PUB), "tr.Item", "", 1, "", one))
            await started.wait()
            bodies = run_of(*(Item(n=i) for i in range(1, 9)))
            await pub.send_message(pack_envelope(int(Kind.PUB), "tr.Item", "", 8, "", bodies))
            await wait_for_condition(lambda: sub.dropped_messages >= 3)
            release.set()
            async with sub.subscription(OtherItem) as marks:
                await pub.send_message(
                    pack_envelope(int(Kind.PUB), "tr.Other", "", 1, "", run_of(OtherItem(n=1)))
                )
                await marks.receive()
            assert got == [0, 1, 2, 3, 4, 5] and sub.dropped_messages == 3
