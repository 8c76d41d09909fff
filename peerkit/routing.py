"""The broker's routing state (sans-IO): subscriptions, query handlers, pending queries.

Everything is keyed by peer id. The broker's trio layer asks this table *who* gets an
envelope; it never looks inside message bodies.

What it holds is bounded: subscriptions and handlers per peer (``max_subscriptions``,
``max_handlers``), pending queries by the broker (per asker and in total, with a deadline
each, see :meth:`RoutingTable.expire`), and the cache of subscribers per (type, sender),
which keeps no entry for a type nobody subscribed to and is emptied when it holds more than
``max_cache_entries`` entries or ``max_cache_bytes`` bytes of names.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable

import attrs

from .errors import (
    BrokerRequestError,
    HandlerAlreadyRegistered,
    MultiplePeersAvailable,
    NoHandlerError,
)
from .protocol import SHARE_POLICIES


@attrs.define
class HandlerSet:
    """Peers handling one query type, and how a query picks among them."""

    policy: str
    peers: list[str] = attrs.field(factory=list)
    next_index: int = 0


@attrs.frozen
class PendingQuery:
    """A query the broker forwarded and is waiting to see answered."""

    corr: int  #: the broker's correlation id (as seen by the handler)
    asker: str
    asker_corr: int
    handler: str
    msg_type: str
    #: when the broker gives up waiting (in the caller's clock; never by default)
    deadline: float = math.inf


@attrs.frozen
class Removal:
    """What removing a peer left behind for the broker to act on."""

    #: queries the removed peer was handling: their askers must be told at once
    orphaned_queries: tuple[PendingQuery, ...]
    #: queries the removed peer had asked: late replies will be dropped
    abandoned_queries: int


#: Bytes a cache entry costs beside its names (key tuple, dict slot, result tuple).
_CACHE_ENTRY_OVERHEAD = 200


class RoutingTable:
    """Subscriptions ``(type, sender-or-all) → peers`` and query bookkeeping."""

    def __init__(
        self,
        *,
        max_subscriptions: int = 4096,
        max_handlers: int = 1024,
        max_cache_entries: int = 50_000,
        max_cache_bytes: int = 8 << 20,
    ) -> None:
        self.max_subscriptions = max_subscriptions
        self.max_handlers = max_handlers
        self.max_cache_entries = max_cache_entries
        self.max_cache_bytes = max_cache_bytes
        #: counts every change of peers, subscriptions and handlers (for caches above)
        self.changes = 0
        self._peers: set[str] = set()
        self._all: dict[str, set[str]] = {}
        self._specific: dict[tuple[str, str], set[str]] = {}
        #: how many sender-specific subscription keys each type has
        self._specific_types: collections.Counter[str] = collections.Counter()
        self._peer_subs: dict[str, set[tuple[str, str | None]]] = {}
        self._handlers: dict[str, HandlerSet] = {}
        self._peer_handlers: dict[str, set[str]] = {}
        #: in the order they were opened: with one deadline for every query, that is the
        #: order of their deadlines too (see expire)
        self._pending: dict[int, PendingQuery] = {}
        self._by_asker: dict[tuple[str, int], int] = {}
        self._asker_pending: collections.Counter[str] = collections.Counter()
        self._next_corr = 1
        self._cache: dict[tuple[str, str], tuple[str, ...]] = {}
        self._cache_bytes = 0

    # ------------------------------------------------------------------ peers
    def add_peer(self, peer_id: str) -> None:
        if peer_id in self._peers:
            raise ValueError(f"peer {peer_id!r} is already in the routing table")
        self._peers.add(peer_id)
        self._peer_subs[peer_id] = set()
        self._peer_handlers[peer_id] = set()
        self.changes += 1

    def has_peer(self, peer_id: str) -> bool:
        return peer_id in self._peers

    @property
    def peers(self) -> frozenset[str]:
        return frozenset(self._peers)

    def remove_peer(self, peer_id: str) -> Removal:
        """Forget ``peer_id``: its subscriptions, its handlers and its pending queries."""
        if peer_id not in self._peers:
            return Removal((), 0)
        self._peers.discard(peer_id)
        for msg_type, sender in list(self._peer_subs.pop(peer_id, ())):
            self._discard_sub(peer_id, msg_type, sender)
        for msg_type in list(self._peer_handlers.pop(peer_id, ())):
            self._discard_handler(peer_id, msg_type)
        orphaned = []
        abandoned = 0
        for corr, pq in list(self._pending.items()):
            if pq.handler == peer_id:
                orphaned.append(pq)
                self._forget(corr)
            elif pq.asker == peer_id:
                abandoned += 1
                self._forget(corr)
        self._clear_cache()
        return Removal(tuple(orphaned), abandoned)

    # ---------------------------------------------------------- subscriptions
    def subscribe(self, peer_id: str, msg_type: str, sender: str | None = None) -> None:
        """Deliver ``msg_type`` (from ``sender``, or from everyone if None) to ``peer_id``.

        Raises :class:`BrokerRequestError` (``too_many``) beyond ``max_subscriptions``.
        """
        self._require(peer_id)
        subs = self._peer_subs[peer_id]
        if (msg_type, sender) in subs:
            return
        if len(subs) >= self.max_subscriptions:
            raise BrokerRequestError(
                "too_many",
                f"peer {peer_id!r} already has max_subscriptions={self.max_subscriptions} "
                "subscriptions; unsubscribe some (or raise the broker's max_subscriptions)",
            )
        if sender is None:
            self._all.setdefault(msg_type, set()).add(peer_id)
        else:
            key = (msg_type, sender)
            if key not in self._specific:
                self._specific[key] = set()
                self._specific_types[msg_type] += 1
            self._specific[key].add(peer_id)
        subs.add((msg_type, sender))
        self._clear_cache()

    def unsubscribe(self, peer_id: str, msg_type: str, sender: str | None = None) -> bool:
        """Undo one :meth:`subscribe`; False if there was no such subscription."""
        subs = self._peer_subs.get(peer_id)
        if subs is None or (msg_type, sender) not in subs:
            return False
        subs.discard((msg_type, sender))
        self._discard_sub(peer_id, msg_type, sender)
        self._clear_cache()
        return True

    def _discard_sub(self, peer_id: str, msg_type: str, sender: str | None) -> None:
        if sender is None:
            s = self._all.get(msg_type)
            key: object = msg_type
            table: dict[object, set[str]] = self._all  # type: ignore[assignment]
        else:
            s = self._specific.get((msg_type, sender))
            key = (msg_type, sender)
            table = self._specific  # type: ignore[assignment]
        if s is not None:
            s.discard(peer_id)
            if not s:
                del table[key]
                if sender is not None:
                    self._specific_types[msg_type] -= 1
                    if not self._specific_types[msg_type]:
                        del self._specific_types[msg_type]

    def subscribers(self, msg_type: str, sender: str) -> tuple[str, ...]:
        """Peers that get ``msg_type`` published by ``sender`` (cached until a change)."""
        key = (msg_type, sender)
        try:
            return self._cache[key]
        except KeyError:
            pass
        if msg_type not in self._all and msg_type not in self._specific_types:
            # nobody subscribed: no entry, so that invented type names cost nothing
            return ()
        result = self._all.get(msg_type, set()) | self._specific.get(key, set())
        out = tuple(sorted(result))
        cost = len(msg_type) + len(sender) + _CACHE_ENTRY_OVERHEAD
        if (
            len(self._cache) >= self.max_cache_entries
            or self._cache_bytes + cost > self.max_cache_bytes
        ):
            self._cache.clear()
            self._cache_bytes = 0
        self._cache[key] = out
        self._cache_bytes += cost
        return out

    @property
    def cache_entries(self) -> int:
        """Entries in the cache of subscribers per (type, sender)."""
        return len(self._cache)

    @property
    def cache_bytes(self) -> int:
        """What the cache's entries cost (names plus a fixed overhead each), in bytes."""
        return self._cache_bytes

    def _clear_cache(self) -> None:
        self._cache.clear()
        self._cache_bytes = 0
        self.changes += 1

    def subscriptions_of(self, peer_id: str) -> list[str]:
        """Human-readable subscriptions of a peer: ``Type`` or ``Type@sender``."""
        return sorted(t if s is None else f"{t}@{s}" for t, s in self._peer_subs.get(peer_id, ()))

    # --------------------------------------------------------- query handlers
    def register_handler(self, peer_id: str, msg_type: str, policy: str = "exclusive") -> None:
        """Make ``peer_id`` a handler of ``msg_type`` queries.

        A second handler is refused unless every registration uses the same sharing policy
        ``"round_robin"`` or ``"explicit"``; more than ``max_handlers`` types per peer are
        refused with ``too_many``.
        """
        self._require(peer_id)
        handled = self._peer_handlers[peer_id]
        if msg_type not in handled and len(handled) >= self.max_handlers:
            raise BrokerRequestError(
                "too_many",
                f"peer {peer_id!r} already handles max_handlers={self.max_handlers} query "
                "types; unregister some (or raise the broker's max_handlers)",
            )
        if policy not in SHARE_POLICIES:
            raise BrokerRequestError(
                "bad_policy",
                f"unknown sharing policy {policy!r}; use one of {', '.join(SHARE_POLICIES)}",
            )
        hs = self._handlers.get(msg_type)
        if hs is None:
            self._handlers[msg_type] = HandlerSet(policy, [peer_id])
        elif peer_id in hs.peers:
            if hs.policy != policy:
                raise BrokerRequestError(
                    "policy_conflict",
                    f"{peer_id!r} already handles {msg_type!r} with policy {hs.policy!r}",
                )
            return
        elif hs.policy == "exclusive" or policy != hs.policy:
            raise HandlerAlreadyRegistered(
                "already_registered",
                f"query type {msg_type!r} is already handled by {', '.join(hs.peers)} "
                f"(policy {hs.policy!r}); to share it, every handler must register with "
                "policy='round_robin' or policy='explicit'",
            )
        else:
            hs.peers.append(peer_id)
        handled.add(msg_type)
        self.changes += 1

    def unregister_handler(self, peer_id: str, msg_type: str) -> bool:
        handled = self._peer_handlers.get(peer_id)
        if handled is None or msg_type not in handled:
            return False
        handled.discard(msg_type)
        self._discard_handler(peer_id, msg_type)
        self.changes += 1
        return True

    def _discard_handler(self, peer_id: str, msg_type: str) -> None:
        hs = self._handlers.get(msg_type)
        if hs is not None and peer_id in hs.peers:
            hs.peers.remove(peer_id)
            if not hs.peers:
                del self._handlers[msg_type]

    def handlers_of(self, peer_id: str) -> list[str]:
        return sorted(self._peer_handlers.get(peer_id, ()))

    def handler_for(self, msg_type: str) -> str:
        """Pick the peer that answers a ``msg_type`` query."""
        hs = self._handlers.get(msg_type)
        if hs is None:
            raise NoHandlerError(f"no peer handles queries of type {msg_type!r}")
        if len(hs.peers) == 1:
            return hs.peers[0]
        if hs.policy == "explicit":
            raise MultiplePeersAvailable(msg_type, hs.peers)
        peer = hs.peers[hs.next_index % len(hs.peers)]
        hs.next_index = (hs.next_index + 1) % len(hs.peers)
        return peer

    # -------------------------------------------------------- pending queries
    def open_query(
        self,
        asker: str,
        asker_corr: int,
        handler: str,
        msg_type: str,
        deadline: float = math.inf,
    ) -> int:
        """Record a forwarded query; returns the broker-side correlation id.

        Give every query the same delay before its ``deadline`` (or none): :meth:`expire`
        relies on queries opened later not expiring earlier.
        """
        corr = self._next_corr
        self._next_corr += 1
        self._pending[corr] = PendingQuery(corr, asker, asker_corr, handler, msg_type, deadline)
        self._by_asker[(asker, asker_corr)] = corr
        self._asker_pending[asker] += 1
        return corr

    def close_query(self, corr: int, responder: str) -> PendingQuery | None:
        """The handler answered; returns the query, or None for a late/unknown/forged reply."""
        pq = self._pending.get(corr)
        if pq is None or pq.handler != responder:
            return None
        self._forget(corr)
        return pq

    def cancel_query(self, asker: str, asker_corr: int) -> PendingQuery | None:
        """The asker gave up (timeout); a later reply will be dropped."""
        corr = self._by_asker.get((asker, asker_corr))
        if corr is None:
            return None
        pq = self._pending[corr]
        self._forget(corr)
        return pq

    def pending_count(self) -> int:
        return len(self._pending)

    def pending_of(self, asker: str) -> int:
        """Queries ``asker`` has waiting for an answer."""
        return self._asker_pending.get(asker, 0)

    def expire(self, now: float) -> list[PendingQuery]:
        """Forget the queries whose deadline is ``now`` or earlier, and return them (their
        askers must be told; a late answer finds nothing and is dropped)."""
        expired = []
        for pq in self._pending.values():
            if pq.deadline > now:
                break  # opened later, so due later
            expired.append(pq)
        for pq in expired:
            self._forget(pq.corr)
        return expired

    def _forget(self, corr: int) -> None:
        pq = self._pending.pop(corr)
        key = (pq.asker, pq.asker_corr)
        if self._by_asker.get(key) == corr:  # not a newer query reusing the asker's id
            del self._by_asker[key]
        left = self._asker_pending[pq.asker] - 1
        if left:
            self._asker_pending[pq.asker] = left
        else:
            del self._asker_pending[pq.asker]

    def _require(self, peer_id: str) -> None:
        if peer_id not in self._peers:
            raise ValueError(f"unknown peer {peer_id!r}")

    def remove_peers(self, peer_ids: Iterable[str]) -> list[Removal]:
        return [self.remove_peer(p) for p in peer_ids]
