"""The sans-I/O half of peerkit's WebSocket connection (internal): no trio, no sockets.

:class:`Frames` turns received bytes into messages and messages into bytes to write, on top
of a protocol object of the Sans-I/O layer of ``websockets``, which does the protocol:
handshake, ping and close rules, fragments, the size limit and every check on what arrives.

**Data frames.** Nearly every frame peerkit exchanges is one whole binary message. Those
frames, and only while the connection is open, are framed and unframed here (a header of 2
to 14 bytes and the mask, with websockets' own C masking); every other frame (text,
fragments, pings, pongs, closes, anything malformed or over the size limit) goes to the
protocol object, whole and in stream order, and so does the handshake. Going through the
protocol object costs a small frame about 13 µs of cold CPU in each process on the way,
four times per query: a quarter of a query's round trip on the reference machine. The tests
(``tests/test_ws_frames.py``) check this path against websockets itself on generated
streams: the messages, the close and the answers must be the same, however the stream is
cut into reads.

Everything generated (data frames, pongs, close frames) joins :attr:`Frames.out` in the order
it was generated; the I/O half (:mod:`peerkit._ws`) writes it.
"""

from __future__ import annotations

import collections
import os
import re
from typing import NamedTuple

from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a websockets built without its C extension
    from websockets.utils import apply_mask

_BINARY, _TEXT, _CONT = Opcode.BINARY, Opcode.TEXT, Opcode.CONT
_OPEN, _CONNECTING = State.OPEN, State.CONNECTING


class CloseReason(NamedTuple):
    """Why a connection closed: the WebSocket close code and reason."""

    code: int
    reason: str


class ConnectionClosed(Exception):
    """The connection is closed (``reason`` says how)."""

    def __init__(self, reason: CloseReason) -> None:
        super().__init__(f"WebSocket closed (code {reason.code}: {reason.reason})")
        self.reason = reason


class Frames:
    """One connection's bytes and messages, both ways (see the module's docstring)."""

    def __init__(self, protocol: Protocol) -> None:
        self.proto = protocol
        self.server = isinstance(protocol, ServerProtocol)  # reads masked frames
        limit = protocol.max_message_size
        self.max = limit if limit is not None else 1 << 63
        #: received messages, in order
        self.messages: collections.deque[bytes | str] = collections.deque()
        #: generated and not yet written, in order
        self.out: list[bytes] = []
        self.closed: CloseReason | None = None  # why the connection closed
        self.end_wanted = False  # the protocol asked to end the stream (a server's close)
        self.handshake: Request | Response | None = None  # the other side's handshake
        #: a client's handshake answer as it arrives, for its status line
        self.answer_head: bytearray | None = None
        self.parts: list[bytes | bytearray | memoryview] = []  # a message in progress
        self.text = False  # ... which is a text message
        self.head_fed = False  # the handshake's HTTP head went to the protocol object
        self.head_tail = b""  # the last bytes of the head given so far (up to 3)
        self.rbuf = bytearray()  # received bytes of an incomplete frame or header
        self.owed = 0  # bytes of the frame in progress that go to the protocol object
        self.given = bytearray()  # ... or the part of its header it has (length unknown)

    def receive(self, data: bytes | bytearray) -> None:
        """Take bytes read from the stream."""
        if self.answer_head is not None:
            self.answer_head += data[:1024]
        self.take_in(data)
        self.take_answers()

    def take_in(self, data: bytes | bytearray) -> None:
        """Take received bytes: whole binary frames here, the rest to the protocol."""
        buf = self.rbuf
        if buf:
            buf += data
            del buf[: self.split(buf)]
        else:
            used = self.split(data)
            if used < len(data):
                buf += memoryview(data)[used:]

    def split(self, data: bytes | bytearray) -> int:
        """Handle the frames at the start of ``data``; returns how many bytes were used (the
        rest is an incomplete header, or an incomplete binary frame)."""
        proto = self.proto
        n = len(data)
        pos = 0
        while pos < n:
            given = self.given
            if given:  # the protocol object has the start of a header: give it the rest
                size = 4 if given[1] & 0x7F == 126 else 10
                take = min(size - len(given), n - pos)
                given += data[pos : pos + take]
                self.feed(data[pos : pos + take])
                pos += take
                if len(given) == size:  # now the frame's length is known
                    self.owed = int.from_bytes(given[2:], "big") + (4 if given[1] & 0x80 else 0)
                    given.clear()
                continue
            if self.owed:  # a frame, or part of one, for the protocol object
                give = min(self.owed, n - pos)
                self.feed(data[pos : pos + give])
                self.owed -= give
                pos += give
                continue
            state = proto.state
            if state is not _OPEN:
                if state is not _CONNECTING:  # closing: the protocol discards the rest
                    self.feed(data[pos:])
                    return n
                if self.head_fed:  # frames sent before the handshake ended wait for it
                    return pos  # (at most one read: nothing is read until it ends)
                # the handshake's HTTP head goes to the protocol as it comes (it limits the
                # head's size); it ends at the first blank line, perhaps cut across reads
                tail = self.head_tail
                end = (tail + data[pos:]).find(b"\r\n\r\n")
                if end < 0:
                    self.head_tail = (tail + data[max(pos, n - 3) :])[-3:]
                    self.feed(data[pos:])
                    return n
                self.owed = end + 4 - len(tail)
                self.head_fed = True
                continue
            # an open connection: a frame header (RFC 6455, 5.2)
            if n - pos < 2:
                return pos
            first, second = data[pos], data[pos + 1]
            masked = second & 0x80
            ours = (
                first == 0x82  # FIN, no reserved bits, binary
                and (masked != 0) is self.server
                and not self.parts  # not inside a fragmented message
            )
            length = second & 0x7F
            head = 2
            if length >= 126:
                head = 4 if length == 126 else 10
                if n - pos < head:
                    if ours:
                        return pos  # wait for the length
                    # the protocol object may refuse this frame from its first two bytes
                    self.given += data[pos:]
                    self.feed(data[pos:])
                    return n
                length = int.from_bytes(data[pos + 2 : pos + head], "big")
            if masked:
                head += 4
            if ours and length <= self.max:
                start = pos + head
                end = start + length
                if end > n:
                    return pos  # wait for the whole frame (at most the size limit)
                if type(data) is bytes:  # a read's bytes: slicing copies once
                    body: bytes | memoryview = data[start:end]
                else:  # the buffer of a frame that took several reads: copy it once
                    body = memoryview(data)[start:end]  # (released before it shrinks)
                self.messages.append(
                    apply_mask(body, data[start - 4 : start]) if masked else bytes(body)
                )
                pos = end
            else:
                self.owed = head + length  # anything else: the protocol object's
        return pos

    def feed(self, chunk: bytes | bytearray) -> None:
        proto = self.proto
        proto.receive_data(chunk)  # never raises: a bad frame makes the protocol fail
        self.process_events(proto.events_received())

    def process_events(self, events: list[Request | Response | Frame]) -> None:
        for event in events:
            if type(event) is Frame:
                op = event.opcode
                if op is _BINARY or op is _TEXT:
                    self.parts = [event.data]
                    self.text = op is _TEXT
                elif op is _CONT:
                    self.parts.append(event.data)
                else:
                    continue  # ping, pong, close: the protocol answers them itself
                if event.fin and not self.finish_message():
                    return
            else:
                self.handshake = event  # type: ignore[assignment]

    def finish_message(self) -> bool:
        """Queue the message whose last frame came; False if it failed the connection."""
        parts, self.parts = self.parts, []
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if not self.text:
            self.messages.append(data if type(data) is bytes else bytes(data))
            return True
        try:
            self.messages.append(str(data, "utf-8"))
        except UnicodeDecodeError:
            self.fail(1007, "a text message is not valid UTF-8")
            return False
        return True

    def take_answers(self) -> None:
        """Collect what the protocol wrote while receiving, and note a close."""
        proto = self.proto
        self.generated()
        if self.closed is None and proto.state is not _OPEN:
            if proto.state is _CONNECTING:
                if proto.handshake_exc is not None and self.handshake is None:
                    self.closed = CloseReason(1002, f"bad handshake: {proto.handshake_exc}")
                return
            # when we failed the connection, our close says why, whatever came before it
            close = (
                proto.close_sent
                if proto.parser_exc is not None
                else proto.close_rcvd or proto.close_sent
            )
            self.closed = (
                CloseReason(close.code, close.reason)
                if close is not None
                else CloseReason(1006, "connection lost")
            )

    def close_as(self, code: int, reason: str) -> None:
        """Note why the connection closed, unless a reason was noted before (it stands)."""
        if self.closed is None:
            self.closed = CloseReason(code, reason)

    def fail(self, code: int, reason: str) -> None:
        self.close_as(code, reason)
        self.proto.fail(code, reason)
        self.generated()

    def generated(self) -> None:
        """Move what the protocol generated to the outgoing list (an empty item asks to
        end the stream)."""
        for chunk in self.proto.data_to_send():
            if chunk:
                self.out.append(chunk)
            else:
                self.end_wanted = True

    def frame(self, data: bytes) -> None:
        """Generate ``data`` as one binary frame (ConnectionClosed once closed)."""
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        if self.proto.state is not _OPEN:  # closing: no more data frames
            raise ConnectionClosed(CloseReason(1006, "closing"))
        n = len(data)
        mask = 0 if self.server else 0x80  # a client masks, with a fresh key every frame
        if n < 126:  # RFC 6455, 5.2: FIN and binary, then the length
            head = bytes((0x82, mask | n))
        elif n < 65536:
            head = bytes((0x82, mask | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x82, mask | 127)) + n.to_bytes(8, "big")
        if mask:
            key = os.urandom(4)
            self.out.append(head + key + apply_mask(data, key))
        else:
            self.out.append(head + data)


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})[ \r]")


def refusal(head: bytearray) -> int | None:
    """The status of a server's handshake answer that is not 101, from its first line.

    A refusal is known from its status line: there is no need to wait for its body (which a
    server may send without a length, leaving the connection open) or to accept only what
    the protocol library parses (it wants HTTP/1.1).
    """
    match = _STATUS_LINE.match(head)
    if match is None:
        return None
    status = int(match.group(1))
    return None if status == 101 else status
