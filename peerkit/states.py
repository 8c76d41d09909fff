"""Peer lifecycle states and the transition table (sans-IO).

``initializing → connected → ready ⇄ running → shutting_down → finished``; shutting down is
reachable from every state before it. Staying in the same state is always allowed.

A peer class may add states of its own (:class:`CustomState`) and the moves to and from them in
its ``_VALID_STATES_TRANSITIONS_``. Each custom state *counts as* one of the four live base
states for the predicates (``is_connected``, ``is_ready``, ...), keeps the moves of the state it
counts as, and can always shut down. Everything here is checked once, when the class is defined
(:func:`check_table`); every later change of state is checked against the table.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, TypeAlias

import attrs

from .errors import InvalidStateTransition, PeerkitError

__all__ = [
    "VALID_TRANSITIONS",
    "CustomState",
    "InvalidStateDeclaration",
    "PeerState",
    "State",
    "StateMachine",
    "base_state",
    "check_table",
    "check_transition",
    "is_connected",
    "is_finished",
    "is_ready",
    "is_running",
    "is_shutting_down",
    "is_valid_transition",
]


class PeerState(enum.Enum):
    """The six states of a peer's life."""

    initializing = "initializing"
    connected = "connected"
    ready = "ready"
    running = "running"
    shutting_down = "shutting_down"
    finished = "finished"

    def __str__(self) -> str:
        return self.value


S = PeerState

#: The base states a custom state may count as: shutting down belongs to the framework.
LIVE_STATES = (S.initializing, S.connected, S.ready, S.running)


class InvalidStateDeclaration(PeerkitError, TypeError):
    """A :class:`CustomState` or a ``_VALID_STATES_TRANSITIONS_`` table is not valid.

    Raised when the state or the class is defined, never later.
    """


def _check_name(_inst: object, _attr: object, name: Any) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise InvalidStateDeclaration(
            f"a custom state's name must be a Python identifier such as 'calibrating' "
            f"(it is shown by the broker and `peerkit peers`), got {name!r}"
        )
    if name in S.__members__:
        raise InvalidStateDeclaration(
            f"{name!r} is a base state; use PeerState.{name} instead of a CustomState"
        )


def _check_counts_as(_inst: object, _attr: object, counts_as: Any) -> None:
    if counts_as not in LIVE_STATES:
        raise InvalidStateDeclaration(
            f"a custom state counts as one of the live base states "
            f"({', '.join(f'PeerState.{s.name}' for s in LIVE_STATES)}), got {counts_as!r}; "
            "shutting down belongs to the framework"
        )


@attrs.frozen(repr=False)
class CustomState:
    """A state a peer class adds to the six :class:`PeerState` members.

    ``counts_as`` is the live base state it behaves as for the predicates and for the
    framework: ``CustomState("calibrating", counts_as=PeerState.ready)`` makes ``is_ready``
    and ``is_connected`` true while calibrating, and the framework may start the peer from
    it, so the table must allow ``calibrating → running``. The state reports itself by
    ``name``: ``str(state)``, ``state.value`` and ``state.name`` are all the name.
    """

    name: str = attrs.field(validator=_check_name)
    counts_as: PeerState = attrs.field(kw_only=True, validator=_check_counts_as)

    @property
    def value(self) -> str:
        """The name (as :attr:`PeerState.value`), which is what the peer reports."""
        return self.name

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"CustomState({self.name!r}, counts_as=PeerState.{self.counts_as.name})"


#: A peer's state: a base state or one its class declared.
State: TypeAlias = PeerState | CustomState

#: Valid moves; the identity move is always allowed in addition.
VALID_TRANSITIONS: dict[State, tuple[State, ...]] = {
    S.initializing: (S.connected, S.shutting_down),
    S.connected: (S.ready, S.shutting_down),
    S.ready: (S.running, S.shutting_down),
    S.running: (S.ready, S.shutting_down),
    S.shutting_down: (S.finished,),
    S.finished: (),
}


def base_state(state: State) -> PeerState:
    """The base state ``state`` counts as (itself for a :class:`PeerState`)."""
    return state if isinstance(state, PeerState) else state.counts_as


def is_valid_transition(
    old: State, new: State, table: Mapping[State, tuple[State, ...]] = VALID_TRANSITIONS
) -> bool:
    """Whether ``old → new`` is allowed by ``table`` (identity included)."""
    return old == new or new in table.get(old, ())


def check_transition(
    old: object, new: object, table: Mapping[State, tuple[State, ...]] = VALID_TRANSITIONS
) -> State:
    """Return ``new`` if ``old → new`` is valid in ``table``, else raise
    :class:`InvalidStateTransition`.

    Works under ``python -O``: the check is an explicit ``raise``, not an ``assert``.
    """
    if not isinstance(new, PeerState | CustomState) or not isinstance(old, PeerState | CustomState):
        raise InvalidStateTransition(old, new)
    if not is_valid_transition(old, new, table):
        raise InvalidStateTransition(old, new)
    return new


def is_connected(state: State) -> bool:
    """connected, ready or running (or a custom state counting as one of them)."""
    return base_state(state) in (S.connected, S.ready, S.running)


def is_ready(state: State) -> bool:
    """ready or running (or a custom state counting as one of them)."""
    return base_state(state) in (S.ready, S.running)


def is_running(state: State) -> bool:
    """running (or a custom state counting as running)."""
    return base_state(state) is S.running


def is_shutting_down(state: State) -> bool:
    """shutting_down or finished."""
    return state is S.shutting_down or state is S.finished


def is_finished(state: State) -> bool:
    """finished."""
    return state is S.finished


# ------------------------------------------------------------------ checking a declared table


def _show(state: object) -> str:
    if isinstance(state, PeerState):
        return f"PeerState.{state.name}"
    return repr(state)


def check_table(table: object, owner: str = "the class") -> None:
    """Refuse a ``_VALID_STATES_TRANSITIONS_`` that the lifecycle cannot run on.

    The table must be a dict of tuples that keeps every base state and every base move (and
    adds no move between two base states), gives each :class:`CustomState` it mentions a row
    of its own, lets each custom state shut down and make the moves of the base state it
    counts as, and reaches each custom state from ``initializing``. Raises
    :class:`InvalidStateDeclaration` naming the fix.
    """
    start = (
        f"start {owner}'s table from the base one: "
        "{**Peer._VALID_STATES_TRANSITIONS_, CUSTOM: (...), ...}"
    )
    if not isinstance(table, dict):
        raise InvalidStateDeclaration(
            f"{owner}._VALID_STATES_TRANSITIONS_ must be a dict of tuples, "
            f"not {type(table).__name__}; {start}"
        )
    names: dict[str, CustomState] = {}
    for key, targets in table.items():
        if not isinstance(key, PeerState | CustomState):
            raise InvalidStateDeclaration(
                f"{owner}._VALID_STATES_TRANSITIONS_ has the key {key!r}, which is not a "
                "state: use PeerState members and CustomState('name', counts_as=...) values"
            )
        if not isinstance(targets, tuple):
            raise InvalidStateDeclaration(
                f"{owner}._VALID_STATES_TRANSITIONS_[{_show(key)}] must be a tuple of states, "
                f"not {type(targets).__name__}"
            )
        for target in (key, *targets):
            if not isinstance(target, PeerState | CustomState):
                raise InvalidStateDeclaration(
                    f"{owner}._VALID_STATES_TRANSITIONS_[{_show(key)}] contains {target!r}, "
                    "which is not a state: use PeerState members and "
                    "CustomState('name', counts_as=...) values"
                )
            if isinstance(target, CustomState):
                other = names.setdefault(target.name, target)
                if other != target:
                    raise InvalidStateDeclaration(
                        f"{owner} declares two custom states named {target.name!r} "
                        f"({other!r} and {target!r}); define each state once and reuse it"
                    )
            if isinstance(target, CustomState) and target not in table:
                raise InvalidStateDeclaration(
                    f"{owner}._VALID_STATES_TRANSITIONS_ moves to {target!r} but has no row "
                    f"for it (an unknown state); add {target.name.upper()}: (..., "
                    "PeerState.shutting_down) to declare its moves"
                )

    for base, base_targets in VALID_TRANSITIONS.items():
        assert isinstance(base, PeerState)
        if base not in table:
            raise InvalidStateDeclaration(
                f"{owner}._VALID_STATES_TRANSITIONS_ has no row for {_show(base)}; {start}"
            )
        have = table[base]
        missing = [t for t in base_targets if t not in have]
        added = [t for t in have if isinstance(t, PeerState) and t not in base_targets]
        if missing or added:
            what = (
                f"drops the base move {_show(base)} -> {_show(missing[0])}"
                if missing
                else f"adds the move {_show(base)} -> {_show(added[0])} between two base states"
            )
            raise InvalidStateDeclaration(
                f"{owner}._VALID_STATES_TRANSITIONS_ {what}; the moves between base states "
                f"are fixed, only moves to and from custom states can be added: {start}"
            )
        if base in (S.shutting_down, S.finished) and len(have) != len(base_targets):
            raise InvalidStateDeclaration(
                f"{owner}._VALID_STATES_TRANSITIONS_ leaves {_show(base)} for a custom state; "
                "once shutdown has begun the only move is to finished"
            )

    for state, targets in table.items():
        if not isinstance(state, CustomState):
            continue
        if S.shutting_down not in targets:
            raise InvalidStateDeclaration(
                f"custom state {state.name!r} of {owner} cannot shut down: a peer may be "
                "shut down (or fail) in any state; add PeerState.shutting_down to its moves"
            )
        if S.finished in targets:
            raise InvalidStateDeclaration(
                f"custom state {state.name!r} of {owner} moves to PeerState.finished; only "
                "shutting_down does: remove it (shutting_down leads there)"
            )
        for needed in VALID_TRANSITIONS[state.counts_as]:
            if needed not in targets:
                raise InvalidStateDeclaration(
                    f"custom state {state.name!r} of {owner} counts as "
                    f"{_show(state.counts_as)}, so the framework may move it to "
                    f"{_show(needed)} as it does from {state.counts_as.name}; add "
                    f"{_show(needed)} to its moves, or make it count as another state"
                )

    reached: set[State] = {S.initializing}
    todo: list[State] = [S.initializing]
    while todo:
        for target in table[todo.pop()]:
            if target not in reached:
                reached.add(target)
                todo.append(target)
    for state in table:
        if state not in reached:
            raise InvalidStateDeclaration(
                f"custom state {_show(state)} of {owner} is unreachable: no move leads to it "
                "from initializing; add it to the moves of the state it is entered from"
            )


class StateMachine:
    """Holds the peer's state and validates every assignment.

    The peer mixes this in; its state is private (``_state``) and checked against
    ``_VALID_STATES_TRANSITIONS_`` whenever it is set. A subclass that declares its own
    table has it checked by :func:`check_table` when the class is defined.
    """

    _VALID_STATES_TRANSITIONS_: dict[State, tuple[State, ...]] = VALID_TRANSITIONS

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "_state" in vars(cls):
            raise TypeError(
                f"{cls.__qualname__} defines `_state`, which is the peer lifecycle's own "
                "attribute; give yours another name"
            )
        if "_VALID_STATES_TRANSITIONS_" in vars(cls):
            check_table(cls._VALID_STATES_TRANSITIONS_, cls.__qualname__)

    def __init__(self) -> None:
        self.__state: State = PeerState.initializing
        # the base state the current one counts as: what the predicates look at
        self.__base = PeerState.initializing

    @property
    def _state(self) -> State:
        return self.__state

    @_state.setter
    def _state(self, new: State) -> None:
        old = self.__state
        if not isinstance(new, PeerState | CustomState):
            raise InvalidStateTransition(
                old,
                f"{new!r} (not a PeerState or CustomState: `_state` is the lifecycle's own "
                "attribute; a subclass must name its attributes otherwise)",
            )
        if not (old is new or new in self._VALID_STATES_TRANSITIONS_[old]):
            raise InvalidStateTransition(old, new)
        self.__state = new
        self.__base = new if isinstance(new, PeerState) else new.counts_as
        if old is not new:
            self._state_changed(old, new)

    # `Any`, not `State`: subclasses written before custom states existed override it with
    # `PeerState` parameters; the values are a `State` (PeerState or CustomState, both with
    # `.value` and `str()` giving the name).
    def _state_changed(self, old: Any, new: Any) -> None:
        """Called after every real change; the trio layer wakes its waiters here."""

    @property
    def is_initializing(self) -> bool:
        return self.__base is S.initializing

    # identity tests, not set membership: Enum.__hash__ is Python code and these run for
    # every message sent and received

    @property
    def is_connected(self) -> bool:
        s = self.__base
        return s is S.running or s is S.ready or s is S.connected

    @property
    def is_ready(self) -> bool:
        s = self.__base
        return s is S.running or s is S.ready

    @property
    def is_running(self) -> bool:
        return self.__base is S.running

    @property
    def is_shutting_down(self) -> bool:
        s = self.__base
        return s is S.shutting_down or s is S.finished

    @property
    def is_finished(self) -> bool:
        return self.__base is S.finished

    @property
    def state(self) -> State:
        """The current state, read-only (for display; decide with the predicates)."""
        return self.__state
