"""Shared WebSocket settings of broker and peer, and how writers fill frames (internal)."""

from __future__ import annotations

import collections

from .codec import pack_envelope
from .protocol import Kind

_PUB = int(Kind.PUB)

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

#: Bytes read from the socket at a time: batched frames are large, and trio-websocket's
#: 4 KiB default made one frame cost dozens of reads and parser passes.
RECEIVE_BUFFER = 256 * 1024


#: One item of a peer's outgoing queue: a packed envelope, or ``(type, body)`` of a message
#: to publish (the writer packs those into runs).
Outgoing = bytes | tuple[str, bytes]


def take_frame(out: collections.deque[Outgoing], limit: int, run_limit: int) -> tuple[bytes, int]:
    """Move queued items from the left of ``out`` into one frame; return it and the count.

    Consecutive publishes of one type become one PUB envelope (a run, see
    :mod:`peerkit.protocol`) whose bodies stay within ``run_limit`` bytes. Stops past
    ``limit`` bytes or at :data:`MAX_BATCH` items; one item is always taken.
    """
    parts: list[bytes] = []
    size = taken = 0
    while out and size < limit and taken < MAX_BATCH:
        item = out.popleft()
        taken += 1
        if isinstance(item, bytes):
            parts.append(item)
            size += len(item)
            continue
        typ, body = item
        bodies = [body]
        run = len(body)
        while out and taken < MAX_BATCH and size + run < limit:
            nxt = out[0]
            if isinstance(nxt, bytes) or nxt[0] != typ or run + len(nxt[1]) > run_limit:
                break
            out.popleft()
            bodies.append(nxt[1])
            run += len(nxt[1])
            taken += 1
        env = pack_envelope(_PUB, typ, "", len(bodies), "", b"".join(bodies))
        parts.append(env)
        size += len(env)
    return (parts[0] if len(parts) == 1 else b"".join(parts)), taken


def take_counted(out: collections.deque[tuple[bytes, int]], limit: int, parts: list[bytes]) -> int:
    """The broker's writer: move queued ``(envelope, messages)`` pairs into ``parts``.

    Stops past ``limit`` bytes or at :data:`MAX_BATCH` envelopes (one is always taken);
    returns how many published messages were taken.
    """
    size = messages = 0
    while out and size < limit and len(parts) < MAX_BATCH:
        data, count = out.popleft()
        parts.append(data)
        size += len(data)
        messages += count
    return messages
