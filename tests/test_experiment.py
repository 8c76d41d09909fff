"""Experiment files: parsing and validation (no trio, no I/O beyond reading files)."""

from __future__ import annotations

from pathlib import Path

import pytest
from launchhelpers import write_experiment

from peerkit.experiment import ExperimentError, RestartPolicy, load_experiment, start_order

GOOD = """
    [broker]
    port = 0

    [launcher]
    ready_timeout = 7
    grace_period = 1.5

    [peers.counter]
    class = "launchpeers:Counter"
    essential = false
    config_files = ["counter.toml"]
    [peers.counter.config_sources]
    src = "ticker"

    [peers.ticker]
    class = "launchpeers:Ticker"
    mode = "inprocess"
    [peers.ticker.local_params]
    rate = 20

    [peers.sleeper]
    class = "launchpeers:Sleeper"
"""


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ExperimentError) as info:
        load_experiment(write_experiment(tmp_path, text))
    return info.value.problems


def test_a_valid_file(tmp_path: Path) -> None:
    (tmp_path / "counter.toml").write_text('[launch_dependencies]\nsrc = "ticker"\n')
    exp = load_experiment(write_experiment(tmp_path, GOOD))
    assert exp.name == "exp"
    assert exp.directory == tmp_path.resolve()
    assert (exp.port, exp.ready_timeout, exp.grace_period) == (0, 7.0, 1.5)
    # the ticker comes before the counter that depends on it; otherwise file order
    assert exp.order == ("ticker", "counter", "sleeper")
    counter, ticker, sleeper = (exp.peers[p] for p in ("counter", "ticker", "sleeper"))
    assert counter.essential is False and counter.mode == "process"
    assert counter.config_files == ((tmp_path / "counter.toml").resolve(),)
    assert counter.dependencies == ("ticker",)
    assert ticker.mode == "inprocess" and ticker.local_params == {"rate": 20}
    assert ticker.configured and not sleeper.configured
    assert sleeper.config_kwargs() == {}
    assert counter.config_kwargs()["config_files"] == [str(tmp_path / "counter.toml")]


def test_the_demo_is_valid() -> None:
    demo = Path(__file__).parent.parent / "examples" / "demo.toml"
    exp = load_experiment(demo)
    assert exp.order == ("amplifier", "filter", "recorder")
    assert exp.peers["recorder"].dependencies == ("filter",)


def test_list_form_of_launch_dependencies(tmp_path: Path) -> None:
    exp = load_experiment(
        write_experiment(
            tmp_path,
            """
            [peers.b]
            class = "launchpeers:Counter"
            launch_dependencies = ["a"]
            [peers.a]
            class = "launchpeers:Ticker"
            """,
        )
    )
    assert exp.order == ("a", "b")
    assert exp.peers["b"].launch_dependencies == {"a": "a"}


def test_unknown_keys_are_named_with_a_suggestion(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [brokr]
        port = 1
        [peers.a]
        class = "launchpeers:Sleeper"
        esential = false
        """,
    )
    assert any("unknown key brokr" in p and "did you mean 'broker'" in p for p in found)
    assert any("unknown key peers.a.esential" in p and "'essential'" in p for p in found)


def test_unknown_peer_in_dependencies(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [peers.ticker]
        class = "launchpeers:Ticker"
        [peers.counter]
        class = "launchpeers:Counter"
        launch_dependencies = ["tikcer"]
        """,
    )
    assert len(found) == 1
    assert "peers.counter depends on 'tikcer'" in found[0]
    assert "did you mean 'ticker'" in found[0]


def test_dependencies_must_be_configured_peers(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [peers.sleeper]
        class = "launchpeers:Sleeper"
        [peers.counter]
        class = "launchpeers:Counter"
        launch_dependencies = ["sleeper"]
        """,
    )
    assert found == [
        "peers.counter depends on 'sleeper', whose class launchpeers:Sleeper is not a "
        "ConfiguredPeer: only configured peers tell the config server when they are ready"
    ]


def test_dependency_cycle(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [peers.a]
        class = "launchpeers:Counter"
        launch_dependencies = ["c"]
        [peers.b]
        class = "launchpeers:Counter"
        [peers.b.config_sources]
        src = "a"
        [peers.c]
        class = "launchpeers:Counter"
        launch_dependencies = ["b"]
        """,
    )
    assert found == [
        "dependency cycle: a -> c -> b -> a "
        "(launch_dependencies and config_sources must not form a loop)"
    ]


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        ("nosuchmodule:Peer", "cannot import module 'nosuchmodule'"),
        ("launchpeers:Tickr", "module 'launchpeers' has no 'Tickr'; did you mean 'Ticker'?"),
        ("launchpeers:Tick", "'launchpeers:Tick' is not a subclass of peerkit.Peer"),
        ("launchpeers", 'is not of the form "module:Class"'),
    ],
)
def test_classes_that_cannot_be_imported(tmp_path: Path, cls: str, expected: str) -> None:
    found = problems(tmp_path, f'[peers.a]\nclass = "{cls}"\n')
    assert len(found) == 1
    assert found[0].startswith("peers.a.class: ")
    assert expected in found[0]


def test_parameters_are_checked_against_the_class(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [peers.ticker]
        class = "launchpeers:Ticker"
        [peers.ticker.local_params]
        rat = 3
        [peers.t2]
        class = "launchpeers:Ticker"
        [peers.t2.local_params]
        rate = "fast"
        [peers.counter]
        class = "launchpeers:Counter"
        [peers.counter.external_params]
        speed = "src.rate"
        [peers.crasher]
        class = "launchpeers:Crasher"
        [peers.crasher.external_params]
        message = "t3.rat"
        [peers.t3]
        class = "launchpeers:Ticker"
        [peers.sleeper]
        class = "launchpeers:Sleeper"
        [peers.sleeper.local_params]
        x = 1
        """,
    )
    text = "\n".join(found)
    assert "unknown parameter 'rat'" in text
    assert "parameter 'rate'" in text and "declared as float" in text
    assert "unknown parameter 'speed'" in text
    assert "t3.rat, but launchpeers:Ticker has no parameter 'rat'; did you mean 'rate'?" in text
    assert "launchpeers:Sleeper is not a ConfiguredPeer, so it takes no local_params" in text


def test_other_bad_values_are_all_reported_together(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [broker]
        host = 5
        port = 70000
        [launcher]
        ready_timeout = -1
        [peers.config_server]
        class = "launchpeers:Sleeper"
        [peers."bad id"]
        class = "launchpeers:Sleeper"
        [peers.a]
        class = "launchpeers:Sleeper"
        mode = "thread"
        essential = "yes"
        config_files = ["missing.toml"]
        """,
    )
    text = "\n".join(found)
    for expected in (
        "broker.host must be a non-empty string",
        "broker.port must be an integer in 0..65535",
        "launcher.ready_timeout must be a positive number",
        "the peer id 'config_server' is reserved",
        "invalid peer id 'bad id'",
        "peers.a.mode must be 'process' or 'inprocess', got 'thread'",
        "peers.a.essential must be true or false",
        "peers.a.config_files: 'missing.toml' does not exist",
    ):
        assert expected in text
    assert len(found) == 8


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match="no such file"):
        load_experiment(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[peers.a\n")
    with pytest.raises(ExperimentError, match="not valid TOML"):
        load_experiment(bad)
    for text in ("", "[peers]\n"):
        empty = tmp_path / "empty.toml"
        empty.write_text(text)
        with pytest.raises(ExperimentError, match=r"no peers: add at least one \[peers.<peer_id>"):
            load_experiment(empty)


def test_start_order_is_stable_and_finds_cycles() -> None:
    assert start_order({"a": [], "b": [], "c": []}) == ["a", "b", "c"]
    assert start_order({"c": ["a"], "b": ["c"], "a": []}) == ["a", "c", "b"]
    with pytest.raises(ValueError, match="x -> y -> x"):
        start_order({"x": ["y"], "y": ["x"]})


def test_restart_keys(tmp_path: Path) -> None:
    exp = load_experiment(
        write_experiment(
            tmp_path,
            """
            [peers.a]
            class = "launchpeers:Sleeper"
            restart = "on-failure"
            max_restarts = 5
            restart_window = 30
            restart_delay = 0.25
            max_restart_delay = 4
            [peers.b]
            class = "launchpeers:Sleeper"
            restart = "always"
            [peers.c]
            class = "launchpeers:Sleeper"
            """,
        )
    )
    a, b, c = (exp.peers[p].restart for p in "abc")
    assert a == RestartPolicy(
        restart="on-failure",
        max_restarts=5,
        restart_window=30.0,
        restart_delay=0.25,
        max_restart_delay=4.0,
    )
    assert b == RestartPolicy(restart="always")  # the defaults
    assert (b.max_restarts, b.restart_window, b.restart_delay, b.max_restart_delay) == (
        3,
        60.0,
        0.5,
        10.0,
    )
    assert c == RestartPolicy() and c.restart == "never"


def test_bad_restart_keys_are_named(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [peers.a]
        class = "launchpeers:Sleeper"
        restart = "on_failure"
        [peers.b]
        class = "launchpeers:Sleeper"
        restart = "always"
        max_restarts = -1
        restart_window = 0
        restart_delay = "1s"
        [peers.c]
        class = "launchpeers:Sleeper"
        restart = "on-failure"
        max_restarts = 2.5
        restart_delay = 2
        max_restart_delay = 1
        [peers.d]
        class = "launchpeers:Sleeper"
        max_restarts = 3
        [peers.e]
        class = "launchpeers:Sleeper"
        restart = true
        restart_windw = 10
        """,
    )
    assert found == [
        'peers.a.restart must be one of "never", "on-failure", "always", got '
        "'on_failure'; did you mean 'on-failure'?",
        "peers.b.max_restarts must be a whole number, 0 or more, got -1",
        "peers.b.restart_window must be a positive number of seconds, got 0",
        "peers.b.restart_delay must be a positive number of seconds, got '1s'",
        "peers.c.max_restarts must be a whole number, 0 or more, got 2.5",
        "peers.c.max_restart_delay (1 s) must be at least restart_delay (2 s): it caps the "
        "back-off",
        'peers.d.max_restarts has no effect with restart = "never" (the default); add '
        'restart = "on-failure" or "always" to peers.d, or remove max_restarts',
        "unknown key peers.e.restart_windw; did you mean 'restart_window'? (allowed here: "
        "class, essential, mode, restart, max_restarts, restart_window, restart_delay, "
        "max_restart_delay, config_files, local_params, external_params, config_sources, "
        "launch_dependencies)",
        'peers.e.restart must be one of "never", "on-failure", "always", got True',
    ]
