"""The peer lifecycle table (DESIGN.md section 5), tested pair by pair without any I/O."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap

import pytest

import peerkit
from peerkit import states
from peerkit.errors import InvalidStateTransition, PeerkitError
from peerkit.states import PeerState, StateMachine

NAMES = ["initializing", "connected", "ready", "running", "shutting_down", "finished"]

# DESIGN.md section 5, written out by hand (identity moves are allowed in addition).
EXPECTED_TRANSITIONS: dict[str, set[str]] = {
    "initializing": {"connected", "shutting_down"},
    "connected": {"ready", "shutting_down"},
    "ready": {"running", "shutting_down"},
    "running": {"ready", "shutting_down"},
    "shutting_down": {"finished"},
    "finished": set(),
}

# The cumulative predicates of DESIGN.md section 4, state by state.
EXPECTED_PREDICATES: dict[str, dict[str, bool]] = {
    #                 connected  ready  running  shutting_down  finished
    "initializing": dict(c=False, r=False, run=False, sd=False, fin=False),
    "connected": dict(c=True, r=False, run=False, sd=False, fin=False),
    "ready": dict(c=True, r=True, run=False, sd=False, fin=False),
    "running": dict(c=True, r=True, run=True, sd=False, fin=False),
    "shutting_down": dict(c=False, r=False, run=False, sd=True, fin=False),
    "finished": dict(c=False, r=False, run=False, sd=True, fin=True),
}

# A valid walk from initializing to each state, used to put a machine in that state.
PATH_TO: dict[str, list[str]] = {
    "initializing": [],
    "connected": ["connected"],
    "ready": ["connected", "ready"],
    "running": ["connected", "ready", "running"],
    "shutting_down": ["shutting_down"],
    "finished": ["shutting_down", "finished"],
}

ALL_PAIRS = list(itertools.product(NAMES, NAMES))
VALID_PAIRS = [(a, b) for a, b in ALL_PAIRS if a == b or b in EXPECTED_TRANSITIONS[a]]
INVALID_PAIRS = [(a, b) for a, b in ALL_PAIRS if (a, b) not in VALID_PAIRS]


class RecordingMachine(StateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.changes: list[tuple[PeerState, PeerState]] = []

    def _state_changed(self, old: PeerState, new: PeerState) -> None:
        self.changes.append((old, new))


def machine_in(name: str) -> RecordingMachine:
    sm = RecordingMachine()
    for step in PATH_TO[name]:
        sm._state = PeerState[step]
    assert sm._state is PeerState[name]
    sm.changes.clear()
    return sm


def test_the_pair_lists_cover_all_36_pairs() -> None:
    assert len(ALL_PAIRS) == 36
    # 6 identities + 9 moves from the table
    assert len(VALID_PAIRS) == 15
    assert len(INVALID_PAIRS) == 21


def test_exactly_six_states_with_their_names() -> None:
    assert [s.name for s in PeerState] == NAMES
    assert [str(s) for s in PeerState] == NAMES
    assert peerkit.PeerState is PeerState


def test_initial_state_is_initializing() -> None:
    sm = StateMachine()
    assert sm._state is PeerState.initializing
    assert sm.state is PeerState.initializing
    assert sm.is_initializing


@pytest.mark.parametrize(("old", "new"), VALID_PAIRS)
def test_valid_transition(old: str, new: str) -> None:
    sm = machine_in(old)
    sm._state = PeerState[new]
    assert sm._state is PeerState[new]
    assert sm.state is PeerState[new]
    # The change hook fires for real changes only.
    expected_changes = [] if old == new else [(PeerState[old], PeerState[new])]
    assert sm.changes == expected_changes
    assert states.is_valid_transition(PeerState[old], PeerState[new])
    assert states.check_transition(PeerState[old], PeerState[new]) is PeerState[new]


@pytest.mark.parametrize(("old", "new"), INVALID_PAIRS)
def test_invalid_transition(old: str, new: str) -> None:
    sm = machine_in(old)
    with pytest.raises(InvalidStateTransition) as info:
        sm._state = PeerState[new]
    err = info.value
    assert isinstance(err, AssertionError)
    assert isinstance(err, PeerkitError)
    assert err.old is PeerState[old]
    assert err.new is PeerState[new]
    assert f"{old} -> {new}" in str(err)
    # Nothing changed.
    assert sm._state is PeerState[old]
    assert sm.changes == []
    assert not states.is_valid_transition(PeerState[old], PeerState[new])
    with pytest.raises(InvalidStateTransition):
        states.check_transition(PeerState[old], PeerState[new])


@pytest.mark.parametrize("name", NAMES)
def test_identity_always_allowed(name: str) -> None:
    sm = machine_in(name)
    for _ in range(3):
        sm._state = PeerState[name]
    assert sm._state is PeerState[name]
    assert sm.changes == []


def test_invalid_transition_is_an_assertion_error_and_a_peerkit_error() -> None:
    assert issubclass(InvalidStateTransition, AssertionError)
    assert issubclass(InvalidStateTransition, PeerkitError)
    assert peerkit.InvalidStateTransition is InvalidStateTransition
    sm = StateMachine()
    with pytest.raises(AssertionError):
        sm._state = PeerState.running
    with pytest.raises(PeerkitError):
        sm._state = PeerState.finished


def test_invalid_transition_raises_under_python_O() -> None:
    code = textwrap.dedent(
        """
        import sys
        from peerkit.states import PeerState, StateMachine, check_transition
        assert False, "asserts must be stripped under -O"
        print("optimize", sys.flags.optimize)
        sm = StateMachine()
        try:
            sm._state = PeerState.finished
        except AssertionError as exc:
            print("raised", type(exc).__name__)
        else:
            print("not raised")
        print("state", sm._state)
        try:
            check_transition(PeerState.finished, PeerState.running)
        except AssertionError:
            print("check raised")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == [
        "optimize 1",
        "raised InvalidStateTransition",
        "state initializing",
        "check raised",
    ]


def test_table_attribute_is_a_dict_of_tuples_matching_design() -> None:
    table = StateMachine._VALID_STATES_TRANSITIONS_
    assert type(table) is dict
    assert set(table) == set(PeerState)
    for old, targets in table.items():
        assert type(targets) is tuple
        assert all(isinstance(t, PeerState) for t in targets)
        assert len(set(targets)) == len(targets)
        assert {t.name for t in targets} == EXPECTED_TRANSITIONS[old.name]
    # The instance sees the same table.
    assert StateMachine()._VALID_STATES_TRANSITIONS_ is table


def test_state_is_a_property_and_validated_on_every_assignment() -> None:
    assert isinstance(StateMachine.__dict__["_state"], property)
    assert StateMachine.__dict__["_state"].fset is not None
    # `state` is the read-only public view.
    sm = StateMachine()
    with pytest.raises(AttributeError):
        sm.state = PeerState.connected  # type: ignore[misc]
    assert sm._state is PeerState.initializing


def test_subclass_table_is_used() -> None:
    """A subclass's own table is the one checked (custom states: tests/test_custom_states.py)."""
    extra = states.CustomState("extra", counts_as=PeerState.connected)

    class WithExtra(StateMachine):
        _VALID_STATES_TRANSITIONS_ = {
            **StateMachine._VALID_STATES_TRANSITIONS_,
            PeerState.connected: (PeerState.ready, PeerState.shutting_down, extra),
            extra: (PeerState.ready, PeerState.shutting_down),
        }

    sm = WithExtra()
    sm._state = PeerState.connected
    sm._state = extra
    assert sm.is_connected
    with pytest.raises(InvalidStateTransition):
        sm._state = PeerState.running
    sm._state = PeerState.ready
    # ...and the base class's table does not know the subclass's state
    plain = machine_in("connected")
    with pytest.raises(InvalidStateTransition):
        plain._state = extra


def test_subclass_cannot_drop_a_base_move() -> None:
    with pytest.raises(states.InvalidStateDeclaration, match="drops the base move"):

        class Strict(StateMachine):
            _VALID_STATES_TRANSITIONS_ = {
                **StateMachine._VALID_STATES_TRANSITIONS_,
                PeerState.initializing: (PeerState.connected,),
            }


@pytest.mark.parametrize(
    "value", ["connected", "initializing", 1, None, PeerState.connected.value, object()]
)
def test_non_peer_state_values_rejected(value: object) -> None:
    sm = machine_in("initializing")
    with pytest.raises(InvalidStateTransition):
        sm._state = value  # type: ignore[assignment]
    assert sm._state is PeerState.initializing
    assert sm.changes == []
    with pytest.raises(InvalidStateTransition):
        states.check_transition(PeerState.initializing, value)
    with pytest.raises(InvalidStateTransition):
        states.check_transition(value, PeerState.connected)


@pytest.mark.parametrize("name", NAMES)
def test_cumulative_predicates(name: str) -> None:
    exp = EXPECTED_PREDICATES[name]
    state = PeerState[name]
    got_functions = dict(
        c=states.is_connected(state),
        r=states.is_ready(state),
        run=states.is_running(state),
        sd=states.is_shutting_down(state),
        fin=states.is_finished(state),
    )
    assert got_functions == exp
    sm = machine_in(name)
    got_properties = dict(
        c=sm.is_connected,
        r=sm.is_ready,
        run=sm.is_running,
        sd=sm.is_shutting_down,
        fin=sm.is_finished,
    )
    assert got_properties == exp
    assert sm.is_initializing is (name == "initializing")


def test_full_lifecycle_walk() -> None:
    sm = RecordingMachine()
    walk = ["connected", "ready", "running", "ready", "running", "shutting_down", "finished"]
    for step in walk:
        sm._state = PeerState[step]
    assert [new.name for _, new in sm.changes] == walk
    # Nothing leaves finished.
    for name in NAMES[:-1]:
        with pytest.raises(InvalidStateTransition):
            sm._state = PeerState[name]
    assert sm.is_finished
