"""Shared WebSocket settings of broker and peer (internal)."""

from __future__ import annotations

import collections

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


def take_batch(
    out: collections.deque[bytes], limit: int, parts: list[bytes] | None = None
) -> list[bytes]:
    """Move queued envelopes from the left of ``out`` into one frame's worth.

    Stops past ``limit`` bytes or at :data:`MAX_BATCH` envelopes (one envelope is always
    taken). ``parts`` may already hold envelopes to lead the frame.
    """
    parts = [] if parts is None else parts
    size = 0
    while out and size < limit and len(parts) < MAX_BATCH:
        item = out.popleft()
        parts.append(item)
        size += len(item)
    return parts
