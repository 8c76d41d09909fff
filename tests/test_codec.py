"""The codec: message bodies (strict cattrs + msgpack) and envelopes, with hypothesis."""

from __future__ import annotations

import math
from typing import Any

import attrs
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerkit import codec
from peerkit.codec import (
    Envelope,
    decode_body,
    decode_message,
    encode_body,
    iter_envelopes,
    pack_envelope,
)
from peerkit.errors import DecodeError, MessageTooLarge, PeerkitError, UnknownMessageType
from peerkit.messages import (
    BrokerGoodbyeMsg,
    BrokerShutdownMsg,
    ErrorMsg,
    HeartbeatMsg,
    Message,
    MessagesDropped,
    OkMsg,
    PanickMsg,
    PeerControlMessage,
    PeerReady,
    message,
    registered_types,
)
from peerkit.protocol import (
    BrokerInfo,
    Hello,
    Kind,
    PeerInfo,
    QueryFailed,
    RegisterHandler,
    Welcome,
)

FAST = settings(max_examples=200, deadline=None)
#: for the fuzzers whose examples are costly to generate
FUZZ = settings(max_examples=100, deadline=None)

# ----------------------------------------------------------------------------- test messages


@attrs.frozen
class Point:
    x: float
    y: float
    label: str = ""


@message(type="tc.Scalars")
class TcScalars(Message):
    i: int
    f: float
    s: str
    b: bool
    raw: bytes


@message(type="tc.Containers")
class TcContainers(Message):
    ints: list[int]
    names: dict[str, int]
    maybe: int | None = None
    maybe_text: str | None = None
    point: Point | None = None
    points: list[Point] = attrs.field(factory=list)
    blobs: list[bytes] = attrs.field(factory=list)
    nested: dict[str, list[float]] = attrs.field(factory=dict)
    pair: tuple[int, str] = (0, "")
    either: int | str = 0


@message(type="tc.Empty")
class TcEmpty(Message):
    pass


# ----------------------------------------------------------------------------- strategies

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
floats = st.floats(allow_nan=False)
texts = st.text(max_size=30)
blobs = st.binary(max_size=64)
peer_ids = st.text(max_size=12)
points = st.builds(Point, x=floats, y=floats, label=texts)

scalars = st.builds(TcScalars, i=ints, f=floats, s=texts, b=st.booleans(), raw=blobs)
containers = st.builds(
    TcContainers,
    ints=st.lists(ints, max_size=8),
    names=st.dictionaries(texts, ints, max_size=5),
    maybe=st.none() | ints,
    maybe_text=st.none() | texts,
    point=st.none() | points,
    points=st.lists(points, max_size=4),
    blobs=st.lists(blobs, max_size=4),
    nested=st.dictionaries(texts, st.lists(floats, max_size=4), max_size=4),
    pair=st.tuples(ints, texts),
    either=ints | texts,
)
peer_infos = st.builds(
    PeerInfo,
    peer_id=peer_ids,
    subscriptions=st.lists(texts, max_size=3),
    queued=st.integers(0, 2**32),
    state=texts,
)
builtins = st.one_of(
    st.builds(OkMsg, detail=texts),
    st.builds(ErrorMsg, code=texts, details=texts),
    st.builds(HeartbeatMsg),
    st.builds(
        PeerControlMessage,
        peer_id=peer_ids,
        action=st.sampled_from(["start", "stop", "close"]),
    ),
    st.builds(PeerReady),
    st.builds(PanickMsg, message=texts, error_type=texts, was_essential=st.booleans()),
    st.builds(BrokerGoodbyeMsg, error_msg=st.none() | texts),
    st.builds(BrokerShutdownMsg, msg=texts),
    st.builds(MessagesDropped, count=st.integers(0, 2**40)),
    st.builds(Hello, peer_id=peer_ids, protocol_version=ints, token=texts),
    st.builds(
        Welcome,
        peer_id=peer_ids,
        heartbeat_interval=floats,
        heartbeat_timeout=floats,
        max_message_size=ints,
    ),
    st.builds(
        QueryFailed,
        code=texts,
        detail=texts,
        peer_id=peer_ids,
        peers=st.lists(peer_ids, max_size=4),
    ),
    st.builds(BrokerInfo, peers=st.lists(peer_infos, max_size=3)),
)
any_message = st.one_of(scalars, containers, builtins, st.builds(TcEmpty))


def with_sender(strategy: st.SearchStrategy[Message]) -> st.SearchStrategy[Message]:
    """Messages carrying an arbitrary local sender (which must never travel)."""
    return st.tuples(strategy, peer_ids).map(lambda t: attrs.evolve(t[0], sender=t[1]))


def roundtrip(msg: Message, sender: str) -> Message:
    return decode_message(type(msg).message_type(), encode_body(msg), sender)


def body(**fields: Any) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]


GOOD_SCALARS = dict(i=1, f=1.5, s="s", b=True, raw=b"\x00")


# ----------------------------------------------------------------------------- round trips


@FAST
@given(msg=with_sender(any_message), sender=peer_ids)
def test_round_trip_of_arbitrary_messages(msg: Message, sender: str) -> None:
    decoded = roundtrip(msg, sender)
    assert type(decoded) is type(msg)
    assert decoded == attrs.evolve(msg, sender=sender)
    assert decoded.sender == decoded.subtype == sender


@FAST
@given(msg=scalars)
def test_scalar_types_survive_exactly(msg: TcScalars) -> None:
    decoded = roundtrip(msg, "p")
    assert isinstance(decoded, TcScalars)
    for name in ("i", "f", "s", "b", "raw"):
        assert type(getattr(decoded, name)) is type(getattr(msg, name)), name


def test_nan_and_infinities_round_trip() -> None:
    msg = TcScalars(i=0, f=math.nan, s="", b=False, raw=b"")
    decoded = roundtrip(msg, "p")
    assert isinstance(decoded, TcScalars)
    assert math.isnan(decoded.f)
    for value in (math.inf, -math.inf, -0.0):
        got = roundtrip(attrs.evolve(msg, f=value), "p")
        assert isinstance(got, TcScalars)
        assert got.f == value
        assert math.copysign(1, got.f) == math.copysign(1, value)


def test_integer_limits() -> None:
    for value in (-(2**63), 2**64 - 1, 0, -1):
        got = roundtrip(TcScalars(i=value, f=0.0, s="", b=False, raw=b""), "p")
        assert isinstance(got, TcScalars)
        assert got.i == value
    for value in (2**64, -(2**63) - 1):
        with pytest.raises(PeerkitError, match="cannot encode"):
            encode_body(TcScalars(i=value, f=0.0, s="", b=False, raw=b""))


# ----------------------------------------------------------------------------- wire format


@FAST
@given(payload=st.binary(min_size=1, max_size=300), text=texts)
def test_bytes_travel_as_msgpack_bin_not_base64(payload: bytes, text: str) -> None:
    raw = encode_body(TcScalars(i=1, f=0.0, s=text, b=False, raw=payload))
    data = msgpack.unpackb(raw, raw=False)
    # bin comes back as bytes, str as str: a base64 text would come back as str.
    assert type(data["raw"]) is bytes
    assert data["raw"] == payload
    assert type(data["s"]) is str
    # The payload sits verbatim in the body, behind a bin8/bin16 header.
    header = (
        bytes([0xC4, len(payload)])
        if len(payload) < 256
        else b"\xc5" + len(payload).to_bytes(2, "big")
    )
    assert header + payload in raw


def test_bytes_inside_containers_are_bin_too() -> None:
    raw = encode_body(TcContainers(ints=[], names={}, blobs=[b"\xff\x00", b""]))
    data = msgpack.unpackb(raw, raw=False)
    assert data["blobs"] == [b"\xff\x00", b""]
    assert all(type(b) is bytes for b in data["blobs"])


@FAST
@given(msg=with_sender(any_message))
def test_sender_is_never_encoded(msg: Message) -> None:
    data = msgpack.unpackb(encode_body(msg), raw=False)
    assert type(data) is dict
    assert "sender" not in data
    expected = {f.name for f in attrs.fields(type(msg))} - {"sender"}
    assert set(data) == expected


def test_nested_messages_do_not_carry_sender_either() -> None:
    info = BrokerInfo(peers=[PeerInfo(peer_id="a", sender="forged")])
    data = msgpack.unpackb(encode_body(info), raw=False)
    assert "sender" not in data["peers"][0]


def test_forged_sender_in_body_is_overwritten_by_stamped_sender() -> None:
    forged = body(detail="hi", sender="mallory")
    msg = decode_message("OkMsg", forged, "alice")
    assert msg == OkMsg(detail="hi", sender="alice")
    # With no stamped sender the forged one is not trusted either.
    assert decode_message("OkMsg", forged).sender == ""
    assert decode_body(OkMsg, forged, "bob").sender == "bob"


def test_int_accepted_for_float() -> None:
    msg = decode_body(TcScalars, body(**{**GOOD_SCALARS, "f": 3}))
    assert isinstance(msg, TcScalars)
    assert msg.f == 3.0
    assert type(msg.f) is float
    nested = decode_body(TcContainers, body(ints=[], names={}, nested={"k": [1, 2.5]}))
    assert isinstance(nested, TcContainers)
    assert nested.nested == {"k": [1.0, 2.5]}
    assert all(type(v) is float for v in nested.nested["k"])


# ----------------------------------------------------------------------------- strict decoding


BAD_BODIES = [
    # (class, body fields, what the error must name)
    (TcScalars, {**GOOD_SCALARS, "i": "1"}, ["tc.Scalars.i", "expected an int", "str"]),
    (TcScalars, {**GOOD_SCALARS, "i": True}, ["tc.Scalars.i", "expected an int", "bool"]),
    (TcScalars, {**GOOD_SCALARS, "i": 1.0}, ["tc.Scalars.i", "expected an int", "float"]),
    (TcScalars, {**GOOD_SCALARS, "s": 5}, ["tc.Scalars.s", "expected a str", "int"]),
    (TcScalars, {**GOOD_SCALARS, "s": b"x"}, ["tc.Scalars.s", "expected a str", "bytes"]),
    (TcScalars, {**GOOD_SCALARS, "b": 1}, ["tc.Scalars.b", "expected a bool", "int"]),
    (TcScalars, {**GOOD_SCALARS, "f": "1.5"}, ["tc.Scalars.f", "expected a float", "str"]),
    (TcScalars, {**GOOD_SCALARS, "f": False}, ["tc.Scalars.f", "expected a float", "bool"]),
    (TcScalars, {**GOOD_SCALARS, "raw": "AA=="}, ["tc.Scalars.raw", "expected bytes", "str"]),
    (TcScalars, {**GOOD_SCALARS, "raw": None}, ["tc.Scalars.raw", "expected bytes"]),
    (
        TcScalars,
        {k: v for k, v in GOOD_SCALARS.items() if k != "i"},
        ["required field missing", "tc.Scalars.i"],
    ),
    (TcScalars, {}, ["required field missing", "tc.Scalars.i", "tc.Scalars.raw"]),
    (TcScalars, {**GOOD_SCALARS, "extra": 1}, ["unknown fields extra", "tc.Scalars"]),
    (
        TcScalars,
        {**GOOD_SCALARS, "zz": 1, "aa": 2},
        ["unknown fields aa, zz"],
    ),
    (TcEmpty, {"x": 1}, ["unknown fields x", "tc.Empty"]),
    (OkMsg, {"detail": 1}, ["OkMsg.detail", "expected a str"]),
    (MessagesDropped, {"count": "3"}, ["MessagesDropped.count", "expected an int"]),
    (MessagesDropped, {}, ["MessagesDropped.count", "required field missing"]),
    # containers: the wire type is checked, elements too
    (TcContainers, {"ints": "123", "names": {}}, ["tc.Containers.ints", "expected an array"]),
    (TcContainers, {"ints": {"a": 1}, "names": {}}, ["tc.Containers.ints", "expected an array"]),
    (TcContainers, {"ints": [1, "2"], "names": {}}, ["tc.Containers.ints[1]", "expected an int"]),
    (TcContainers, {"ints": [True], "names": {}}, ["tc.Containers.ints[0]", "bool"]),
    (TcContainers, {"ints": [], "names": [["a", 1]]}, ["tc.Containers.names", "expected a map"]),
    (TcContainers, {"ints": [], "names": {"a": "1"}}, ["tc.Containers.names", "expected an int"]),
    (
        TcContainers,
        {"ints": [], "names": {}, "maybe": True},
        ["tc.Containers.maybe", "got bool"],
    ),
    (
        TcContainers,
        {"ints": [], "names": {}, "either": True},
        ["tc.Containers.either", "got bool"],
    ),
    (
        TcContainers,
        {"ints": [], "names": {}, "either": 1.5},
        ["tc.Containers.either", "got float"],
    ),
    (
        TcContainers,
        {"ints": [], "names": {}, "point": {"x": 1.0}},
        ["tc.Containers.point", "required field missing"],
    ),
    (
        TcContainers,
        {"ints": [], "names": {}, "point": {"x": 1.0, "y": 2.0, "z": 3.0}},
        ["tc.Containers.point", "unknown fields z"],
    ),
    (
        TcContainers,
        {"ints": [], "names": {}, "points": [{"x": "a", "y": 1.0}]},
        ["tc.Containers.points[0].x", "expected a float"],
    ),
    (
        TcContainers,
        {"ints": [], "names": {}, "pair": [1, 2]},
        ["tc.Containers.pair[1]", "expected a str"],
    ),
    (TcContainers, {"ints": [], "names": {}, "pair": "ab"}, ["expected an array"]),
    (
        TcContainers,
        {"ints": [], "names": {}, "blobs": ["AA=="]},
        ["tc.Containers.blobs[0]", "expected bytes"],
    ),
    (
        TcContainers,
        {"ints": [], "names": {}, "nested": {"k": "1.5"}},
        ["tc.Containers.nested['k']", "expected an array"],
    ),
    # attrs validators of the class run too
    (PeerControlMessage, {"peer_id": "p", "action": ""}, ["PeerControlMessage", "action"]),
]


@pytest.mark.parametrize(("cls", "fields", "words"), BAD_BODIES)
def test_strict_validation(cls: type[Message], fields: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(DecodeError) as info:
        decode_message(cls.message_type(), body(**fields), "sender-7")
    text = str(info.value)
    assert f"invalid message {cls.message_type()!r} from 'sender-7'" in text
    for word in words:
        assert word in text


def test_bytes_map_keys_are_a_decode_error() -> None:
    raw = msgpack.packb({**GOOD_SCALARS, b"zz": 1}, use_bin_type=True)
    with pytest.raises(DecodeError, match="unknown fields b'zz'"):
        decode_body(TcScalars, raw)


@pytest.mark.parametrize(
    "raw",
    [
        msgpack.packb([1, 2]),
        msgpack.packb("detail"),
        msgpack.packb(None),
        msgpack.packb(7),
        msgpack.packb(b"\x81", use_bin_type=True),
    ],
)
def test_non_map_bodies(raw: bytes) -> None:
    with pytest.raises(DecodeError, match="'OkMsg' from 'p': body is not a map"):
        decode_message("OkMsg", raw, "p")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x82\xa1a",  # truncated map
        body(detail="x") + b"\x00",  # trailing data
        b"\xa2\xff\xfe",  # str that is not UTF-8
        b"\x81\x01\xa1x",  # int map key
    ],
)
def test_garbage_bodies(raw: bytes) -> None:
    with pytest.raises(DecodeError, match="'OkMsg' from 'p': body is not valid msgpack"):
        decode_message("OkMsg", raw, "p")


def test_unknown_type_name() -> None:
    with pytest.raises(UnknownMessageType) as info:
        decode_message("tc.NoSuchType", body(), "peer-9")
    text = str(info.value)
    assert "'tc.NoSuchType'" in text
    assert "'peer-9'" in text
    assert isinstance(info.value, DecodeError)
    with pytest.raises(UnknownMessageType, match=r"'tc\.NoSuchType'"):
        decode_message("tc.NoSuchType", body())


@FUZZ
@given(data=st.binary(max_size=200), type_name=st.sampled_from(sorted(registered_types())))
def test_arbitrary_bytes_to_decode_message_only_raise_decode_error(
    data: bytes, type_name: str
) -> None:
    try:
        msg = decode_message(type_name, data, "fuzz")
    except DecodeError:
        return
    assert isinstance(msg, Message)
    assert msg.sender == "fuzz"


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=5) | st.binary(max_size=3), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        *("ints", "names", "maybe", "maybe_text", "point", "points", "blobs", "nested"),
        *("pair", "either", "x", "y", "i", "f", "s", "b", "raw", "sender", "other"),
    ]
)


@FUZZ
@given(
    fields=st.dictionaries(field_names, msgpack_values, max_size=8),
    cls=st.sampled_from([TcScalars, TcContainers, TcEmpty, BrokerInfo, QueryFailed]),
)
def test_arbitrary_msgpack_maps_decode_or_raise_decode_error(
    fields: dict[str, Any], cls: type[Message]
) -> None:
    raw = msgpack.packb(fields, use_bin_type=True)
    try:
        msg = decode_body(cls, raw, "fuzz")
    except DecodeError:
        return
    # Whatever was accepted is a well-typed message that encodes again.
    assert type(msg) is cls
    assert decode_body(cls, encode_body(msg), "fuzz") == msg or _has_nan(msg)


def _has_nan(msg: Message) -> bool:
    return "nan" in repr(msg)


# ----------------------------------------------------------------------------- envelopes

envelopes = st.builds(
    Envelope,
    kind=st.sampled_from([int(k) for k in Kind]),
    type=texts,
    sender=peer_ids,
    corr=st.integers(0, 2**64 - 1),
    target=peer_ids,
    body=st.binary(max_size=100),
)


@FAST
@given(env=envelopes)
def test_envelope_round_trip(env: Envelope) -> None:
    assert list(iter_envelopes(pack_envelope(*env))) == [env]


@FUZZ
@given(envs=st.lists(envelopes, min_size=1, max_size=10))
def test_several_envelopes_in_one_frame(envs: list[Envelope]) -> None:
    frame = b"".join(pack_envelope(*e) for e in envs)
    got = list(iter_envelopes(frame))
    assert got == envs
    assert all(type(e) is Envelope for e in got)
    assert list(iter_envelopes(bytearray(frame))) == envs


def test_envelope_body_is_bin() -> None:
    frame = pack_envelope(Kind.PUB, "OkMsg", "", 0, "", b"\x01\x02")
    item = msgpack.unpackb(frame, raw=False)
    assert item == [int(Kind.PUB), "OkMsg", "", 0, "", b"\x01\x02"]
    assert type(item[5]) is bytes


def test_good_envelopes_before_a_bad_one_are_yielded() -> None:
    good = pack_envelope(Kind.PUB, "OkMsg", body=encode_body(OkMsg()))
    it = iter_envelopes(good + b"\xc1")
    assert next(it).type == "OkMsg"
    with pytest.raises(DecodeError, match="malformed frame"):
        next(it)


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (b"", "empty frame"),
        ("text frame", "got text"),
        (msgpack.packb([4, "T", "", 0, ""]), "array of 6 items"),
        (msgpack.packb([4, "T", "", 0, "", b"", 1], use_bin_type=True), "array of 6 items"),
        (msgpack.packb({"kind": 4}), "array of 6 items"),
        (msgpack.packb(4), "array of 6 items"),
        (msgpack.packb([999, "T", "", 0, "", b""], use_bin_type=True), "unknown envelope kind"),
        (msgpack.packb([True, "T", "", 0, "", b""], use_bin_type=True), "unknown envelope kind"),
        (msgpack.packb(["4", "T", "", 0, "", b""], use_bin_type=True), "unknown envelope kind"),
        (msgpack.packb([4, 1, "", 0, "", b""], use_bin_type=True), "must be strings"),
        (msgpack.packb([4, "T", b"s", 0, "", b""], use_bin_type=True), "must be strings"),
        (msgpack.packb([4, "T", "", 0, None, b""], use_bin_type=True), "must be strings"),
        (msgpack.packb([4, "T", "", -1, "", b""], use_bin_type=True), "correlation id"),
        (msgpack.packb([4, "T", "", 1.0, "", b""], use_bin_type=True), "correlation id"),
        (msgpack.packb([4, "T", "", 0, "", "body"], use_bin_type=True), "body must be binary"),
        (b"\xc1", "not valid msgpack"),
        (b"\x96\x04", "not valid msgpack"),  # truncated
        (b"\x96\x04\xa2\xff\xfe\xa0\x00\xa0\xc4\x00", "not valid msgpack"),  # bad UTF-8
    ],
)
def test_malformed_frames(frame: Any, why: str) -> None:
    with pytest.raises(DecodeError, match="malformed frame") as info:
        list(iter_envelopes(frame))
    assert why in str(info.value)


@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_to_iter_envelopes_only_raise_decode_error(data: bytes) -> None:
    try:
        for env in iter_envelopes(data):
            assert type(env) is Envelope
    except DecodeError:
        pass


@FUZZ
@given(
    items=st.lists(
        st.tuples(
            st.integers(-5, 30) | st.booleans() | texts,
            texts | ints,
            texts | st.binary(max_size=3),
            st.integers(-5, 2**64 - 1) | st.floats(),
            texts | st.none(),
            st.binary(max_size=10) | texts,
        )
        | msgpack_values,
        min_size=1,
        max_size=4,
    )
)
def test_arbitrary_envelope_shaped_frames_only_raise_decode_error(items: list[Any]) -> None:
    frame = b"".join(msgpack.packb(item, use_bin_type=True) for item in items)
    try:
        got = list(iter_envelopes(frame))
    except DecodeError:
        return
    assert [tuple(e) for e in got] == [tuple(i) for i in items]


# ----------------------------------------------------------------------------- encode_body


def test_encode_body_max_size() -> None:
    msg = TcScalars(i=1, f=0.0, s="", b=False, raw=b"x" * 500)
    size = len(encode_body(msg))
    assert encode_body(msg, max_size=size) == encode_body(msg)
    with pytest.raises(MessageTooLarge) as info:
        encode_body(msg, max_size=size - 1)
    err = info.value
    assert isinstance(err, PeerkitError)
    assert (err.size, err.limit) == (size, size - 1)
    assert "max_message_size" in str(err)
    assert "TcScalars" in str(err)


def test_default_max_message_size_is_one_mebibyte() -> None:
    assert codec.DEFAULT_MAX_MESSAGE_SIZE == 1 << 20


@pytest.mark.parametrize("obj", [{"detail": "x"}, "OkMsg", None, OkMsg, Point(x=1.0, y=2.0)])
def test_encode_body_refuses_non_messages(obj: Any) -> None:
    with pytest.raises(PeerkitError, match=r"expected a peerkit\.Message instance"):
        encode_body(obj)


def test_encode_body_refuses_unencodable_values() -> None:
    with pytest.raises(PeerkitError, match="cannot encode OkMsg"):
        encode_body(OkMsg(detail="\ud800"))  # a lone surrogate is not UTF-8
    # The shared packer is not left in a broken state.
    assert msgpack.unpackb(encode_body(OkMsg(detail="ok"))) == {"detail": "ok"}


def test_control_envelope() -> None:
    frame = codec.control(Kind.REG, RegisterHandler(msg_type="T"), corr=5)
    (env,) = iter_envelopes(frame)
    assert (env.kind, env.corr, env.type, env.sender, env.target) == (int(Kind.REG), 5, "", "", "")
    assert decode_body(RegisterHandler, env.body) == RegisterHandler(msg_type="T")
    (empty,) = iter_envelopes(codec.control(Kind.HEARTBEAT))
    assert (empty.kind, empty.body) == (int(Kind.HEARTBEAT), b"")


@given(
    kind=st.integers(1, 21),
    type_name=st.text(max_size=40),
    sender=st.text(max_size=300),
    corr=st.integers(0, 2**64 - 1),
    target=st.text(max_size=20),
    size=st.sampled_from([0, 1, 255, 256, 65535, 65536, 70000]),
)
def test_envelope_head_is_the_packed_envelope_before_its_body(
    kind: int, type_name: str, sender: str, corr: int, target: str, size: int
) -> None:
    body = b"b" * size
    packed = msgpack.packb((kind, type_name, sender, corr, target, body), use_bin_type=True)
    head = codec.envelope_head(kind, type_name, sender, corr, target, size)
    assert head + body == packed == pack_envelope(kind, type_name, sender, corr, target, body)


def test_a_deeply_nested_envelope_kind_is_refused_without_recursing() -> None:
    """A hostile kind field nested thousands deep: a DecodeError, not a RecursionError while
    the error message is built."""
    deep: object = 0
    for _ in range(400):
        deep = [deep]
    frame = msgpack.packb([deep, "T", "", 1, "", b"x"], use_bin_type=True)
    with pytest.raises(DecodeError, match="must be an integer, got tuple"):
        list(iter_envelopes(frame))
