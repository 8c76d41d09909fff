"""How writers of broker and peer fill WebSocket messages with envelopes, and the
trio-websocket settings both sides share (sans-IO, internal)."""

from __future__ import annotations

import collections

from .codec import envelope_head
from .protocol import PUB as _PUB

#: Bytes of envelope headers allowed on top of a message body in one frame.
FRAME_OVERHEAD = 64 * 1024


def ws_max_frame(max_message_size: int) -> int:
    """Largest WebSocket message either side accepts: one full body plus batching room."""
    return 2 * max_message_size + FRAME_OVERHEAD


def batch_limit(max_message_size: int) -> int:
    """A writer stops adding envelopes to a frame past this many bytes."""
    return max_message_size + FRAME_OVERHEAD // 2


#: A writer puts at most this many envelopes in one frame, so that one burst cannot fill a
#: receiver's queue (the broker's default queue holds ten such frames).
MAX_BATCH = 1024

#: trio-websocket's ``receive_buffer_size``: bytes read from the socket at a time. Batched
#: frames are large, and trio-websocket's default (4 KiB) made one frame cost dozens of reads
#: and parser passes.
RECEIVE_BUFFER = 256 * 1024

#: trio-websocket's ``message_queue_size``: whole messages its reader task may hold before
#: ours takes them. Small: each is a batch of up to :data:`MAX_BATCH` envelopes, and a full
#: queue stops the reading (back-pressure onto the sender's socket) instead of buffering.
MESSAGE_QUEUE = 4


class Run:
    """Messages of one type queued back to back by a peer: they leave as one PUB envelope."""

    __slots__ = ("bodies", "size", "type")

    def __init__(self, type: str, body: bytes) -> None:
        self.type = type
        self.bodies = [body]
        self.size = len(body)


#: One item of a peer's outgoing queue: a packed envelope, or a run of messages to publish.
Outgoing = bytes | Run


def take_frame(out: collections.deque[Outgoing], limit: int) -> tuple[bytes, int, int]:
    """Move queued items from the left of ``out`` into one frame.

    Returns the frame, how many items (envelopes or published messages) it holds, and how
    many of those are published messages. Each :class:`Run` becomes one PUB envelope (see
    :mod:`peerkit.protocol`). Stops past ``limit`` bytes or at :data:`MAX_BATCH` items; one
    item is always taken.
    """
    parts: list[bytes] = []
    size = taken = published = 0
    while out and size < limit and taken < MAX_BATCH:
        item = out.popleft()
        if isinstance(item, bytes):
            parts.append(item)
            taken += 1
            size += len(item)
        else:  # the bodies are copied once, into the frame
            bodies = item.bodies
            head = envelope_head(_PUB, item.type, "", len(bodies), "", item.size)
            parts.append(head)
            parts += bodies
            taken += len(bodies)
            published += len(bodies)
            size += len(head) + item.size
    return (parts[0] if len(parts) == 1 else b"".join(parts)), taken, published
