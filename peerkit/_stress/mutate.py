"""Mutated frames and envelopes for the fuzz campaign (sans-IO).

Every input starts from a *seed*: a valid envelope of one kind (hello, subscribe, publish,
query, reply, state, goodbye, ...) as a peer would send it, addressed to the peers and types
of the campaign. A *mutation* then breaks it: bit flips, bytes overwritten or inserted,
truncation, a header field of the wrong type, huge counts (in the header, or a msgpack
container claiming billions of items), nested garbage, oversized strings, a wrong shape,
wrong fields in a control body, invalid UTF-8, a text frame, an empty frame, or many
envelopes in one frame. A few inputs stay valid, so the broker also sees well-formed traffic
from the same connections.

Everything is drawn from one :class:`random.Random`: the same seed gives the same inputs.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import msgpack

from ..codec import encode_body
from ..messages import BrokerGoodbyeMsg, Message, message
from ..protocol import (
    PROTOCOL_VERSION,
    SHARE_POLICIES,
    Hello,
    Kind,
    PeerStateReport,
    QueryFailed,
    RegisterHandler,
    RequestFailed,
)

__all__ = ["MUTATIONS", "SEEDS", "FuzzEcho", "FuzzPing", "Input", "Vocabulary", "hello_frame"]


@message(type="peerkit.fuzz.Ping")
class FuzzPing(Message):
    """What the campaign's well-behaved pair publishes (and attackers imitate)."""

    seq: int
    payload: bytes = b""


@message(type="peerkit.fuzz.Echo")
class FuzzEcho(Message):
    """The query the well-behaved pair asks and answers."""

    seq: int


@attrs.frozen
class Input:
    """One input: a WebSocket message (bytes: binary; str: text)."""

    frame: bytes | str
    #: the seed kinds it was made from
    seeds: tuple[str, ...]
    #: the mutation applied ("valid": none)
    mutation: str
    #: envelopes it was built from
    envelopes: int = 1


@attrs.frozen
class Vocabulary:
    """Names the inputs use: the campaign's own peers and types, and some of peerkit's."""

    #: the attacker's own peer id
    own_id: str
    #: ids of other peers (the well-behaved pair, the config server)
    peers: tuple[str, ...] = ("config_server",)
    types: tuple[str, ...] = (
        FuzzPing.message_type(),
        FuzzEcho.message_type(),
        "PanickMsg",
        "PeerJoined",
        "PeerLeft",
        "PeerStateChanged",
        "MessagesDropped",
        "BrokerShutdownMsg",
        "peerkit.Hello",
        "peerkit.BrokerInfo",
        "RegisterPeerConfig",
        "ConfigParamsRequest",
        "ExternalParamsQuery",
        "UpdateParams",
        "ConfigSnapshotQuery",
        "PeerSetParamQuery",
        "no.such.Type",
    )
    #: seed kinds and mutations left out (to get past a known bug)
    without: frozenset[str] = frozenset()


Envelope = list[Any]

# --------------------------------------------------------------------------- values


def _text(rng: random.Random, max_len: int = 24) -> str:
    alphabet = "abcxyz_.-0123456789 é€😀\u0000\n"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(max_len + 1)))


def _int(rng: random.Random) -> int:
    return rng.choice(
        [0, 1, -1, 2**31 - 1, 2**32, 2**63 - 1, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)]
    )


def _any_value(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack value (containers nest a little)."""
    pick = rng.randrange(10 if depth < 3 else 7)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return _int(rng)
    if pick == 3:
        return rng.choice([0.0, -1.5, float("inf"), float("nan"), 1e308])
    if pick == 4:
        return _text(rng)
    if pick == 5:
        return rng.randbytes(rng.randrange(16))
    if pick == 6:
        return ""
    if pick == 7:
        return [_any_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if pick == 8:
        return {_text(rng, 6): _any_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return (_text(rng, 4), _any_value(rng, depth + 1))


def _peer(rng: random.Random, vocab: Vocabulary) -> str:
    return rng.choice([*vocab.peers, vocab.own_id, "", "broker", _text(rng, 12)])


def _type(rng: random.Random, vocab: Vocabulary) -> str:
    return rng.choice(vocab.types) if rng.random() < 0.9 else _text(rng)


def _corr(rng: random.Random) -> int:
    return rng.randrange(1, 64) if rng.random() < 0.9 else _int(rng) & (2**64 - 1)


def _ping_bodies(rng: random.Random) -> tuple[bytes, int]:
    count = rng.choice([1, 1, 2, 5, 50, rng.randrange(1, 300)])
    body = b"".join(
        encode_body(FuzzPing(seq=rng.randrange(1 << 20), payload=rng.randbytes(rng.randrange(8))))
        for _ in range(count)
    )
    return body, count


# --------------------------------------------------------------------------- seeds


def _hello(rng: random.Random, vocab: Vocabulary) -> Envelope:
    hello = Hello(peer_id=vocab.own_id, protocol_version=PROTOCOL_VERSION, token="")
    return [int(Kind.HELLO), "", "", 0, "", encode_body(hello)]


def _pub(rng: random.Random, vocab: Vocabulary) -> Envelope:
    if rng.random() < 0.7:
        body, count = _ping_bodies(rng)
        return [int(Kind.PUB), FuzzPing.message_type(), "", count, "", body]
    body = msgpack.packb(_any_value(rng), use_bin_type=True) or b"\xc0"
    return [int(Kind.PUB), _type(rng, vocab), _peer(rng, vocab), 1, "", body]


def _sub(rng: random.Random, vocab: Vocabulary) -> Envelope:
    kind = Kind.SUB if rng.random() < 0.7 else Kind.UNSUB
    target = _peer(rng, vocab) if rng.random() < 0.3 else ""
    return [int(kind), _type(rng, vocab), "", _corr(rng), target, b""]


def _reg(rng: random.Random, vocab: Vocabulary) -> Envelope:
    if rng.random() < 0.3:
        return [int(Kind.UNREG), _type(rng, vocab), "", _corr(rng), "", b""]
    policy = rng.choice([*SHARE_POLICIES, "bogus"])
    body = encode_body(RegisterHandler(msg_type=_type(rng, vocab), policy=policy))
    return [int(Kind.REG), "", "", _corr(rng), "", body]


def _query(rng: random.Random, vocab: Vocabulary) -> Envelope:
    target = _peer(rng, vocab) if rng.random() < 0.5 else ""
    body = encode_body(FuzzEcho(seq=rng.randrange(1000)))
    return [int(Kind.QUERY), _type(rng, vocab), "", _corr(rng), target, body]


def _reply(rng: random.Random, vocab: Vocabulary) -> Envelope:
    if rng.random() < 0.7:
        body = encode_body(FuzzEcho(seq=rng.randrange(1000)))
        return [int(Kind.REPLY), FuzzEcho.message_type(), "", _corr(rng), "", body]
    failure = QueryFailed(code=rng.choice(["remote_error", "busy", _text(rng)]), detail=_text(rng))
    return [int(Kind.QERR), "", "", _corr(rng), "", encode_body(failure)]


def _qcancel(rng: random.Random, vocab: Vocabulary) -> Envelope:
    return [int(Kind.QCANCEL), "", "", _corr(rng), "", b""]


def _state(rng: random.Random, vocab: Vocabulary) -> Envelope:
    state = rng.choice(["connected", "ready", "running", "calibrating", _text(rng, 120)])
    report = PeerStateReport(state=state, base=rng.choice(["", "ready", _text(rng)]))
    return [int(Kind.STATE), "", "", 0, "", encode_body(report)]


def _goodbye(rng: random.Random, vocab: Vocabulary) -> Envelope:
    goodbye = BrokerGoodbyeMsg(error_msg=rng.choice([None, _text(rng)]))
    return [int(Kind.GOODBYE), BrokerGoodbyeMsg.message_type(), "", 0, "", encode_body(goodbye)]


def _info(rng: random.Random, vocab: Vocabulary) -> Envelope:
    kind = Kind.INFO if rng.random() < 0.6 else Kind.HEARTBEAT
    return [int(kind), "", "", _corr(rng), "", b""]


def _broker_only(rng: random.Random, vocab: Vocabulary) -> Envelope:
    """A kind only the broker sends (welcome, ack, dropped, shutdown, error, ...)."""
    kind = rng.choice(
        [Kind.WELCOME, Kind.REJECT, Kind.ACK, Kind.NACK, Kind.DROPPED, Kind.SHUTDOWN, Kind.ERROR]
    )
    body = encode_body(RequestFailed(code="x", detail=_text(rng))) if rng.random() < 0.5 else b""
    return [int(kind), "", _peer(rng, vocab), _corr(rng), "", body]


#: (name, builder, weight)
SEEDS: tuple[tuple[str, Callable[[random.Random, Vocabulary], Envelope], int], ...] = (
    ("pub", _pub, 22),
    ("query", _query, 12),
    ("sub", _sub, 12),
    ("reg", _reg, 8),
    ("reply", _reply, 12),
    ("qcancel", _qcancel, 4),
    ("state", _state, 8),
    ("info", _info, 5),
    ("goodbye", _goodbye, 1),
    ("hello", _hello, 4),
    ("broker_only", _broker_only, 4),
)
_SEED_NAMES = [s[0] for s in SEEDS]
_SEED_WEIGHTS = [s[2] for s in SEEDS]
_SEED_BY_NAME = {s[0]: s[1] for s in SEEDS}


def _seed(rng: random.Random, vocab: Vocabulary, name: str | None = None) -> tuple[str, Envelope]:
    if name is None:
        weights = _SEED_WEIGHTS
        if vocab.without:
            names = zip(_SEED_NAMES, weights, strict=True)
            weights = [0 if n in vocab.without else w for n, w in names]
        name = rng.choices(_SEED_NAMES, weights)[0]
    return name, _SEED_BY_NAME[name](rng, vocab)


def _pack(env: Any) -> bytes:
    data: bytes = msgpack.packb(env, use_bin_type=True)
    return data


def hello_frame(peer_id: str) -> bytes:
    """A valid hello frame for ``peer_id``."""
    return _pack(_hello(random.Random(0), Vocabulary(own_id=peer_id)))


# --------------------------------------------------------------------------- mutations

#: bytes that mean something to msgpack: never-used, container and size headers
_INTERESTING = (
    b"\x00\x7f\x80\x8f\x90\x9f\xa0\xbf\xc0\xc1\xc4\xc5\xc6\xd9\xda\xdb\xdc\xdd\xde\xdf\xff"
)


def _valid(rng: random.Random, env: Envelope) -> bytes:
    return _pack(env)


def _bitflip(rng: random.Random, env: Envelope) -> bytes:
    data = bytearray(_pack(env))
    for _ in range(rng.randrange(1, 9)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def _bytes(rng: random.Random, env: Envelope) -> bytes:
    data = bytearray(_pack(env))
    for _ in range(rng.randrange(1, 5)):
        i = rng.randrange(len(data) + 1)
        what = rng.randrange(3)
        chunk = bytes(rng.choice(_INTERESTING) for _ in range(rng.randrange(1, 6)))
        if what == 0:
            data[i:i] = chunk
        elif what == 1:
            del data[i : i + rng.randrange(1, 17)]
        else:
            data[i : i + len(chunk)] = chunk
    return bytes(data)


def _truncate(rng: random.Random, env: Envelope) -> bytes:
    data = _pack(env)
    return data[: rng.randrange(max(1, len(data)))] or data[:1]


def _wrong_type(rng: random.Random, env: Envelope) -> bytes:
    env = list(env)
    for _ in range(rng.randrange(1, 3)):
        env[rng.randrange(len(env))] = _any_value(rng)
    return _pack(env)


def _huge_count(rng: random.Random, env: Envelope) -> bytes:
    what = rng.randrange(4)
    if what == 0:  # the header's count / correlation id
        env = list(env)
        env[3] = rng.choice([2**32, 2**63 - 1, 2**64 - 1, -1, -(2**63), 0, 1024, 1025, 10**6])
        return _pack(env)
    if what == 1:  # a container header claiming 2**32 - 1 items, somewhere in the frame
        packed = bytearray(_pack(env))
        i = rng.randrange(len(packed) + 1)
        header = rng.choice([b"\xdc\xff\xff", b"\xde\xff\xff", b"\xdd", b"\xdf"])
        packed[i:i] = header + (b"\xff\xff\xff\xff" if len(header) == 1 else b"")
        return bytes(packed)
    if what == 2:  # a bin/str header claiming more bytes than there are
        head = b"\x96" + _pack(env[:5])[1:]
        size = struct.pack(">I", rng.choice([2**32 - 1, 10**8]))
        return head + rng.choice([b"\xc6", b"\xdb"]) + size
    # the envelope array itself claims a huge length
    return b"\xdd\xff\xff\xff\xff" + _pack(env)[1:]


def _nested(rng: random.Random, depth: int) -> bytes:
    """Raw msgpack nesting ``depth`` arrays or maps (msgpack-python would refuse to pack it)."""
    opener = rng.choice([b"\x91", b"\x81\xa1k"])
    return opener * depth + b"\xc0"


def _nested_garbage(rng: random.Random, env: Envelope) -> bytes:
    depth = rng.choice([5, 100, 1000, 5000, rng.randrange(1, 20000)])
    garbage = _nested(rng, depth)
    env = list(env)
    where = rng.randrange(3)
    if where == 0:  # as the body (bin of a nested structure: control bodies are decoded)
        env[5] = garbage
        return _pack(env)
    if where == 1:  # in place of a header field
        fields = [_pack(v) for v in env]
        fields[rng.randrange(6)] = garbage
        return b"\x96" + b"".join(fields)
    return garbage  # the whole frame


def _oversized(rng: random.Random, env: Envelope) -> bytes:
    size = rng.choice([1 << 16, 1 << 18, 1 << 20, (1 << 20) + 1])
    if rng.random() < 0.02:
        size = 2 * (1 << 20) + (1 << 17)  # over the broker's WebSocket limit: closed, 1009
    env = list(env)
    i = rng.choice([1, 2, 4, 5])
    env[i] = rng.randbytes(size) if i == 5 else "x" * size
    return _pack(env)


def _shape(rng: random.Random, env: Envelope) -> bytes:
    what = rng.randrange(4)
    if what == 0:
        n = rng.choice([0, 1, 5, 7, 8, 16])
        return _pack((env + env)[:n])
    if what == 1:
        return _pack({str(i): v for i, v in enumerate(env)})
    if what == 2:
        return _pack(_any_value(rng))
    return _pack([env])


def _body_fields(rng: random.Random, env: Envelope) -> bytes:
    """The body as a map with fields missing, extra or of the wrong type."""
    try:
        fields = msgpack.unpackb(env[5], raw=False)
    except Exception:
        fields = None
    if not isinstance(fields, dict):
        fields = {}
    fields = dict(fields)
    for _ in range(rng.randrange(1, 4)):
        what = rng.randrange(3)
        if what == 0 and fields:
            del fields[rng.choice(list(fields))]
        elif what == 1 and fields:
            fields[rng.choice(list(fields))] = _any_value(rng)
        else:
            fields[rng.choice(["sender", "extra", "peer_id", _text(rng, 8)])] = _any_value(rng)
    env = list(env)
    env[5] = _pack(fields)
    return _pack(env)


def _bad_utf8(rng: random.Random, env: Envelope) -> bytes:
    bad = rng.choice([b"\xff\xfe", b"\xed\xa0\x80", b"\xc3", b"\xf8\x88\x80\x80\x80"])
    fields = [_pack(v) for v in env]
    i = rng.choice([1, 2, 4])
    fields[i] = bytes([0xA0 | len(bad)]) + bad
    return b"\x96" + b"".join(fields)


def _text_frame(rng: random.Random, env: Envelope) -> str:
    return _pack(env).decode("latin-1") if rng.random() < 0.5 else _text(rng, 200)


def _empty(rng: random.Random, env: Envelope) -> bytes:
    return b""


_Mutation = Callable[[random.Random, Envelope], bytes | str]

#: (name, mutation, weight); "many" (several envelopes in one frame) is made by :func:`make`
MUTATIONS: tuple[tuple[str, _Mutation, int], ...] = (
    ("valid", _valid, 6),
    ("bitflip", _bitflip, 14),
    ("bytes", _bytes, 12),
    ("truncate", _truncate, 8),
    ("wrong_type", _wrong_type, 12),
    ("huge_count", _huge_count, 8),
    ("nested_garbage", _nested_garbage, 6),
    ("oversized", _oversized, 2),
    ("shape", _shape, 8),
    ("body_fields", _body_fields, 10),
    ("bad_utf8", _bad_utf8, 3),
    ("text", _text_frame, 2),
    ("empty", _empty, 1),
)
_MUTATION_NAMES = [m[0] for m in MUTATIONS]
_MUTATION_WEIGHTS = [m[2] for m in MUTATIONS]
_MUTATION_BY_NAME = {m[0]: m[1] for m in MUTATIONS}
#: share of inputs that are frames of many envelopes
MANY_SHARE = 0.05
#: mutations that can stand for one envelope among others in a binary frame
_INNER = [n for n in _MUTATION_NAMES if n not in ("text", "empty", "oversized")]


def make(
    rng: random.Random, vocab: Vocabulary, *, seed: str | None = None, mutation: str | None = None
) -> Input:
    """One input: a seed envelope (of kind ``seed`` if given) broken by a mutation (``mutation``
    if given; ``"many"`` for a frame of many envelopes)."""
    without = vocab.without
    if mutation is None:
        weights = _MUTATION_WEIGHTS
        if without:
            named = zip(_MUTATION_NAMES, weights, strict=True)
            weights = [0 if n in without else w for n, w in named]
        many = rng.random() < MANY_SHARE and "many" not in without
        mutation = "many" if many else rng.choices(_MUTATION_NAMES, weights)[0]
    if mutation == "many":
        count = rng.choice([2, 3, 10, 100, rng.randrange(2, 2000)])
        parts: list[bytes] = []
        names: list[str] = []
        for _ in range(count):
            name, env = _seed(rng, vocab, seed)
            inner = "valid" if rng.random() < 0.5 else rng.choice(_INNER)
            if inner in without:
                inner = "valid"
            part = _MUTATION_BY_NAME[inner](rng, env)
            assert isinstance(part, bytes)
            parts.append(part)
            names.append(name)
        return Input(b"".join(parts), tuple(sorted(set(names))), "many", count)
    name, env = _seed(rng, vocab, seed)
    return Input(_MUTATION_BY_NAME[mutation](rng, env), (name,), mutation)


def make_first(rng: random.Random, vocab: Vocabulary) -> Input:
    """A first frame for a connection that has not said hello: mostly a broken hello."""
    seed = "hello" if rng.random() < 0.7 and "hello" not in vocab.without else None
    return make(rng, vocab, seed=seed)


def seed_names() -> Sequence[str]:
    """The seed kinds, for reports."""
    return tuple(_SEED_NAMES)


def mutation_names() -> Sequence[str]:
    """The mutations (``"many"`` included), for reports."""
    return (*_MUTATION_NAMES, "many")
