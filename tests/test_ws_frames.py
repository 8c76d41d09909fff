"""peerkit's data-frame path (``_wsframes.Frames``) against websockets.

The connection frames and unframes whole binary messages itself and gives every other frame
to websockets' protocol object. Fed the same bytes, cut into reads anywhere, it must end
with exactly what the protocol object alone gives when it is fed one byte at a time (so that
each frame is handled before the next one is read, as the connection does): the same
messages, the same close, the same answers. The streams are generated: binary, text and
fragmented messages, pings, pongs and closes, with wrong masking, reserved bits, unknown
opcodes, non-minimal lengths, messages over the limit and plain garbage.
"""

from __future__ import annotations

import os

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.streams import StreamReader
from websockets.uri import parse_uri

from peerkit._wsframes import Frames

LIMIT = 300  # the message size limit of the connections under test


def connection(server: bool, *, reference: bool = False) -> Frames:
    """An open connection on no stream; ``reference``: every byte goes to websockets."""
    proto = (
        ServerProtocol(max_size=LIMIT, state=State.OPEN)
        if server
        else ClientProtocol(parse_uri("ws://x/"), max_size=LIMIT, state=State.OPEN)
    )
    ws = Frames(proto)
    if reference:

        def everything_to_the_protocol(data: bytes | bytearray) -> int:
            ws.feed(bytes(data))
            return len(data)

        ws.split = everything_to_the_protocol  # type: ignore[method-assign]
    return ws


OPCODES = {"bin": Opcode.BINARY, "text": Opcode.TEXT, "cont": Opcode.CONT}
CONTROL = {"ping": Opcode.PING, "pong": Opcode.PONG, "close": Opcode.CLOSE}


@st.composite
def frame_bytes(draw: st.DrawFn, masked: bool) -> bytes:
    kind = draw(st.sampled_from([*OPCODES, *CONTROL, "garbage"]))
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=20))
    if kind in CONTROL:
        if kind == "close":
            code = draw(st.sampled_from([1000, 1001, 1008, 4000, 999, 1005]))
            data = code.to_bytes(2, "big") + draw(st.text(max_size=10)).encode()
        else:
            data = draw(st.binary(max_size=20))
        frame = Frame(CONTROL[kind], data)
    else:
        size = draw(st.sampled_from([0, 1, 5, 125, 126, 200, LIMIT, LIMIT + 1]))
        data = os.urandom(size)
        if kind == "text":
            data = draw(st.sampled_from([b"caf\xc3\xa9", b"caf\xc3", b"plain"]))
        frame = Frame(OPCODES[kind], data, fin=draw(st.booleans()))
    wrong_mask = draw(st.integers(0, 9)) == 0
    raw = bytearray(frame.serialize(mask=masked != wrong_mask, extensions=[]))
    twist = draw(st.integers(0, 19))
    if twist == 0:
        raw[0] |= 0x40  # a reserved bit
    elif twist == 1:
        raw[0] = (raw[0] & 0xF0) | draw(st.sampled_from([3, 7, 11, 15]))  # unknown opcode
    elif twist == 2 and (raw[1] & 0x7F) < 126:  # a length in more bytes than needed
        n = raw[1] & 0x7F
        raw[1:2] = bytes(((raw[1] & 0x80) | 126,)) + n.to_bytes(2, "big")
    return bytes(raw)


@st.composite
def streams(draw: st.DrawFn, masked: bool) -> tuple[bytes, list[int]]:
    frames = draw(st.lists(frame_bytes(masked), max_size=8))
    stream = b"".join(frames)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    return stream, cuts


def feed(ws: Frames, stream: bytes, cuts: list[int]) -> None:
    start = 0
    for cut in [*cuts, len(stream)]:
        if cut > start:
            ws.take_in(stream[start:cut])
            ws.take_answers()
            start = cut


def answers(ws: Frames, server: bool) -> list[tuple[Opcode, bytes]]:
    """Every frame the connection wrote, unmasked, including any after a close (a client's
    are masked with random keys: compare them unmasked)."""
    reader = StreamReader()
    reader.feed_data(b"".join(ws.out))
    reader.feed_eof()
    frames = []
    while True:
        parse = Frame.parse(reader.read_exact, mask=not server, max_size=None)
        try:
            next(parse)
        except StopIteration as done:
            frames.append((done.value.opcode, bytes(done.value.data)))
        except EOFError:
            return frames


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.data())
def test_the_same_as_websockets_alone(server: bool, data: st.DataObject) -> None:
    stream, cuts = data.draw(streams(masked=server))
    ours, reference = connection(server), connection(server, reference=True)
    feed(ours, stream, cuts)
    feed(reference, stream, list(range(len(stream))))
    assert list(ours.messages) == list(reference.messages)
    assert ours.closed == reference.closed
    assert answers(ours, server) == answers(reference, server)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=LIMIT), max_size=6), st.data())
def test_whole_binary_messages_are_ours_however_cut(
    messages: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(Frame(Opcode.BINARY, m).serialize(mask=True, extensions=[]) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    ws = connection(server=True)

    def not_for_the_protocol(chunk: bytes | bytearray) -> None:
        raise AssertionError(f"a whole binary frame went to websockets: {bytes(chunk)[:20]!r}")

    ws.feed = not_for_the_protocol  # type: ignore[method-assign]
    feed(ws, stream, cuts)
    assert list(ws.messages) == messages
    assert ws.closed is None and not ws.out


def test_frames_we_write_are_the_ones_websockets_writes() -> None:
    for size in (0, 1, 125, 126, 127, 65535, 65536, 70000):
        payload = os.urandom(size)
        server = connection(server=True)
        server.frame(payload)
        assert server.out == [Frame(Opcode.BINARY, payload).serialize(mask=False, extensions=[])]
        client = connection(server=False)
        client.frame(payload)
        frame = client.out[0]
        reader = ServerProtocol(max_size=None, state=State.OPEN)  # insists on a mask
        reader.receive_data(frame)
        [event] = reader.events_received()
        assert (event.opcode, bytes(event.data), event.fin) == (Opcode.BINARY, payload, True)
        client.frame(payload)
        assert client.out[1][-size - 4 :][:4] != frame[-size - 4 :][:4] or size == 0  # new key


def test_a_frame_with_a_64_bit_length_over_the_limit_closes_with_1009() -> None:
    frame = Frame(Opcode.BINARY, os.urandom(70000)).serialize(mask=True, extensions=[])
    for cuts in ([], [1], [5], [14], [30000]):
        ws = connection(server=True)
        feed(ws, frame, cuts)
        assert ws.closed is not None and ws.closed.code == 1009
        assert not ws.messages


def handshake_head(padding: int) -> bytes:
    client = ClientProtocol(parse_uri("ws://x/"))
    request = client.connect()
    for i in range(padding):
        request.headers[f"X-Pad-{i}"] = "a" * 8000
    client.send_request(request)
    return b"".join(client.data_to_send())


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10), st.data())
def test_a_handshake_head_of_any_size_cut_anywhere(padding: int, data: st.DataObject) -> None:
    head = handshake_head(padding)  # up to 80 KB: within what websockets accepts
    frame = Frame(Opcode.BINARY, b"right behind").serialize(mask=True, extensions=[])
    stream = head + frame
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    if data.draw(st.booleans()):  # a cut inside the blank line that ends the head
        cuts = sorted([*cuts, len(head) - data.draw(st.integers(1, 3))])
    ws = Frames(ServerProtocol(max_size=LIMIT))
    feed(ws, stream, cuts)
    assert ws.handshake is not None and ws.closed is None
    ws.proto.send_response(ws.proto.accept(ws.handshake))  # type: ignore[union-attr, arg-type]
    ws.take_in(b"")
    assert list(ws.messages) == [b"right behind"]


def test_a_handshake_head_that_never_ends_is_refused_not_buffered() -> None:
    ws = Frames(ServerProtocol(max_size=LIMIT))
    ws.take_in(handshake_head(0)[:-2])  # no blank line yet
    for _ in range(100):
        ws.take_in(b"z" * 65536)  # a header line far longer than websockets allows
        ws.take_answers()
    assert ws.handshake is None and ws.closed is not None
    assert len(ws.rbuf) < 65536 and b"431" in b"".join(ws.out)[:20]
