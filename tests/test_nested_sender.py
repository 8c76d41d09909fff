"""Issue 12, item 6: the sender is never taken from the wire, nested messages included.

A message's sender is the envelope's (stamped by the broker); a message nested in a field of
another always decodes with sender ``""``, whatever its body says, and no encoder writes a
sender at any depth.
"""

from __future__ import annotations

from typing import Any

import attrs
import msgpack
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from peerkit import Broker, Message, Peer, message
from peerkit.codec import decode_body, decode_message, decode_run, encode_body
from peerkit.errors import DecodeError
from peerkit.protocol import Kind

FORGED = "config_server"


@message(type="tns.Inner")
class Inner(Message):
    x: int


@message(type="tns.Other")
class Other(Message):
    text: str


@attrs.frozen
class Box:
    """A plain attrs class (not a message) holding a message."""

    inner: Inner


@message(type="tns.Outer")
class Outer(Message):
    inner: Inner
    many: list[Inner] = attrs.field(factory=list)
    maybe: Inner | None = None
    by_name: dict[str, Inner] = attrs.field(factory=dict)
    row: tuple[Inner, ...] = ()
    box: Box | None = None
    either: Inner | Other | None = None


@message(type="tns.Deep")
class Deep(Message):
    outer: Outer
    outers: list[Outer] = attrs.field(factory=list)


def forged(**fields: Any) -> dict[str, Any]:
    """A nested body as an attacker writes it: with a sender key."""
    return {**fields, "sender": FORGED}


def forged_outer() -> dict[str, Any]:
    return {
        "inner": forged(x=1),
        "many": [forged(x=2), {"x": 3}],
        "maybe": forged(x=4),
        "by_name": {"k": forged(x=5)},
        "row": [forged(x=6)],
        "box": {"inner": forged(x=7)},
        "either": forged(text="t"),
    }


EXPECTED_OUTER = Outer(
    inner=Inner(x=1),
    many=[Inner(x=2), Inner(x=3)],
    maybe=Inner(x=4),
    by_name={"k": Inner(x=5)},
    row=(Inner(x=6),),
    box=Box(inner=Inner(x=7)),
    either=Other(text="t"),
)


def nested_senders(obj: object) -> list[str]:
    """The sender of every message nested in ``obj`` (not ``obj``'s own)."""
    found: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, Message):
            found.append(value.sender)
        if attrs.has(type(value)):
            for field in attrs.fields(type(value)):
                if field.name != "sender":
                    walk(getattr(value, field.name))
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    for field in attrs.fields(type(obj)):
        if field.name != "sender":
            walk(getattr(obj, field.name))
    return found


# --------------------------------------------------------------------- raw msgpack bytes


def test_forged_nested_sender_from_raw_bytes_is_not_believed() -> None:
    raw = msgpack.packb(forged_outer(), use_bin_type=True)
    msg = decode_body(Outer, raw, "alice")
    assert msg.sender == "alice"
    assert msg == attrs.evolve(EXPECTED_OUTER, sender="alice")
    assert nested_senders(msg) == [""] * 8


def test_forged_sender_at_every_depth() -> None:
    raw = msgpack.packb(
        forged(outer=forged(**forged_outer()), outers=[forged(**forged_outer())]),
        use_bin_type=True,
    )
    msg = decode_message("tns.Deep", raw, "bob")
    assert msg == Deep(sender="bob", outer=EXPECTED_OUTER, outers=[EXPECTED_OUTER])
    assert set(nested_senders(msg)) == {""}


def test_forged_nested_sender_without_a_stamped_sender() -> None:
    raw = msgpack.packb(forged(inner=forged(x=1)), use_bin_type=True)
    assert decode_body(Outer, raw) == Outer(inner=Inner(x=1))


def test_forged_nested_sender_in_a_run() -> None:
    one = msgpack.packb(forged_outer(), use_bin_type=True)
    bad = msgpack.packb({"inner": forged(x="not an int")}, use_bin_type=True)
    out = decode_run(Outer, one + bad + one, "carol", 3)
    assert out[0] == out[2] == attrs.evolve(EXPECTED_OUTER, sender="carol")
    assert isinstance(out[1], DecodeError)
    assert "'tns.Outer' from 'carol'" in str(out[1]) and "tns.Outer.inner.x" in str(out[1])


def test_other_errors_in_a_nested_body_are_still_reported() -> None:
    raw = msgpack.packb({"inner": forged(x=1, extra=2)}, use_bin_type=True)
    with pytest.raises(DecodeError, match=r"unknown fields extra @ tns\.Outer\.inner"):
        decode_body(Outer, raw, "alice")
    raw = msgpack.packb({"inner": [1]}, use_bin_type=True)
    with pytest.raises(DecodeError, match=r"tns\.Outer\.inner"):
        decode_body(Outer, raw, "alice")


def test_a_local_nested_sender_is_not_encoded() -> None:
    msg = Outer(inner=Inner(x=1, sender=FORGED), many=[Inner(x=2, sender=FORGED)])
    data = msgpack.unpackb(encode_body(msg))
    assert data["inner"] == {"x": 1}
    assert data["many"] == [{"x": 2}]
    assert nested_senders(decode_body(Outer, encode_body(msg), "alice")) == ["", ""]


# --------------------------------------------------------------------- hypothesis

texts = st.text(max_size=10)
senders = st.text(max_size=12)
inners = st.builds(Inner, x=st.integers(-(2**63), 2**63 - 1), sender=senders)
others = st.builds(Other, text=texts, sender=senders)
outers = st.builds(
    Outer,
    inner=inners,
    many=st.lists(inners, max_size=3),
    maybe=st.none() | inners,
    by_name=st.dictionaries(texts, inners, max_size=3),
    row=st.lists(inners, max_size=3).map(tuple),
    box=st.none() | st.builds(Box, inner=inners),
    either=st.none() | inners | others,
    sender=senders,
)
deeps = st.builds(Deep, outer=outers, outers=st.lists(outers, max_size=2), sender=senders)


def without_nested_senders(msg: Message, sender: str) -> Message:
    """``msg`` as a receiver must see it: ``sender`` on top, ``""`` on every nested message."""

    def clean(value: Any) -> Any:
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, tuple):
            return tuple(clean(v) for v in value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if attrs.has(type(value)):
            changes = {
                f.name: clean(getattr(value, f.name))
                for f in attrs.fields(type(value))
                if f.name != "sender"
            }
            if isinstance(value, Message):
                changes["sender"] = ""
            return attrs.evolve(value, **changes)
        return value

    return attrs.evolve(clean(msg), sender=sender)


def with_forged_keys(data: Any, draw: st.DrawFn, map_field: bool = False) -> Any:
    """An encoded body's unpacked data with a sender key added to some message maps (not to
    the maps of ``dict[str, Inner]`` fields, ``map_field``, nor to a :class:`Box`)."""
    if isinstance(data, list):
        return [with_forged_keys(v, draw) for v in data]
    if isinstance(data, dict):
        out = {
            k: with_forged_keys(v, draw, not map_field and k == "by_name") for k, v in data.items()
        }
        if not map_field and out.keys() != {"inner"} and draw(st.booleans()):
            out["sender"] = draw(st.sampled_from([FORGED, "", "broker", "x" * 300, 7, None]))
        return out
    return data


FAST = settings(max_examples=150, deadline=None)


@FAST
@given(msg=st.one_of(outers, deeps), sender=senders)
def test_round_trip_of_nested_messages(msg: Message, sender: str) -> None:
    body = encode_body(msg)

    def no_sender_key(value: Any, in_dict_field: bool = False) -> None:
        if isinstance(value, dict):
            assert in_dict_field or "sender" not in value
            for key, item in value.items():
                no_sender_key(item, in_dict_field=key == "by_name")
        elif isinstance(value, list):
            for item in value:
                no_sender_key(item)

    no_sender_key(msgpack.unpackb(body))
    decoded = decode_message(type(msg).message_type(), body, sender)
    assert decoded == without_nested_senders(msg, sender)
    assert set(nested_senders(decoded)) <= {""}


@FAST
@given(msg=st.one_of(outers, deeps), sender=senders, data=st.data())
def test_forged_nested_senders_never_change_the_decoded_message(
    msg: Message, sender: str, data: st.DataObject
) -> None:
    honest = decode_message(type(msg).message_type(), encode_body(msg), sender)
    tampered = with_forged_keys(msgpack.unpackb(encode_body(msg)), data.draw)
    tampered_top = {**tampered, "sender": FORGED}
    raw = msgpack.packb(tampered_top, use_bin_type=True)
    assert decode_message(type(msg).message_type(), raw, sender) == honest


# --------------------------------------------------------------------- over a live broker


async def test_forged_nested_sender_over_the_broker(broker: Broker) -> None:
    """A peer that writes a forged nested sender by hand: the subscriber, and a query
    handler, see the nested message with sender "" and the outer one with the real
    sender."""
    with trio.fail_after(10):
        got: list[Outer] = []
        arrived = trio.Event()

        def on_outer(msg: Outer) -> None:
            got.append(msg)
            arrived.set()

        asked: list[Outer] = []

        def on_query(msg: Outer) -> Inner:
            asked.append(msg)
            return Inner(x=len(asked), sender=FORGED)

        async with Peer(broker.url, "sub") as sub, Peer(broker.url, "mallory") as mallory:
            await sub.subscribe_for_all_msg_subtype(Outer, on_outer)
            await sub.register_query_handler(Outer, on_query)
            raw = msgpack.packb(forged_outer(), use_bin_type=True)
            mallory._link.publish(Outer.message_type(), raw)
            await arrived.wait()
            answer = await mallory._link.request(
                Kind.QUERY, Outer.message_type(), "", raw, timeout=5
            )
            assert answer is not None and answer.kind == Kind.REPLY
            reply = decode_message(answer.type, answer.body, answer.sender)
        assert got == [attrs.evolve(EXPECTED_OUTER, sender="mallory")]
        assert asked == [attrs.evolve(EXPECTED_OUTER, sender="mallory")]
        assert reply == Inner(x=1, sender="sub")


def test_the_explaining_path_stamps_the_same_senders() -> None:
    """The slow path (run when the fast try fails) builds the same message."""
    from peerkit.codec import _explain

    assert _explain(Outer, forged_outer(), "dave") == attrs.evolve(EXPECTED_OUTER, sender="dave")
