"""One authenticated peer connection, seen from the broker (internal).

A :class:`Connection` owns its trio-websocket connection, its bounded outgoing queue and the
two tasks that use them: the *reader* hands every incoming envelope to the broker's
dispatch function, and the *writer* packs whatever is queued into one WebSocket message. The
broker never waits for a slow peer: published messages that do not fit in the queue (in
messages or in bytes) are dropped and counted (reported to the peer at the head of its next
message). Control envelopes are never dropped: a peer that lets too many of them (or too many
bytes of them) pile up does not read its connection and is disconnected.

The reader yields to the scheduler every :data:`YIELD_EVERY` envelopes, so that a frame of
many thousand small envelopes cannot hold the broker's event loop for long; and when the
answers to the peer's own requests pile up (more than :data:`ANSWER_BACKLOG`), it reads no
more until the writer has caught up: a peer that asks faster than it reads is slowed down
(back-pressure onto its socket), not disconnected.
"""

from __future__ import annotations

import collections
import logging
import math
import secrets
import time
from collections.abc import Callable

import trio
import trio_websocket

from . import codec, jsonwire
from ._batching import MAX_BATCH
from ._limits import DEFAULT_SEND_QUEUE_BYTES, TokenBucket
from ._ratelog import DEFAULT_INTERVAL, RateLog
from .codec import DEFAULT_MAX_MESSAGE_SIZE, Envelope, control
from .errors import DecodeError
from .messages import BrokerGoodbyeMsg, MessagesDropped
from .protocol import DELIVERY_RANK, Kind, RequestFailed

log = logging.getLogger("peerkit.broker")

#: Control envelopes (answers, queries, notices) a connection may have waiting beside its
#: published messages before the broker gives the peer up as not reading.
CONTROL_BACKLOG = 4096

#: The reader lets other tasks run after this many envelopes of one frame.
YIELD_EVERY = 256

#: Answers to a peer's own requests that may wait before its reader waits for the writer.
ANSWER_BACKLOG = 1024

#: Seconds the reader waits for the writer to make progress before it reads on anyway (the
#: peer does not read at all, or waits to write itself: never a deadlock).
WRITER_STALL = 1.0

#: The third item of a queued answer (a control envelope that answers the peer itself).
_ANSWER = -1


class Connection:
    """One peer's connection (see the module docstring)."""

    __slots__ = (
        "_heard",
        "_progress",
        "_seen_in",
        "_seen_out",
        "_stalled",
        "answers",
        "backpressure",
        "bad_frames",
        "base",
        "close_code",
        "close_reason",
        "connected_at",
        "control_bytes",
        "controls",
        "delivery",
        "drained",
        "dropped_pending",
        "dropped_total",
        "frames_in",
        "frames_out",
        "goodbye",
        "info_bucket",
        "json",
        "last_seen",
        "last_sent",
        "limit",
        "max_bytes",
        "max_message_size",
        "msgs_in",
        "msgs_out",
        "out",
        "paused",
        "peer_id",
        "published_bytes",
        "queued",
        "resume_token",
        "scope",
        "state",
        "wakeup",
        "ws",
    )

    def __init__(
        self,
        peer_id: str,
        ws: trio_websocket.WebSocketConnection,
        limit: int,
        *,
        json: bool = False,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
    ) -> None:
        self.peer_id = peer_id
        self.ws = ws
        #: the connection speaks the JSON subprotocol (:mod:`peerkit.jsonwire`): text
        #: messages, translated at the edge; everything inside is the same envelopes
        self.json = json
        self.max_message_size = max_message_size
        self.connected_at = time.time()
        #: "bad frame" warnings: at most one per interval, with the count held back
        self.bad_frames = RateLog(DEFAULT_INTERVAL, trio.current_time)
        #: the secret that lets this peer replace this connection if it comes back
        self.resume_token = secrets.token_urlsafe(18)
        self.limit = limit
        #: envelopes as (head, body, published messages): a control envelope is all head and
        #: carries none (-1 for an answer to the peer's own request); a PUB run's body is
        #: shared by every subscriber's queue
        self.out: collections.deque[tuple[bytes, bytes, int]] = collections.deque()
        self.queued = 0  # published messages in ``out``: at most ``limit`` (see lossless)
        #: bytes of the published messages in ``out`` (heads included): at most ``max_bytes``
        #: (see lossless)
        self.published_bytes = 0
        self.max_bytes = max_bytes
        self.controls = 0  # control envelopes in ``out``
        self.control_bytes = 0  # ... and their bytes
        self.answers = 0  # ... those that answer the peer's own requests
        self._stalled = False  # the writer made no progress while the reader waited for it
        self._progress = trio.lowlevel.ParkingLot()  # unparked whenever the writer wrote
        #: rate limit of broker-info requests (made at the first one)
        self.info_bucket: TokenBucket | None = None
        #: (type, sender or None) → "latest" or "lossless" for the peer's subscriptions that
        #: are not delivered the default way ("drop")
        self.delivery: dict[tuple[str, str | None], str] = {}
        #: lossless subscribers this peer's last frame overfilled: its reader waits for them
        self.backpressure: set[Connection] = set()
        self.drained = trio.Event()  # set when ``out`` falls within its bounds again
        self.paused = False  # the reader waits for back-pressure (it is alive meanwhile)
        self.wakeup = trio.Event()
        self.dropped_pending = 0
        self.dropped_total = 0
        self.close_reason: str | None = None
        self.close_code = 1008
        self.goodbye: BrokerGoodbyeMsg | None = None
        #: WebSocket messages read and written (the broker's monitor turns their changes
        #: into ``last_seen`` and ``last_sent``, so the hot paths read no clock)
        self.frames_in = self.frames_out = 0
        #: counts frames read and parts of long frames handled: signs of life
        self._heard = 0
        self._seen_in = self._seen_out = 0
        self.last_seen = trio.current_time()
        self.last_sent = self.last_seen
        self.scope = trio.CancelScope()
        self.msgs_in = 0
        self.msgs_out = 0
        self.state = "initializing"  # as the peer reports it
        self.base = ""  # the base state a custom ``state`` counts as

    # ------------------------------------------------------------------ queueing
    def kick(self, reason: str, *, code: int = 1008) -> None:
        """Close this connection (the first reason given is the one reported). ``code``
        1008 (policy violation) tells the peer not to come back; 1001 (going away) lets a
        peer that was only silent (asleep, stopped) reconnect."""
        if self.close_reason is None:
            self.close_reason = reason
            self.close_code = code
            log.warning("disconnecting %r: %s", self.peer_id, reason)
        self.scope.cancel(reason=reason)

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in the outgoing queue, published messages and control envelopes."""
        return self.published_bytes + self.control_bytes

    def room(self) -> tuple[int, int]:
        """Room left for published messages: (messages, bytes)."""
        return self.limit - self.queued, self.max_bytes - self.published_bytes

    def push(self, data: bytes) -> None:
        """Queue a control envelope. These are never dropped; a peer that lets more than
        :data:`CONTROL_BACKLOG` of them (beside its published messages), or more than
        ``max_bytes`` of them, pile up does not read its connection, and is disconnected."""
        self._push_control(data, 0)

    def answer(self, data: bytes) -> None:
        """Queue a control envelope that answers something this peer sent (see
        :data:`ANSWER_BACKLOG`)."""
        self.answers += 1
        self._push_control(data, _ANSWER)

    def _push_control(self, data: bytes, tag: int) -> None:
        out = self.out
        out.append((data, b"", tag))
        self.controls += 1
        self.control_bytes += len(data)
        self.wakeup.set()
        if len(out) > self.limit + CONTROL_BACKLOG or self.control_bytes > self.max_bytes:
            self.kick(
                f"it does not read the broker's answers ({self.controls} envelopes, "
                f"{self.control_bytes} bytes waiting; a peer must keep reading its connection)"
            )

    def push_run(self, head: bytes, body: bytes, count: int) -> None:
        """Queue a PUB envelope of ``count`` messages (the caller checked the room)."""
        self.queued += count
        self.published_bytes += len(head) + len(body)
        self.out.append((head, body, count))
        self.wakeup.set()

    def mode_for(self, msg_type: str, sender: str) -> str:
        """How this peer wants ``msg_type`` from ``sender`` delivered (its strongest
        subscription that matches)."""
        specific = self.delivery.get((msg_type, sender), "drop")
        general = self.delivery.get((msg_type, None), "drop")
        return specific if DELIVERY_RANK[specific] >= DELIVERY_RANK[general] else general

    @property
    def overfull(self) -> bool:
        """More published messages (or bytes of them) are queued than the bounds allow
        (only lossless deliveries do that, for a while)."""
        return self.queued > self.limit or self.published_bytes > self.max_bytes

    def evict_oldest(self, msg_type: str, room: int, room_bytes: int = 0) -> int:
        """Make room for ``room`` messages (and ``room_bytes`` bytes) by dropping the oldest
        queued runs of ``msg_type`` (``latest`` delivery); returns how many messages were
        dropped."""
        dropped = 0
        kept: collections.deque[tuple[bytes, bytes, int]] = collections.deque()
        for entry in self.out:
            head, body, count = entry
            if (
                count > 0
                and (
                    self.limit - self.queued < room
                    or self.max_bytes - self.published_bytes < room_bytes
                )
                and codec.run_type(head) == msg_type
            ):
                self.queued -= count
                self.published_bytes -= len(head) + len(body)
                dropped += count
                continue
            kept.append(entry)
        if dropped:
            self.out = kept
            self.lost(dropped)
        return dropped

    def lost(self, count: int) -> None:
        """Count published messages that did not fit (reported in the next message)."""
        self.dropped_pending += count
        self.dropped_total += count
        self.wakeup.set()

    def note_activity(self, now: float) -> None:
        """Called by the broker's monitor once an interval: what was read or written since
        its last call happened by ``now``."""
        if self._heard != self._seen_in or self.paused:  # paused: we do not read it
            self._seen_in, self.last_seen = self._heard, now
        if self.frames_out != self._seen_out:
            self._seen_out, self.last_sent = self.frames_out, now

    def next_frame(self, limit: int) -> bytes:
        """Take what is queued into one WebSocket message (a loss report leads it)."""
        parts: list[bytes] = []
        if self.dropped_pending:
            parts.append(control(Kind.DROPPED, MessagesDropped(count=self.dropped_pending)))
            self.dropped_pending = 0
        # Stops past ``limit`` bytes or at MAX_BATCH envelopes; one is always taken.
        out = self.out
        append = parts.append
        size = envelopes = runs = answers = published = published_bytes = 0
        while out and size < limit and envelopes < MAX_BATCH:
            head, body, count = out.popleft()
            append(head)
            if count > 0:
                append(body)
                n = len(head) + len(body)
                runs += 1
                published += count
                published_bytes += n
            else:  # a control envelope is all head
                n = len(head)
                if count:
                    answers += 1
            size += n
            envelopes += 1
        self.queued -= published
        self.published_bytes -= published_bytes
        self.controls -= envelopes - runs
        self.control_bytes -= size - published_bytes
        self.answers -= answers
        self.msgs_out += published
        if not self.overfull and self.drained.statistics().tasks_waiting:
            self.drained.set()
            self.drained = trio.Event()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # ------------------------------------------------------------------ tasks
    async def run(
        self,
        dispatch: Callable[[Connection, Envelope], None],
        limit: int,
        grace_period: float,
        stall_timeout: float = 5.0,
    ) -> None:
        """Read and write until the peer goes away or :meth:`kick` (returns either way)."""
        with self.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, limit)
                await self._reader(dispatch, grace_period, stall_timeout)
                nursery.cancel_scope.cancel()

    async def _writer(self, limit: int) -> None:
        ws = self.ws
        while True:
            await self.wakeup.wait()
            self.wakeup = trio.Event()
            while self.out or self.dropped_pending:
                frame = self.next_frame(limit)
                try:
                    await ws.send_message(jsonwire.frame_to_json(frame) if self.json else frame)
                except trio_websocket.ConnectionClosed:
                    return  # the reader sees it too
                self.frames_out += 1
                self._stalled = False
                self._progress.unpark_all()

    async def _wait_for_lossless(self, stall_timeout: float) -> None:
        """Back-pressure: this peer's last frame overfilled lossless subscribers; read
        nothing more from it until they have room (its sends then wait on TCP, and its
        ``send_message`` waits). A subscriber that drains nothing for ``stall_timeout``
        seconds is disconnected, and the publisher resumes."""
        self.paused = True
        try:
            for target in list(self.backpressure):
                while target.overfull and target.close_reason is None:
                    drained = target.drained  # replaced by the writer once set
                    with trio.move_on_after(stall_timeout) as scope:
                        await drained.wait()
                    if scope.cancelled_caught:
                        target.kick(
                            f"a lossless subscriber that read nothing for {stall_timeout:g} s "
                            "while publishers waited for it (stall_timeout)"
                        )
        finally:
            self.backpressure.clear()
            self.paused = False

    async def _reader(
        self,
        dispatch: Callable[[Connection, Envelope], None],
        grace: float,
        stall_timeout: float,
    ) -> None:
        ws = self.ws
        while True:
            try:
                frame = await ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            self.frames_in += 1
            self._heard += 1
            try:
                if isinstance(frame, str):
                    frame = jsonwire.json_to_frame(frame, self.max_message_size)
                if self.answers > ANSWER_BACKLOG:
                    await self._catch_up()
                handled = 0
                for env in codec.iter_envelopes(frame):
                    dispatch(self, env)
                    handled += 1
                    if handled == YIELD_EVERY:
                        # a frame may hold many thousand envelopes: let the other
                        # connections (and this one's writer) have their turn
                        handled = 0
                        self._heard += 1
                        if self.answers > ANSWER_BACKLOG:
                            await self._catch_up()
                        else:
                            await trio.lowlevel.checkpoint()
            except DecodeError as exc:
                report = self.bad_frames.hit("frame")
                if report is not None:
                    log.warning("bad frame from %r: %s%s", self.peer_id, exc, report.more())
                self.answer(control(Kind.ERROR, RequestFailed(code="bad_frame", detail=str(exc))))
            if self.backpressure:
                await self._wait_for_lossless(stall_timeout)
            if self.goodbye is not None and self.scope.deadline == math.inf:
                # the peer closes after its goodbye; wait for that (bounded) rather than
                # closing from both ends at once
                self.scope.deadline = trio.current_time() + grace

    async def _catch_up(self) -> None:
        """The answers to this peer's own requests pile up: read nothing more until the
        writer has taken half of them (the peer asks faster than it reads; this slows it
        down through its socket). If the writer makes no progress for
        :data:`WRITER_STALL` seconds, read on and stop waiting until it does: the peer
        does not read at all (the backlog bound disconnects it), or it is itself waiting
        to write to us (reading on ends that)."""
        while self.answers > ANSWER_BACKLOG // 2 and not self._stalled:
            written = self.frames_out
            with trio.move_on_after(WRITER_STALL):
                await self._progress.park()
            if self.frames_out == written:
                self._stalled = True
            else:
                self._heard += 1  # it reads what it asked for: a sign of life
        await trio.lowlevel.checkpoint()
