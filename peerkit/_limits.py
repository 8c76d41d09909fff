"""What one connection may cost the broker (sans-IO, internal): the broker's limits, checked
once when it is built, a token bucket for rate limits, and cutting a run of message bodies
to a number of bytes.

Every limit bounds something a peer that follows the protocol could otherwise grow without
end: bytes and envelopes queued for it, queries it leaves waiting, subscriptions, handlers,
names, connections that have not said hello. ``docs/protocol.rst`` ("Limits and security")
lists them with their defaults and what a peer sees when it hits one.
"""

from __future__ import annotations

import math
from typing import Literal

import attrs
import msgpack

from ._admission import MAX_ID_LEN
from ._checks import check_positive_int, check_seconds
from .codec import DEFAULT_MAX_MESSAGE_SIZE
from .errors import PeerkitError

#: Default bound on the bytes queued for one connection (published messages; control
#: envelopes have as much again before the peer is given up as not reading).
DEFAULT_SEND_QUEUE_BYTES = 32 << 20

#: The smallest ``max_hello_size`` accepted: a hello with a 200-character id and a token.
MIN_HELLO_SIZE = 512


@attrs.frozen(kw_only=True)
class Limits:
    """The broker's limits (see :class:`~peerkit.Broker` for what each one means).

    Build it with :meth:`checked`, which refuses a bad value with an error naming the
    option; the defaults here are the broker's.
    """

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    send_queue_size: int = 10_000
    send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES
    overflow: Literal["drop", "disconnect"] = "drop"
    info_rate: float = 20.0
    max_pending_queries: int = 1000
    max_pending_queries_total: int = 50_000
    query_deadline: float = 60.0
    max_handshakes: int = 64
    max_hello_size: int = 4096
    max_type_length: int = 256
    max_id_length: int = MAX_ID_LEN
    max_subscriptions: int = 4096
    max_handlers: int = 1024

    @classmethod
    def checked(
        cls,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        send_queue_size: int = 10_000,
        send_queue_bytes: int | None = None,
        overflow: Literal["drop", "disconnect"] = "drop",
        info_rate: float = 20.0,
        max_pending_queries: int = 1000,
        max_pending_queries_total: int = 50_000,
        query_deadline: float = 60.0,
        max_handshakes: int = 64,
        max_hello_size: int = 4096,
        max_type_length: int = 256,
        max_id_length: int = MAX_ID_LEN,
        max_subscriptions: int = 4096,
        max_handlers: int = 1024,
    ) -> Limits:
        """The limits, each checked (:class:`PeerkitError` names the option at fault).

        ``send_queue_bytes=None`` means 32 MiB, or twice ``max_message_size`` if that is
        more (the queue always has room for a message of the largest size).
        """
        if overflow not in ("drop", "disconnect"):
            raise PeerkitError(f"overflow must be 'drop' or 'disconnect', got {overflow!r}")
        for name, value in (
            ("max_message_size", max_message_size),
            ("send_queue_size", send_queue_size),
            ("max_pending_queries", max_pending_queries),
            ("max_pending_queries_total", max_pending_queries_total),
            ("max_handshakes", max_handshakes),
            ("max_hello_size", max_hello_size),
            ("max_type_length", max_type_length),
            ("max_id_length", max_id_length),
            ("max_subscriptions", max_subscriptions),
            ("max_handlers", max_handlers),
        ):
            check_positive_int(name, value)
        if send_queue_bytes is None:
            send_queue_bytes = max(DEFAULT_SEND_QUEUE_BYTES, 2 * max_message_size)
        check_positive_int("send_queue_bytes", send_queue_bytes)
        if send_queue_bytes < max_message_size:
            raise PeerkitError(
                f"send_queue_bytes ({send_queue_bytes}) must hold at least one message of "
                f"max_message_size ({max_message_size} bytes); raise send_queue_bytes"
            )
        if max_hello_size < MIN_HELLO_SIZE:
            raise PeerkitError(
                f"max_hello_size must be at least {MIN_HELLO_SIZE} bytes (a hello carries the "
                f"peer id and the token), got {max_hello_size}"
            )
        if max_pending_queries_total < max_pending_queries:
            raise PeerkitError(
                f"max_pending_queries_total ({max_pending_queries_total}) must be at least "
                f"max_pending_queries ({max_pending_queries})"
            )
        if (
            not isinstance(info_rate, int | float)
            or isinstance(info_rate, bool)
            or not info_rate > 0
            or math.isinf(info_rate)
        ):
            raise PeerkitError(
                f"info_rate must be a positive number of requests per second, got {info_rate!r}"
            )
        return cls(
            max_message_size=max_message_size,
            send_queue_size=send_queue_size,
            send_queue_bytes=send_queue_bytes,
            overflow=overflow,
            info_rate=float(info_rate),
            max_pending_queries=max_pending_queries,
            max_pending_queries_total=max_pending_queries_total,
            query_deadline=check_seconds("query_deadline", query_deadline),
            max_handshakes=max_handshakes,
            max_hello_size=max_hello_size,
            max_type_length=max_type_length,
            max_id_length=max_id_length,
            max_subscriptions=max_subscriptions,
            max_handlers=max_handlers,
        )


@attrs.define
class TokenBucket:
    """At most ``rate`` events a second on average, and ``rate`` (at least one) at once."""

    rate: float
    stamp: float  #: when ``tokens`` was last brought up to date
    tokens: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.tokens = self.burst

    @property
    def burst(self) -> float:
        return max(self.rate, 1.0)

    def take(self, now: float) -> bool:
        """Spend one token if there is one (True), else False."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def fit_bytes(bodies: bytes, count: int, room: int, *, newest: bool = False) -> tuple[bytes, int]:
    """What of a run of ``count`` bodies fits in ``room`` bytes: the first bodies (or with
    ``newest`` the last ones) and how many they are (``b"", 0`` when not even one fits or
    the run cannot be read)."""
    if len(bodies) <= room:
        return bodies, count
    if room <= 0:
        return b"", 0
    unpacker = msgpack.Unpacker(max_buffer_size=0)
    unpacker.feed(bodies)
    ends: list[int] = []  # where each body ends
    try:
        while len(ends) < count:
            unpacker.skip()
            end = unpacker.tell()
            if not newest and end > room:
                break
            ends.append(end)
    except Exception:  # msgpack raises several unrelated types: nothing is cut from it
        return b"", 0
    if not newest:
        return (bodies[: ends[-1]], len(ends)) if ends else (b"", 0)
    total = ends[-1] if ends else 0
    # the shortest tail that fits: the bodies after the first ``skip`` ones
    for skip, start in enumerate([0, *ends[:-1]]):
        if total - start <= room:
            return bodies[start:total], len(ends) - skip
    return b"", 0
