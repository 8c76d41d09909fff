"""Custom peer states: the declaration, its checks at class definition, and a whole life of a
real peer with custom states against a real broker."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from peerkit import Broker, Peer, PeerState
from peerkit.errors import InvalidStateTransition, PeerkitError
from peerkit.states import (
    VALID_TRANSITIONS,
    CustomState,
    InvalidStateDeclaration,
    State,
    StateMachine,
    base_state,
    check_table,
    check_transition,
    is_connected,
    is_ready,
    is_running,
    is_shutting_down,
    is_valid_transition,
)
from peerkit.testing import wait_for_condition

S = PeerState
CALIBRATING = CustomState("calibrating", counts_as=S.ready)
IMPEDANCE_CHECK = CustomState("impedance_check", counts_as=S.connected)

#: The amplifier of docs/states.rst: calibrating between ready and running; an impedance check
#: entered from ready and left back to it.
AMPLIFIER_TABLE: dict[State, tuple[State, ...]] = {
    **VALID_TRANSITIONS,
    S.ready: (S.running, S.shutting_down, CALIBRATING, IMPEDANCE_CHECK),
    CALIBRATING: (S.running, S.shutting_down),
    IMPEDANCE_CHECK: (S.ready, S.shutting_down),
}


class AmplifierMachine(StateMachine):
    _VALID_STATES_TRANSITIONS_ = AMPLIFIER_TABLE

    def __init__(self) -> None:
        super().__init__()
        self.changes: list[tuple[State, State]] = []

    def _state_changed(self, old: State, new: State) -> None:
        self.changes.append((old, new))


def amp_in(state: State) -> AmplifierMachine:
    sm = AmplifierMachine()
    path: dict[State, list[State]] = {
        S.initializing: [],
        S.connected: [S.connected],
        S.ready: [S.connected, S.ready],
        S.running: [S.connected, S.ready, S.running],
        CALIBRATING: [S.connected, S.ready, CALIBRATING],
        IMPEDANCE_CHECK: [S.connected, S.ready, IMPEDANCE_CHECK],
        S.shutting_down: [S.shutting_down],
        S.finished: [S.shutting_down, S.finished],
    }
    for step in path[state]:
        sm._state = step
    sm.changes.clear()
    return sm


# ------------------------------------------------------------------ the CustomState value


def test_custom_state_reports_by_name() -> None:
    assert str(CALIBRATING) == "calibrating"
    assert CALIBRATING.value == "calibrating"  # what Peer reports to the broker
    assert CALIBRATING.name == "calibrating"
    assert CALIBRATING.counts_as is S.ready
    assert repr(CALIBRATING) == "CustomState('calibrating', counts_as=PeerState.ready)"
    assert CustomState("calibrating", counts_as=S.ready) == CALIBRATING
    assert hash(CustomState("calibrating", counts_as=S.ready)) == hash(CALIBRATING)
    assert base_state(CALIBRATING) is S.ready
    assert base_state(S.running) is S.running
    # the base states are untouched
    assert [str(s) for s in PeerState] == [
        "initializing",
        "connected",
        "ready",
        "running",
        "shutting_down",
        "finished",
    ]


@pytest.mark.parametrize(
    ("name", "counts_as", "fix"),
    [
        ("", S.ready, "must be a Python identifier"),
        ("two words", S.ready, "must be a Python identifier"),
        (3, S.ready, "must be a Python identifier"),
        ("ready", S.ready, "use PeerState.ready instead"),
        ("draining", S.shutting_down, "shutting down belongs to the framework"),
        ("gone", S.finished, "counts as one of the live base states"),
        ("calibrating", "ready", "counts as one of the live base states"),
        ("calibrating", None, "counts as one of the live base states"),
        ("calibrating", CALIBRATING, "counts as one of the live base states"),
    ],
)
def test_bad_custom_state_refused(name: Any, counts_as: Any, fix: str) -> None:
    with pytest.raises(InvalidStateDeclaration, match=fix) as info:
        CustomState(name, counts_as=counts_as)
    assert isinstance(info.value, PeerkitError)
    assert isinstance(info.value, TypeError)


def test_counts_as_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        CustomState("calibrating", S.ready)  # type: ignore[misc]


# ------------------------------------------------------------------ moves and predicates


def test_amplifier_whole_life() -> None:
    sm = AmplifierMachine()
    walk: list[State] = [
        S.connected,
        S.ready,
        IMPEDANCE_CHECK,
        S.ready,
        CALIBRATING,
        S.running,
        S.ready,
        CALIBRATING,
        S.shutting_down,
        S.finished,
    ]
    for step in walk:
        sm._state = step
        assert sm.state is step
        assert sm._state is step
    assert [new for _, new in sm.changes] == walk
    assert sm.is_finished


@pytest.mark.parametrize(
    ("state", "connected", "ready", "running"),
    [(CALIBRATING, True, True, False), (IMPEDANCE_CHECK, True, False, False)],
)
def test_custom_state_predicates_follow_counts_as(
    state: CustomState, connected: bool, ready: bool, running: bool
) -> None:
    sm = amp_in(state)
    got = (sm.is_connected, sm.is_ready, sm.is_running, sm.is_shutting_down, sm.is_finished)
    assert got == (connected, ready, running, False, False)
    assert not sm.is_initializing
    assert (is_connected(state), is_ready(state), is_running(state)) == (connected, ready, running)
    assert not is_shutting_down(state)


def test_counts_as_running_and_initializing() -> None:
    recording = CustomState("recording", counts_as=S.running)
    waiting = CustomState("waiting_for_device", counts_as=S.initializing)

    class Rec(StateMachine):
        _VALID_STATES_TRANSITIONS_ = {
            **VALID_TRANSITIONS,
            S.initializing: (S.connected, S.shutting_down, waiting),
            waiting: (S.connected, S.shutting_down),
            S.running: (S.ready, S.shutting_down, recording),
            recording: (S.running, S.ready, S.shutting_down),
        }

    sm = Rec()
    sm._state = waiting
    assert sm.is_initializing and not sm.is_connected
    for step in (S.connected, S.ready, S.running, recording):
        sm._state = step
    assert sm.is_running and sm.is_ready and sm.is_connected


@pytest.mark.parametrize("state", [CALIBRATING, IMPEDANCE_CHECK])
def test_every_custom_state_can_shut_down(state: CustomState) -> None:
    sm = amp_in(state)
    sm._state = S.shutting_down
    assert sm.is_shutting_down
    assert sm.changes == [(state, S.shutting_down)]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (S.connected, CALIBRATING),  # only from ready
        (S.running, CALIBRATING),
        (CALIBRATING, S.ready),  # not declared
        (CALIBRATING, IMPEDANCE_CHECK),
        (IMPEDANCE_CHECK, S.running),
        (IMPEDANCE_CHECK, CALIBRATING),
        (CALIBRATING, S.finished),
        (S.shutting_down, CALIBRATING),
        (S.finished, IMPEDANCE_CHECK),
    ],
)
def test_undeclared_custom_move_raises(old: State, new: State) -> None:
    sm = amp_in(old)
    with pytest.raises(InvalidStateTransition) as info:
        sm._state = new
    assert isinstance(info.value, AssertionError)
    assert f"{old} -> {new}" in str(info.value)
    assert sm.state is old
    assert sm.changes == []
    assert not is_valid_transition(old, new, AMPLIFIER_TABLE)
    with pytest.raises(InvalidStateTransition):
        check_transition(old, new, AMPLIFIER_TABLE)


def test_a_state_of_another_class_is_refused() -> None:
    stranger = CustomState("stranger", counts_as=S.ready)
    sm = amp_in(S.ready)
    with pytest.raises(InvalidStateTransition):
        sm._state = stranger
    # the base table knows no custom state
    assert not is_valid_transition(S.ready, CALIBRATING)
    assert is_valid_transition(S.ready, CALIBRATING, AMPLIFIER_TABLE)
    assert check_transition(CALIBRATING, S.running, AMPLIFIER_TABLE) is S.running


@given(st.lists(st.sampled_from(list(AMPLIFIER_TABLE)), max_size=30))
def test_random_walk_obeys_the_table(steps: list[State]) -> None:
    """Any sequence of requested states: each is taken iff the table allows it, and the
    predicates always follow the state the current one counts as."""
    sm = AmplifierMachine()
    for step in steps:
        old = sm.state
        allowed = old == step or step in AMPLIFIER_TABLE[old]
        if allowed:
            sm._state = step
            assert sm.state is step
        else:
            with pytest.raises(InvalidStateTransition):
                sm._state = step
            assert sm.state is old
        base = base_state(sm.state)
        assert sm.is_connected == (base in (S.connected, S.ready, S.running))
        assert sm.is_ready == (base in (S.ready, S.running))
        assert sm.is_running == (base is S.running)
        assert sm.is_shutting_down == (base in (S.shutting_down, S.finished))
        assert sm.is_finished == (base is S.finished)
        assert sm.is_initializing == (base is S.initializing)


def test_invalid_custom_move_raises_under_python_O() -> None:
    code = textwrap.dedent(
        """
        from peerkit.states import VALID_TRANSITIONS, CustomState, PeerState as S, StateMachine
        assert False, "asserts must be stripped under -O"
        CAL = CustomState("calibrating", counts_as=S.ready)
        class Amp(StateMachine):
            _VALID_STATES_TRANSITIONS_ = {
                **VALID_TRANSITIONS,
                S.ready: (S.running, S.shutting_down, CAL),
                CAL: (S.running, S.shutting_down),
            }
        sm = Amp()
        sm._state = S.connected
        sm._state = S.ready
        sm._state = CAL
        try:
            sm._state = S.ready
        except AssertionError as exc:
            print("raised", type(exc).__name__, exc)
        try:
            class Bad(StateMachine):
                _VALID_STATES_TRANSITIONS_ = {**VALID_TRANSITIONS, CAL: (S.running,)}
        except TypeError as exc:
            print("refused", type(exc).__name__)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "raised InvalidStateTransition invalid peer state transition calibrating -> ready",
        "refused InvalidStateDeclaration",
    ]


# ------------------------------------------------------------------ refused declarations

_DRAIN = CustomState("draining", counts_as=S.running)
_OTHER_CAL = CustomState("calibrating", counts_as=S.connected)

BAD_TABLES: list[tuple[str, object, str]] = [
    ("not a dict", list(AMPLIFIER_TABLE.items()), "must be a dict of tuples"),
    (
        "a string for a state",
        {**VALID_TRANSITIONS, S.ready: (S.running, S.shutting_down, "calibrating")},
        "which is not a state: use PeerState members and CustomState",
    ),
    (
        "a string key",
        {**VALID_TRANSITIONS, "calibrating": (S.running, S.shutting_down)},
        "which is not a state",
    ),
    (
        "a list of moves",
        {**AMPLIFIER_TABLE, CALIBRATING: [S.running, S.shutting_down]},
        "must be a tuple of states",
    ),
    (
        "unknown state: moved to, no row",
        {**VALID_TRANSITIONS, S.ready: (S.running, S.shutting_down, CALIBRATING)},
        "has no row for it",
    ),
    (
        "a base row missing",
        {k: v for k, v in AMPLIFIER_TABLE.items() if k is not S.connected},
        "has no row for PeerState.connected; start",
    ),
    (
        "a base move dropped",
        {**AMPLIFIER_TABLE, S.running: (S.shutting_down,)},
        "drops the base move PeerState.running -> PeerState.ready",
    ),
    (
        "a base move added",
        {**AMPLIFIER_TABLE, S.connected: (S.ready, S.running, S.shutting_down)},
        "adds the move PeerState.connected -> PeerState.running",
    ),
    (
        "shutting_down leaves for a custom state",
        {**AMPLIFIER_TABLE, S.shutting_down: (S.finished, CALIBRATING)},
        "only move is to finished",
    ),
    (
        "a custom state that cannot shut down",
        {**AMPLIFIER_TABLE, CALIBRATING: (S.running,)},
        "cannot shut down.*add PeerState.shutting_down to its moves",
    ),
    (
        "a custom state moving to finished",
        {**AMPLIFIER_TABLE, CALIBRATING: (S.running, S.shutting_down, S.finished)},
        "moves to PeerState.finished",
    ),
    (
        "a custom state without the moves of what it counts as",
        {**AMPLIFIER_TABLE, CALIBRATING: (S.ready, S.shutting_down)},
        "counts as PeerState.ready, so the framework may move it to PeerState.running",
    ),
    (
        "an unreachable custom state",
        {**AMPLIFIER_TABLE, _DRAIN: (S.ready, S.shutting_down)},
        "'draining'.* is unreachable",
    ),
    (
        "two custom states with one name",
        {
            **AMPLIFIER_TABLE,
            S.connected: (S.ready, S.shutting_down, _OTHER_CAL),
            _OTHER_CAL: (S.ready, S.shutting_down),
        },
        "two custom states named 'calibrating'",
    ),
]


@pytest.mark.parametrize(("why", "table", "fix"), BAD_TABLES, ids=[b[0] for b in BAD_TABLES])
def test_bad_table_refused_at_class_definition(why: str, table: object, fix: str) -> None:
    with pytest.raises(InvalidStateDeclaration, match=fix) as info:

        class Bad(StateMachine):
            _VALID_STATES_TRANSITIONS_ = table  # type: ignore[assignment]

    assert "Bad" in str(info.value)
    with pytest.raises(InvalidStateDeclaration, match=fix):
        check_table(table, "Bad")


def test_bad_table_refused_on_a_peer_subclass() -> None:
    with pytest.raises(InvalidStateDeclaration, match="cannot shut down"):

        class BadAmp(Peer):
            _VALID_STATES_TRANSITIONS_ = {**AMPLIFIER_TABLE, CALIBRATING: (S.running,)}


def test_base_table_and_amplifier_table_pass() -> None:
    check_table(VALID_TRANSITIONS)
    check_table(AMPLIFIER_TABLE)


def test_subclass_of_a_custom_class_extends_its_table() -> None:
    settling = CustomState("settling", counts_as=S.running)

    class Amp2(AmplifierMachine):
        _VALID_STATES_TRANSITIONS_ = {
            **AmplifierMachine._VALID_STATES_TRANSITIONS_,
            CALIBRATING: (S.running, S.shutting_down, settling),
            settling: (S.running, S.ready, S.shutting_down),
        }

    sm = Amp2()
    for step in (S.connected, S.ready, CALIBRATING, settling, S.running):
        sm._state = step
    assert sm.is_running
    # the parent's table is unchanged
    assert settling not in AmplifierMachine._VALID_STATES_TRANSITIONS_


# ------------------------------------------------------------------ a real peer and broker


class Amplifier(Peer):
    """Calibrates on start; runs an impedance check on request while ready."""

    _VALID_STATES_TRANSITIONS_ = AMPLIFIER_TABLE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calibrate_go = trio.Event()
        self.check_go = trio.Event()
        self.reported: list[str] = []

    def _state_changed(self, old: Any, new: Any) -> None:
        super()._state_changed(old, new)
        self.reported.append(str(new))

    async def _start(self) -> None:
        self._state = CALIBRATING
        await self.calibrate_go.wait()

    async def impedance_check(self) -> None:
        self._state = IMPEDANCE_CHECK
        await self.check_go.wait()
        self._state = PeerState.ready


def _shown(broker: Broker, peer_id: str) -> str | None:
    for info in broker.info().peers:
        if info.peer_id == peer_id:
            return info.state
    return None


async def test_real_peer_with_custom_states_whole_life(
    broker: Broker, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(30):
        amp = Amplifier(broker.url, "amp", autostart=False, autoshutdown=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(amp.run)
            await amp.wait_for_state(lambda p: p.is_ready, timeout=5)
            await wait_for_condition(lambda: _shown(broker, "amp") == "ready")

            # impedance check: entered from ready, left back to it
            nursery.start_soon(amp.impedance_check)
            await wait_for_condition(lambda: _shown(broker, "amp") == "impedance_check")
            assert amp.state is IMPEDANCE_CHECK
            assert amp.is_connected and not amp.is_ready
            with pytest.raises(PeerkitError, match="cannot start before it is ready"):
                await amp.start()
            amp.check_go.set()
            await wait_for_condition(lambda: _shown(broker, "amp") == "ready")

            # start: calibrating (counts as ready), then running
            nursery.start_soon(amp.start)
            await wait_for_condition(lambda: _shown(broker, "amp") == "calibrating")
            assert amp.state is CALIBRATING
            assert amp.is_ready and not amp.is_running
            amp.calibrate_go.set()
            await wait_for_condition(lambda: _shown(broker, "amp") == "running")
            assert amp.is_running

            await amp.stop()
            await wait_for_condition(lambda: _shown(broker, "amp") == "ready")

            # a second start calibrates again (the event is already set)
            await amp.start()
            await wait_for_condition(lambda: _shown(broker, "amp") == "running")
            await amp.async_shutdown()
        assert amp.is_finished
        assert amp.error is None
        assert amp.reported == [
            "connected",
            "ready",
            "impedance_check",
            "ready",
            "calibrating",
            "running",
            "ready",
            "calibrating",
            "running",
            "shutting_down",
            "finished",
        ]
        await wait_for_condition(lambda: _shown(broker, "amp") is None)


async def test_real_peer_shuts_down_from_a_custom_state(
    broker: Broker, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(30):
        amp = Amplifier(broker.url, "amp2", autostart=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(amp.run)
            await amp.wait_for_state(lambda p: p.state is CALIBRATING, timeout=5)
            await wait_for_condition(lambda: _shown(broker, "amp2") == "calibrating")
            await amp.async_shutdown()
        assert amp.is_finished
        assert amp.error is None
        assert amp.reported[-3:] == ["calibrating", "shutting_down", "finished"]
