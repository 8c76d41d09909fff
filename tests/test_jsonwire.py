"""The JSON text subprotocol (peerkit.jsonwire): msgpack frames ⇄ JSON, type-agnostic."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import attrs
import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerkit import Message, message
from peerkit import jsonwire as jw
from peerkit._batching import MAX_BATCH
from peerkit.codec import (
    Envelope,
    control,
    decode_body,
    decode_run,
    encode_body,
    iter_envelopes,
    pack_envelope,
)
from peerkit.errors import DecodeError
from peerkit.protocol import PROTOCOL_VERSION, Hello, Kind, QueryFailed

PUB = int(Kind.PUB)


@message(type="test.jsonwire.Everything")
class Everything(Message):
    seq: int
    value: float
    label: str
    flag: bool
    data: bytes
    values: list[float] = attrs.field(factory=list)
    blobs: list[bytes] = attrs.field(factory=list)
    extra: dict[str, int] = attrs.field(factory=dict)
    maybe: float | None = None


def test_subprotocol_names_the_protocol_version() -> None:
    assert f"peerkit.json.v{PROTOCOL_VERSION}" == jw.SUBPROTOCOL
    assert jw.choose_subprotocol(["chat", jw.SUBPROTOCOL]) == jw.SUBPROTOCOL
    assert jw.choose_subprotocol([]) is None
    assert jw.choose_subprotocol(["peerkit.json.v999"]) is None


# --------------------------------------------------------------------------- values

_keys = st.text(max_size=8)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=20,
)


def _through_json(value: Any) -> Any:
    """What a browser gets and sends back: the JSON text parsed and written again."""
    text = json.dumps(jw.body_to_json(value), allow_nan=False)
    return jw.body_from_json(json.loads(text))


@given(_values)
def test_any_msgpack_value_survives_json(value: Any) -> None:
    assert _through_json(value) == value
    # and its msgpack bytes are the same again (a bytes value is still bin, not str)
    packb = msgpack.Packer(use_bin_type=True).pack
    assert packb(_through_json(value)) == packb(value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_tagged(value: float) -> None:
    tagged = jw.body_to_json(value)
    assert tagged == {"$float": str(value).replace("inf", "Infinity").replace("nan", "NaN")}
    back = jw.body_from_json(json.loads(json.dumps(tagged)))
    assert (math.isnan(back) and math.isnan(value)) or back == value


def test_integers_beyond_javascript_precision_are_tagged() -> None:
    assert jw.body_to_json((1 << 53) - 1) == (1 << 53) - 1
    assert jw.body_to_json(1 << 53) == {"$int": str(1 << 53)}
    assert jw.body_to_json(-(1 << 60)) == {"$int": str(-(1 << 60))}
    assert jw.body_from_json({"$int": "-1152921504606846976"}) == -(1 << 60)


def test_a_map_that_looks_like_a_tag_is_wrapped() -> None:
    value = {"$bytes": "not a tag", "inner": 1}
    assert jw.body_to_json(value) == value  # two keys: not a tag
    single = {"$bytes": b"\x00"}
    wrapped = jw.body_to_json(single)
    assert wrapped == {"$map": {"$bytes": {"$bytes": "AA=="}}}
    assert jw.body_from_json(wrapped) == single


def test_bytes_are_base64() -> None:
    assert jw.body_to_json(b"\x00\xff") == {"$bytes": base64.b64encode(b"\x00\xff").decode()}


# --------------------------------------------------------------------------- frames


def _message_frame(msgs: list[Message], sender: str = "amp") -> bytes:
    """A broker frame delivering ``msgs`` as one run per type (consecutive)."""
    parts = []
    i = 0
    while i < len(msgs):
        j = i
        while j < len(msgs) and type(msgs[j]) is type(msgs[i]):
            j += 1
        bodies = b"".join(encode_body(m) for m in msgs[i:j])
        parts.append(pack_envelope(PUB, msgs[i].message_type(), sender, j - i, "", bodies))
        i = j
    return b"".join(parts)


_everything = st.builds(
    Everything,
    seq=st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    value=st.floats(),
    label=st.text(max_size=20),
    flag=st.booleans(),
    data=st.binary(max_size=64),
    values=st.lists(st.floats(), max_size=4),
    blobs=st.lists(st.binary(max_size=8), max_size=3),
    extra=st.dictionaries(st.text(max_size=5), st.integers(-100, 100), max_size=3),
    maybe=st.none() | st.floats(allow_nan=False),
)


def _nan_free(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"  # any NaN (JSON carries no payload bits)
    if isinstance(value, list):
        return [_nan_free(v) for v in value]
    if isinstance(value, dict):
        return {k: _nan_free(v) for k, v in value.items()}
    return value


def _same(a: Message, b: Message) -> bool:
    """Equal but for the sender, NaN included (attrs' == says NaN != NaN)."""
    return bool(
        _nan_free(attrs.asdict(a)) | {"sender": ""} == _nan_free(attrs.asdict(b)) | {"sender": ""}
    )


@given(st.lists(_everything, min_size=1, max_size=6))
def test_typed_messages_cross_json_both_ways(msgs: list[Everything]) -> None:
    frame = _message_frame(list(msgs))
    objects = json.loads(jw.frame_to_json(frame))
    # one JSON object per message, fields by name, bytes as {"$bytes": ...}
    assert [o["kind"] for o in objects] == ["PUB"] * len(msgs)
    assert [jw.body_from_json(o["body"]["seq"]) for o in objects] == [m.seq for m in msgs]
    assert all(o["sender"] == "amp" and o["type"] == Everything.message_type() for o in objects)
    assert base64.b64decode(objects[0]["body"]["data"]["$bytes"]) == msgs[0].data
    # what a browser publishes back: the same JSON objects, sender left empty
    for o in objects:
        o["sender"] = ""
    back = jw.json_to_frame(json.dumps(objects), 1 << 20)
    (env,) = iter_envelopes(back)  # one run again
    assert env.kind == PUB and env.corr == len(msgs) and env.sender == ""
    decoded = decode_run(Everything, env.body, "js", env.corr)
    assert all(isinstance(m, Everything) for m in decoded)
    for got, sent in zip(decoded, msgs, strict=True):
        assert isinstance(got, Everything)
        assert _same(got, sent)
        assert type(got.data) is bytes and got.data == sent.data
        assert got.sender == "js"


_control_kinds = st.sampled_from(
    [k for k in Kind if k not in (Kind.PUB, Kind.HEARTBEAT, Kind.SUB, Kind.UNSUB, Kind.ACK)]
)


@given(
    st.lists(
        st.tuples(
            _control_kinds,
            st.text(max_size=10),
            st.text(max_size=10),
            st.integers(min_value=0, max_value=(1 << 64) - 1),
            st.text(max_size=10),
            st.dictionaries(_keys, _values, max_size=4),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_control_envelopes_cross_json_unchanged(items: list[tuple[Any, ...]]) -> None:
    frame = b"".join(
        pack_envelope(int(k), t, s, c, g, msgpack.packb(b, use_bin_type=True))
        for k, t, s, c, g, b in items
    )
    back = jw.json_to_frame(jw.frame_to_json(frame), 1 << 20)
    assert list(iter_envelopes(back)) == list(iter_envelopes(frame))


def test_empty_bodies_are_null() -> None:
    frame = pack_envelope(int(Kind.ACK), "", "broker", 7)
    (obj,) = json.loads(jw.frame_to_json(frame))
    assert obj == {
        "kind": "ACK",
        "type": "",
        "sender": "broker",
        "corr": 7,
        "target": "",
        "body": None,
    }
    assert jw.json_to_frame(json.dumps(obj), 100) == frame


def test_what_a_browser_writes_by_hand() -> None:
    """Fields left out take their defaults; JavaScript writes 2.0 as 2 (accepted for a
    float); one object needs no array around it."""
    text = json.dumps(
        {
            "kind": "PUB",
            "type": Everything.message_type(),
            "body": {"seq": 1, "value": 2, "label": "x", "flag": True, "data": {"$bytes": ""}},
        }
    )
    (env,) = iter_envelopes(jw.json_to_frame(text, 1000))
    assert (env.kind, env.corr, env.sender, env.target) == (PUB, 1, "", "")
    msg = decode_body(Everything, env.body, "js")
    assert msg == Everything(seq=1, value=2.0, label="x", flag=True, data=b"", sender="js")
    hello = json.dumps({"kind": "HELLO", "body": {"peer_id": "js", "protocol_version": 2}})
    (env,) = iter_envelopes(jw.json_to_frame(hello, 1000))
    assert decode_body(Hello, env.body) == Hello(peer_id="js", protocol_version=2)
    sub = json.dumps([{"kind": "SUB", "type": "A", "corr": 3, "target": "amp"}])
    assert jw.json_to_frame(sub, 1000) == pack_envelope(int(Kind.SUB), "A", "", 3, "amp")


def test_runs_stop_at_the_size_limit_and_the_batch_limit() -> None:
    body = {"kind": "PUB", "type": "A", "body": {"x": "y" * 20}}
    one = len(msgpack.packb({"x": "y" * 20}))
    envs = list(iter_envelopes(jw.json_to_frame(json.dumps([body] * 5), 2 * one)))
    assert [e.corr for e in envs] == [2, 2, 1]
    assert envs[0].body == msgpack.packb({"x": "y" * 20}) * 2
    big = list(iter_envelopes(jw.json_to_frame(json.dumps([body] * 2), one - 1)))
    assert [e.corr for e in big] == [1, 1]  # each alone: the broker refuses them by size
    many = list(iter_envelopes(jw.json_to_frame(json.dumps([body] * (MAX_BATCH + 1)), 1 << 30)))
    assert [e.corr for e in many] == [MAX_BATCH, 1]
    # a run only joins neighbours of one type: order is kept
    mixed = [body, {**body, "type": "B"}, body]
    assert [e.type for e in iter_envelopes(jw.json_to_frame(json.dumps(mixed), 1000))] == [
        "A",
        "B",
        "A",
    ]


def test_time_request_has_a_kind() -> None:
    text = json.dumps({"kind": "TIME", "corr": 4})
    assert jw.json_envelopes(text) == [Envelope(jw.TIME, "", "", 4, "", b"")]
    assert jw.json_to_frame(text, 100) == pack_envelope(jw.TIME, "", "", 4)


# ------------------------------------------------------------- what cannot be shown


def test_bodies_without_a_json_form_become_errors_in_place() -> None:
    ok = encode_body(Everything(seq=1, value=0.5, label="", flag=False, data=b""))
    int_keys = msgpack.packb({1: "a"})
    ext = msgpack.packb(msgpack.ExtType(5, b"x"))
    frame = b"".join(
        [
            pack_envelope(PUB, "T", "amp", 3, "", ok + int_keys + ok),
            pack_envelope(PUB, "T", "amp", 1, "", ext),
            pack_envelope(PUB, "T", "amp", 2, "", ok),  # count says 2, one body
            pack_envelope(PUB, "T", "amp", 1, "", b"\xc1"),  # not msgpack
            control(Kind.QERR, QueryFailed(code="no_handler", detail="none"), corr=9),
        ]
    )
    objects = json.loads(jw.frame_to_json(frame))
    assert ["body" in o for o in objects] == [True, False, True, False, True, False, False, True]
    errors = [o["error"] for o in objects if "error" in o]
    assert "map key 1 is not a string" in errors[0]
    assert "ExtType value has no JSON form" in errors[1]
    assert "2 bodies announced, 1 found" in errors[2]
    assert "not valid msgpack" in errors[3]
    assert objects[-1]["body"]["code"] == "no_handler"


def test_a_malformed_frame_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="malformed frame"):
        jw.frame_to_json(b"\x93\x01\x02")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nope", "not valid JSON (Expecting value"),
        ('{"kind": "PUB", "body": {"x": NaN}}', 'write it as {"$float": "NaN"}'),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        ("[]", "empty array"),
        ("3", "the envelope must be a JSON object, got a number"),
        ('[{"kind": "INFO"}, 3]', "envelope 2 must be a JSON object, got a number"),
        ('{"kind": "PUB", "body": {}, "bodyy": 1}', "unknown fields bodyy (an envelope has"),
        ('{"kind": "pub"}', "unknown envelope kind 'pub' (one of HELLO, WELCOME"),
        ('{"kind": 4}', "unknown envelope kind 4"),
        ('{"type": "A"}', "unknown envelope kind None"),
        ('{"kind": "SUB", "type": 3}', "type must be a string, got a number"),
        ('{"kind": "SUB", "target": null}', "target must be a string, got null"),
        ('{"kind": "SUB", "corr": -1}', "corr must be a non-negative integer, got -1"),
        ('{"kind": "SUB", "corr": 1.5}', "corr must be a non-negative integer, got 1.5"),
        ('{"kind": "SUB", "corr": true}', "corr must be a non-negative integer, got True"),
        ('{"kind": "PUB", "corr": 2, "body": {}}', "a PUB object carries one message"),
        ('{"kind": "PUB", "type": "A"}', "a PUB envelope needs a body: the message's fields"),
        ('{"kind": "QUERY", "body": [1]}', "needs a body: the message's fields as a JSON object"),
        ('{"kind": "PUB", "body": {"a": {"$byts": "AA=="}}}', "a: unknown tag '$byts'; tags"),
        ('{"kind": "PUB", "body": {"a": [{"$bytes": 1}]}}', "a[0]: $bytes takes a base64 string"),
        ('{"kind": "PUB", "body": {"a": {"$bytes": "A"}}}', "$bytes is not valid base64"),
        ('{"kind": "PUB", "body": {"a": {"$float": "nan"}}}', "$float takes 'NaN', 'Infinity'"),
        ('{"kind": "PUB", "body": {"a": {"$int": "1e3"}}}', "$int takes a string of decimal"),
        ('{"kind": "PUB", "body": {"a": {"$map": []}}}', "$map takes an object, got an array"),
        ('{"kind": "PUB", "body": {"a": 1' + "0" * 30 + "}}", "cannot be encoded"),
        (
            '{"kind": "PUB", "type": "T", "body": {"a": ' + "[" * 600 + "]" * 600 + "}}",
            "envelope ('T'): the body is nested too deeply",
        ),
    ],
)
def test_bad_json_gets_clear_errors(text: str, expected: str) -> None:
    with pytest.raises(DecodeError) as info:
        jw.json_to_frame(text, 1000)
    assert str(info.value).startswith("malformed frame: ")
    assert expected in str(info.value)


def test_binary_is_refused_where_text_is_expected() -> None:
    with pytest.raises(DecodeError, match="expected a text WebSocket message holding JSON"):
        jw.json_to_frame(b"\x90", 100)  # type: ignore[arg-type]


@given(st.text(max_size=50))
def test_any_text_is_a_frame_or_a_decode_error(text: str) -> None:
    try:
        frame = jw.json_to_frame(text, 1000)
    except DecodeError:
        return
    list(iter_envelopes(frame))  # what passes is a well-formed frame
