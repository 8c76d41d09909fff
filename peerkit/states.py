"""Peer lifecycle states and the transition table (sans-IO).

``initializing → connected → ready ⇄ running → shutting_down → finished``; shutting down is
reachable from every state before it. Staying in the same state is always allowed.
"""

from __future__ import annotations

import enum

from .errors import InvalidStateTransition


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

#: Valid moves; the identity move is always allowed in addition.
VALID_TRANSITIONS: dict[PeerState, tuple[PeerState, ...]] = {
    S.initializing: (S.connected, S.shutting_down),
    S.connected: (S.ready, S.shutting_down),
    S.ready: (S.running, S.shutting_down),
    S.running: (S.ready, S.shutting_down),
    S.shutting_down: (S.finished,),
    S.finished: (),
}

_CONNECTED = frozenset({S.connected, S.ready, S.running})
_READY = frozenset({S.ready, S.running})
_SHUTTING_DOWN = frozenset({S.shutting_down, S.finished})


def is_valid_transition(old: PeerState, new: PeerState) -> bool:
    """Whether ``old → new`` is allowed (identity included)."""
    return old is new or new in VALID_TRANSITIONS[old]


def check_transition(old: object, new: object) -> PeerState:
    """Return ``new`` if ``old → new`` is valid, else raise :class:`InvalidStateTransition`.

    Works under ``python -O``: the check is an explicit ``raise``, not an ``assert``.
    """
    if not isinstance(new, PeerState) or not isinstance(old, PeerState):
        raise InvalidStateTransition(old, new)
    if not is_valid_transition(old, new):
        raise InvalidStateTransition(old, new)
    return new


def is_connected(state: PeerState) -> bool:
    """connected, ready or running."""
    return state in _CONNECTED


def is_ready(state: PeerState) -> bool:
    """ready or running."""
    return state in _READY


def is_running(state: PeerState) -> bool:
    """running."""
    return state is S.running


def is_shutting_down(state: PeerState) -> bool:
    """shutting_down or finished."""
    return state in _SHUTTING_DOWN


def is_finished(state: PeerState) -> bool:
    """finished."""
    return state is S.finished


class StateMachine:
    """Holds a :class:`PeerState` and validates every assignment.

    The peer mixes this in; its state is private (``_state``) and checked against
    ``_VALID_STATES_TRANSITIONS_`` whenever it is set.
    """

    _VALID_STATES_TRANSITIONS_: dict[PeerState, tuple[PeerState, ...]] = VALID_TRANSITIONS

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "_state" in vars(cls):
            raise TypeError(
                f"{cls.__qualname__} defines `_state`, which is the peer lifecycle's own "
                "attribute; give yours another name"
            )

    def __init__(self) -> None:
        self.__state = PeerState.initializing

    @property
    def _state(self) -> PeerState:
        return self.__state

    @_state.setter
    def _state(self, new: PeerState) -> None:
        old = self.__state
        if not isinstance(new, PeerState):
            raise InvalidStateTransition(
                old,
                f"{new!r} (not a PeerState: `_state` is the lifecycle's own attribute; "
                "a subclass must name its attributes otherwise)",
            )
        if not (old is new or new in self._VALID_STATES_TRANSITIONS_[old]):
            raise InvalidStateTransition(old, new)
        self.__state = new
        if old is not new:
            self._state_changed(old, new)

    def _state_changed(self, old: PeerState, new: PeerState) -> None:
        """Called after every real change; the trio layer wakes its waiters here."""

    @property
    def is_initializing(self) -> bool:
        return self.__state is S.initializing

    # identity tests, not set membership: Enum.__hash__ is Python code and these run for
    # every message sent and received

    @property
    def is_connected(self) -> bool:
        s = self.__state
        return s is S.running or s is S.ready or s is S.connected

    @property
    def is_ready(self) -> bool:
        s = self.__state
        return s is S.running or s is S.ready

    @property
    def is_running(self) -> bool:
        return self.__state is S.running

    @property
    def is_shutting_down(self) -> bool:
        s = self.__state
        return s is S.shutting_down or s is S.finished

    @property
    def is_finished(self) -> bool:
        return self.__state is S.finished

    @property
    def state(self) -> PeerState:
        """The current state, read-only (for display; decide with the predicates)."""
        return self.__state
