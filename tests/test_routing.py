"""The broker's routing table (sans-IO): subscriptions, query handlers, pending queries."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from peerkit.errors import (
    BrokerRequestError,
    HandlerAlreadyRegistered,
    MultiplePeersAvailable,
    NoHandlerError,
    PeerkitError,
    QueryAnswerUnknown,
)
from peerkit.routing import PendingQuery, Removal, RoutingTable


def table(*peers: str) -> RoutingTable:
    rt = RoutingTable()
    for p in peers:
        rt.add_peer(p)
    return rt


# ----------------------------------------------------------------------------- peers


def test_add_and_remove_peers() -> None:
    rt = table("a", "b")
    assert rt.peers == frozenset({"a", "b"})
    assert rt.has_peer("a")
    with pytest.raises(ValueError, match="'a' is already"):
        rt.add_peer("a")
    assert rt.remove_peer("a") == Removal((), 0)
    assert not rt.has_peer("a")
    assert rt.peers == frozenset({"b"})
    # Removing an unknown peer is a no-op.
    assert rt.remove_peer("a") == Removal((), 0)
    assert rt.remove_peer("zz") == Removal((), 0)


def test_unknown_peer_cannot_subscribe_or_register() -> None:
    rt = table("a")
    with pytest.raises(ValueError, match="unknown peer 'ghost'"):
        rt.subscribe("ghost", "T")
    with pytest.raises(ValueError, match="unknown peer 'ghost'"):
        rt.register_handler("ghost", "Q")
    assert rt.subscribers("T", "a") == ()


# ----------------------------------------------------------------------------- subscriptions


def test_subscribe_all_senders() -> None:
    rt = table("a", "b", "c")
    rt.subscribe("b", "T")
    assert rt.subscribers("T", "a") == ("b",)
    assert rt.subscribers("T", "c") == ("b",)
    assert rt.subscribers("T", "anyone") == ("b",)
    assert rt.subscribers("Other", "a") == ()
    assert rt.subscriptions_of("b") == ["T"]


def test_subscribe_specific_sender() -> None:
    rt = table("a", "b", "c")
    rt.subscribe("c", "T", "a")
    assert rt.subscribers("T", "a") == ("c",)
    assert rt.subscribers("T", "b") == ()
    assert rt.subscribers("U", "a") == ()
    assert rt.subscriptions_of("c") == ["T@a"]


def test_union_of_all_and_specific_without_duplicates() -> None:
    rt = table("a", "b", "c", "d")
    rt.subscribe("b", "T")
    rt.subscribe("b", "T", "a")  # b twice, by two routes
    rt.subscribe("c", "T", "a")
    rt.subscribe("d", "T", "x")
    rt.subscribe("c", "T", "a")  # repeated subscription: still once
    assert rt.subscribers("T", "a") == ("b", "c")
    assert rt.subscribers("T", "x") == ("b", "d")
    assert rt.subscribers("T", "y") == ("b",)
    assert rt.subscriptions_of("b") == ["T", "T@a"]
    assert rt.subscriptions_of("c") == ["T@a"]


def test_subscribers_are_sorted_tuples() -> None:
    rt = table("z", "m", "a")
    for p in ("z", "m", "a"):
        rt.subscribe(p, "T")
    got = rt.subscribers("T", "s")
    assert type(got) is tuple
    assert got == ("a", "m", "z")


def test_unsubscribe() -> None:
    rt = table("a", "b")
    rt.subscribe("b", "T")
    rt.subscribe("b", "T", "a")
    assert rt.unsubscribe("b", "T") is True
    # The specific subscription remains.
    assert rt.subscribers("T", "a") == ("b",)
    assert rt.subscribers("T", "c") == ()
    assert rt.unsubscribe("b", "T") is False
    assert rt.unsubscribe("b", "T", "a") is True
    assert rt.subscribers("T", "a") == ()
    assert rt.subscriptions_of("b") == []
    # Never subscribed / unknown peer.
    assert rt.unsubscribe("a", "T") is False
    assert rt.unsubscribe("ghost", "T") is False
    # The internal tables do not keep empty entries.
    assert rt._all == {}
    assert rt._specific == {}


def test_unsubscribe_specific_does_not_touch_all() -> None:
    rt = table("a", "b")
    rt.subscribe("b", "T")
    assert rt.unsubscribe("b", "T", "a") is False
    assert rt.subscribers("T", "a") == ("b",)


def test_remove_peer_clears_everything() -> None:
    rt = table("a", "b", "c")
    rt.subscribe("a", "T")
    rt.subscribe("a", "U", "b")
    rt.subscribe("c", "T")
    rt.register_handler("a", "Q")
    rt.register_handler("a", "R", "round_robin")
    rt.register_handler("c", "R", "round_robin")
    assert rt.subscribers("T", "b") == ("a", "c")
    rt.remove_peer("a")
    assert rt.subscribers("T", "b") == ("c",)
    assert rt.subscribers("U", "b") == ()
    assert rt.subscriptions_of("a") == []
    assert rt.handlers_of("a") == []
    with pytest.raises(NoHandlerError):
        rt.handler_for("Q")
    assert rt.handler_for("R") == "c"
    assert "a" not in rt._peer_subs
    assert "a" not in rt._peer_handlers
    # Back under the same id: a fresh start.
    rt.add_peer("a")
    assert rt.subscriptions_of("a") == []
    assert rt.subscribers("U", "b") == ()
    rt.register_handler("a", "Q")  # exclusive again, nobody else has it
    assert rt.handler_for("Q") == "a"


def test_subscribers_cache_is_invalidated_by_every_change() -> None:
    rt = table("a", "b", "c")
    assert rt.subscribers("T", "a") == ()
    rt.subscribe("b", "T")
    assert rt.subscribers("T", "a") == ("b",)
    rt.subscribe("c", "T", "a")
    assert rt.subscribers("T", "a") == ("b", "c")
    assert rt.subscribers("T", "a") is rt.subscribers("T", "a")  # served from the cache
    rt.unsubscribe("b", "T")
    assert rt.subscribers("T", "a") == ("c",)
    rt.remove_peer("c")
    assert rt.subscribers("T", "a") == ()
    rt.subscribe("a", "T")
    assert rt.subscribers("T", "a") == ("a",)


# ----------------------------------------------------------------------------- handlers


def test_exclusive_handler_refuses_a_second_peer() -> None:
    rt = table("a", "b")
    rt.register_handler("a", "Q")
    with pytest.raises(HandlerAlreadyRegistered) as info:
        rt.register_handler("b", "Q")
    err = info.value
    assert isinstance(err, BrokerRequestError)
    assert isinstance(err, PeerkitError)
    assert err.code == "already_registered"
    assert "'Q'" in str(err)
    assert "a" in str(err)
    assert "policy='round_robin'" in str(err)
    assert rt.handler_for("Q") == "a"
    assert rt.handlers_of("b") == []


def test_same_peer_registering_again_is_idempotent() -> None:
    rt = table("a")
    rt.register_handler("a", "Q")
    rt.register_handler("a", "Q")
    assert rt.handlers_of("a") == ["Q"]
    assert rt._handlers["Q"].peers == ["a"]
    with pytest.raises(BrokerRequestError) as info:
        rt.register_handler("a", "Q", "round_robin")
    assert info.value.code == "policy_conflict"


def test_round_robin_alternates() -> None:
    rt = table("a", "b", "c")
    rt.register_handler("a", "Q", "round_robin")
    rt.register_handler("b", "Q", "round_robin")
    assert [rt.handler_for("Q") for _ in range(4)] == ["a", "b", "a", "b"]
    rt.register_handler("c", "Q", "round_robin")
    picks = [rt.handler_for("Q") for _ in range(6)]
    assert sorted(picks) == ["a", "a", "b", "b", "c", "c"]
    assert all(picks[i] != picks[i + 1] for i in range(5))
    rt.unregister_handler("a", "Q")
    picks = [rt.handler_for("Q") for _ in range(4)]
    assert sorted(picks) == ["b", "b", "c", "c"]
    rt.remove_peer("b")
    assert [rt.handler_for("Q") for _ in range(3)] == ["c", "c", "c"]


def test_explicit_policy_lists_the_peers() -> None:
    rt = table("a", "b")
    rt.register_handler("a", "Q", "explicit")
    assert rt.handler_for("Q") == "a"  # only one: no ambiguity
    rt.register_handler("b", "Q", "explicit")
    with pytest.raises(MultiplePeersAvailable) as info:
        rt.handler_for("Q")
    err = info.value
    assert isinstance(err, QueryAnswerUnknown)
    assert err.peers == ("a", "b")
    assert "a, b" in str(err)
    assert "ask_peer" in str(err)
    assert "'Q'" in str(err)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("exclusive", "round_robin"),
        ("exclusive", "explicit"),
        ("exclusive", "exclusive"),
        ("round_robin", "explicit"),
        ("round_robin", "exclusive"),
        ("explicit", "round_robin"),
        ("explicit", "exclusive"),
    ],
)
def test_mixed_policies_refused(first: str, second: str) -> None:
    rt = table("a", "b")
    rt.register_handler("a", "Q", first)
    with pytest.raises(HandlerAlreadyRegistered, match=f"policy {first!r}"):
        rt.register_handler("b", "Q", second)
    assert rt._handlers["Q"].peers == ["a"]
    assert rt.handlers_of("b") == []


@pytest.mark.parametrize("policy", ["shared", "", "ROUND_ROBIN", "roundrobin"])
def test_bad_policy_refused(policy: str) -> None:
    rt = table("a")
    with pytest.raises(BrokerRequestError) as info:
        rt.register_handler("a", "Q", policy)
    assert info.value.code == "bad_policy"
    assert "exclusive, round_robin, explicit" in str(info.value)
    assert rt.handlers_of("a") == []
    with pytest.raises(NoHandlerError):
        rt.handler_for("Q")


def test_handler_for_with_no_handler() -> None:
    rt = table("a")
    with pytest.raises(NoHandlerError, match="'Q'") as info:
        rt.handler_for("Q")
    assert isinstance(info.value, QueryAnswerUnknown)


def test_unregister_handler() -> None:
    rt = table("a", "b")
    rt.register_handler("a", "Q")
    assert rt.unregister_handler("a", "Q") is True
    assert rt.unregister_handler("a", "Q") is False
    assert rt.unregister_handler("ghost", "Q") is False
    with pytest.raises(NoHandlerError):
        rt.handler_for("Q")
    rt.register_handler("b", "Q")  # free again
    assert rt.handler_for("Q") == "b"
    assert rt.unregister_handler("a", "Q") is False  # not a's to remove
    assert rt.handler_for("Q") == "b"


# ----------------------------------------------------------------------------- queries


def test_open_and_close_query() -> None:
    rt = table("asker", "h")
    c1 = rt.open_query("asker", 1, "h", "Q")
    c2 = rt.open_query("asker", 2, "h", "Q")
    assert c1 != c2
    assert rt.pending_count() == 2
    pq = rt.close_query(c1, "h")
    assert pq == PendingQuery(c1, "asker", 1, "h", "Q")
    assert rt.pending_count() == 1
    # A second reply to the same query is dropped.
    assert rt.close_query(c1, "h") is None
    assert rt.close_query(9999, "h") is None
    assert rt.close_query(c2, "h") == PendingQuery(c2, "asker", 2, "h", "Q")
    assert rt.pending_count() == 0


def test_correlation_ids_are_unique() -> None:
    rt = table("a", "h")
    corrs = [rt.open_query("a", i % 3, "h", "Q") for i in range(50)]
    assert len(set(corrs)) == 50
    assert all(c > 0 for c in corrs)


def test_forged_responder_returns_none() -> None:
    rt = table("asker", "h", "mallory")
    corr = rt.open_query("asker", 7, "h", "Q")
    assert rt.close_query(corr, "mallory") is None
    assert rt.close_query(corr, "asker") is None
    # The real handler can still answer.
    assert rt.pending_count() == 1
    pq = rt.close_query(corr, "h")
    assert pq is not None
    assert (pq.asker, pq.asker_corr) == ("asker", 7)


def test_late_reply_after_cancel_returns_none() -> None:
    rt = table("asker", "h")
    corr = rt.open_query("asker", 7, "h", "Q")
    pq = rt.cancel_query("asker", 7)
    assert pq == PendingQuery(corr, "asker", 7, "h", "Q")
    assert rt.pending_count() == 0
    assert rt.close_query(corr, "h") is None
    assert rt.cancel_query("asker", 7) is None
    assert rt.cancel_query("someone", 7) is None


def test_cancel_only_cancels_the_askers_own_query() -> None:
    rt = table("a", "b", "h")
    ca = rt.open_query("a", 1, "h", "Q")
    cb = rt.open_query("b", 1, "h", "Q")
    assert rt.cancel_query("a", 1) is not None
    assert rt.close_query(ca, "h") is None
    assert rt.close_query(cb, "h") is not None


def test_reused_asker_corr_keeps_the_newer_query_cancellable() -> None:
    rt = table("a", "h1", "h2")
    old = rt.open_query("a", 1, "h1", "Q")
    new = rt.open_query("a", 1, "h2", "Q")
    # The old query finishing must not forget the newer one's asker id.
    assert rt.close_query(old, "h1") is not None
    pq = rt.cancel_query("a", 1)
    assert pq is not None
    assert pq.corr == new
    assert rt.close_query(new, "h2") is None


def test_remove_handler_returns_orphaned_queries() -> None:
    rt = table("a", "b", "h", "other")
    c1 = rt.open_query("a", 1, "h", "Q")
    c2 = rt.open_query("b", 5, "h", "R")
    c3 = rt.open_query("a", 2, "other", "Q")
    removal = rt.remove_peer("h")
    assert set(removal.orphaned_queries) == {
        PendingQuery(c1, "a", 1, "h", "Q"),
        PendingQuery(c2, "b", 5, "h", "R"),
    }
    assert len(removal.orphaned_queries) == 2
    assert removal.abandoned_queries == 0
    assert rt.pending_count() == 1
    # The orphaned queries are gone; the other handler's is untouched.
    assert rt.close_query(c1, "h") is None
    assert rt.cancel_query("a", 1) is None
    assert rt.close_query(c3, "other") is not None


def test_remove_asker_drops_its_pending_queries() -> None:
    rt = table("a", "b", "h")
    c1 = rt.open_query("a", 1, "h", "Q")
    c2 = rt.open_query("a", 2, "h", "Q")
    c3 = rt.open_query("b", 1, "h", "Q")
    removal = rt.remove_peer("a")
    assert removal.orphaned_queries == ()
    assert removal.abandoned_queries == 2
    assert rt.pending_count() == 1
    # Late replies to the gone asker are dropped quietly.
    assert rt.close_query(c1, "h") is None
    assert rt.close_query(c2, "h") is None
    assert rt.close_query(c3, "h") is not None


def test_remove_peers_many() -> None:
    rt = table("a", "b", "h")
    rt.open_query("a", 1, "h", "Q")
    removals = rt.remove_peers(["a", "h", "nobody"])
    assert [r.abandoned_queries for r in removals] == [1, 0, 0]
    assert [len(r.orphaned_queries) for r in removals] == [0, 0, 0]
    assert rt.peers == frozenset({"b"})


# ----------------------------------------------------------------------------- model check

# Small alphabets, so that random sequences hit the same subscription often.
PEERS = ("a", "b", "c")
TYPES = ("T", "U")
SENDERS = ("a", "x")


class SubscriptionModel(RuleBasedStateMachine):
    """Random subscribe/unsubscribe/remove_peer/add_peer against a set of triples."""

    def __init__(self) -> None:
        super().__init__()
        self.rt = RoutingTable()
        self.present: set[str] = set()
        self.subs: set[tuple[str, str, str | None]] = set()

    @initialize()
    def start_with_two_peers(self) -> None:
        for peer in PEERS[:2]:
            self.rt.add_peer(peer)
            self.present.add(peer)

    @precondition(lambda self: len(self.present) < len(PEERS))
    @rule(peer=st.sampled_from(PEERS))
    def add_peer(self, peer: str) -> None:
        if peer in self.present:
            with pytest.raises(ValueError):
                self.rt.add_peer(peer)
        else:
            self.rt.add_peer(peer)
            self.present.add(peer)

    @rule(
        peer=st.sampled_from(PEERS),
        msg_type=st.sampled_from(TYPES),
        sender=st.none() | st.sampled_from(SENDERS),
    )
    def subscribe(self, peer: str, msg_type: str, sender: str | None) -> None:
        if peer not in self.present:
            with pytest.raises(ValueError):
                self.rt.subscribe(peer, msg_type, sender)
            return
        self.rt.subscribe(peer, msg_type, sender)
        self.subs.add((peer, msg_type, sender))

    @rule(
        peer=st.sampled_from(PEERS),
        msg_type=st.sampled_from(TYPES),
        sender=st.none() | st.sampled_from(SENDERS),
    )
    def unsubscribe(self, peer: str, msg_type: str, sender: str | None) -> None:
        expected = (peer, msg_type, sender) in self.subs
        assert self.rt.unsubscribe(peer, msg_type, sender) is expected
        self.subs.discard((peer, msg_type, sender))

    @rule(peer=st.sampled_from(PEERS))
    def remove_peer(self, peer: str) -> None:
        self.rt.remove_peer(peer)
        self.present.discard(peer)
        self.subs = {s for s in self.subs if s[0] != peer}

    @rule(msg_type=st.sampled_from(TYPES), sender=st.sampled_from(SENDERS))
    def query_subscribers(self, msg_type: str, sender: str) -> None:
        # Warms the cache between changes.
        self.rt.subscribers(msg_type, sender)

    @invariant()
    def subscribers_match_the_model(self) -> None:
        for msg_type in TYPES:
            for sender in (*SENDERS, "y"):
                expected = tuple(
                    sorted(
                        {p for p, t, s in self.subs if t == msg_type and (s is None or s == sender)}
                    )
                )
                assert self.rt.subscribers(msg_type, sender) == expected

    @invariant()
    def subscriptions_of_match_the_model(self) -> None:
        for peer in PEERS:
            expected = sorted(t if s is None else f"{t}@{s}" for p, t, s in self.subs if p == peer)
            assert self.rt.subscriptions_of(peer) == expected
        assert self.rt.peers == frozenset(self.present)


SubscriptionModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None
)
TestSubscriptionModel = SubscriptionModel.TestCase
