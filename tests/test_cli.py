"""The ``peerkit`` command: help, exit statuses, and each subcommand against real brokers.

Commands that must fail fast run as processes under a ``trio.fail_after`` deadline shorter
than the 10 s a peer would spend retrying, and generous for a loaded machine. "One line"
means exactly one line on stderr: no traceback, no exception group, no second copy.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from launchhelpers import write_experiment
from launchpeers import Ticker

import peerkit
from peerkit import Broker, ConfigServer, CustomState, Message, Peer, PeerState, message
from peerkit.cli import _flags, build_parser, main
from peerkit.launch._status import StatusEvent, event_line, event_record
from peerkit.messages import PeerControlMessage, PeerJoined, PeerLeft, PeerStateChanged

TESTS = Path(__file__).parent
COMMANDS = ["broker", "run", "launch", "ctl", "peers", "completion"]
RUNS_PEERS = ["broker", "run", "launch", "ctl", "peers"]
#: a refused connection must fail well before a peer's 10 s connect_timeout; this deadline
#: includes starting Python and importing peerkit on a loaded machine
FAIL_FAST = 6.0
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}


def peerkit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "peerkit", *args]


async def run_main(argv: Sequence[str]) -> int:
    """``peerkit ARGV`` in a worker thread (it runs its own trio loop)."""
    return await trio.to_thread.run_sync(main, list(argv))


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    """``peerkit ARGS`` as a process (stdout and stderr captured, any exit status)."""
    return await trio.run_process(
        peerkit_cmd(*args), capture_stdout=True, capture_stderr=True, check=False, env=ENV
    )


def closed_port() -> int:
    """A port nothing listens on (it was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_line(stderr: bytes) -> str:
    """The one line of ``stderr``; fails if there are more (or a traceback)."""
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


async def read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> str:
    """The next line of a process's output (``buffer`` keeps what came after it)."""
    while b"\n" not in buffer:
        chunk = await stream.receive_some()
        assert chunk, f"output ended: {bytes(buffer)!r}"
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


# ---------------------------------------------------------------------------- help, version


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    expected = importlib.metadata.version("peerkit")
    assert capsys.readouterr().out == f"peerkit {expected}\n"
    assert peerkit.__version__ == expected


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(
    command: str | None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: peerkit")
    assert "\nexamples:\n" in out
    # descriptions and examples are laid out by hand: nothing runs past 80 columns
    assert [line for line in out.splitlines() if len(line) > 80] == []
    if command is None:
        assert all(c in out for c in COMMANDS)
    else:
        assert f"  peerkit {command} " in out.split("examples:")[1] or command == "completion"
    if command == "run":
        assert "-p NAME VALUE" in out and "-f FILE" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_is_described(command: str) -> None:
    parser = subparsers()[command]
    for action in parser._actions:
        text = action.help or ""
        assert len(text.split()) >= 3, (command, action.dest, text)
        assert not text.startswith("("), (command, action.dest, text)  # "(default: 10)" alone


@pytest.mark.parametrize("command", RUNS_PEERS)
def test_log_level_on_every_command_that_runs_peers(command: str) -> None:
    options = {o for a in subparsers()[command]._actions for o in a.option_strings}
    assert "--log-level" in options


def test_bad_log_level_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PEERKIT_LOG_LEVEL", "LOUD")
    assert main(["peers"]) == 2
    assert "$PEERKIT_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'" in (
        capsys.readouterr().err
    )


async def test_python_dash_m_peerkit() -> None:
    with trio.fail_after(20):
        result = await trio.run_process(peerkit_cmd("--help"), capture_stdout=True)
    assert b"usage: peerkit" in result.stdout


# ---------------------------------------------------------------------------- completion


def test_bash_completion_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bash = shutil.which("bash")
    if bash is None:  # pragma: no cover - bash is everywhere the suite runs
        pytest.skip("no bash")
    assert main(["completion", "bash"]) == 0
    text = capsys.readouterr().out
    script = tmp_path / "peerkit.bash"
    script.write_text(text)
    assert all(c in text for c in COMMANDS)
    subprocess.run([bash, "-n", str(script)], check=True)

    def complete(*words: str) -> list[str]:
        """What TAB offers after ``peerkit WORDS`` (the last word is being typed)."""
        quoted = " ".join(f"'{w}'" for w in ("peerkit", *words))
        program = (
            f"source {script}; COMP_WORDS=({quoted}); COMP_CWORD={len(words)}; "
            "_peerkit; printf '%s\\n' \"${COMPREPLY[@]}\""
        )
        out = subprocess.run(
            [bash, "-c", program], check=True, capture_output=True, text=True, cwd=tmp_path
        ).stdout
        return [w for w in out.splitlines() if w]

    assert set(complete("")) >= set(COMMANDS)
    assert complete("pe") == ["peers"]
    assert complete("--v") == ["--version"]
    assert complete("ctl", "") == ["start", "stop", "close"]
    assert complete("ctl", "start", "--broker", "ws://x", "--log-level", "W") == ["WARNING"]
    assert {"--wait", "--connect-timeout", "--json", "--log-level"} <= set(complete("peers", "--"))
    assert complete("run", "-p", "rate", "") == []  # a value of its own: nothing to offer
    assert complete("completion", "") == ["bash", "zsh"]
    (tmp_path / "exp.toml").write_text("")
    assert "exp.toml" in complete("launch", "e")


def test_zsh_completion_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "zsh"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("#compdef peerkit\n")
    for command in COMMANDS:
        assert f"                {command})\n" in text
    assert "'*-p[set a parameter (parsed as declared)]:NAME: :VALUE: '" in text
    assert "(DEBUG INFO WARNING ERROR)" in text
    zsh = shutil.which("zsh")
    if zsh is not None:
        subprocess.run([zsh, "-n", "-c", text], check=True)


# ---------------------------------------------------------------------------- unreachable broker


@pytest.mark.parametrize(
    "argv", [["peers"], ["ctl", "start", "amp"], ["run", "launchpeers:Sleeper"]]
)
async def test_refused_connection_fails_at_once_on_one_line(argv: list[str]) -> None:
    url = f"ws://127.0.0.1:{closed_port()}"
    with trio.fail_after(FAIL_FAST):
        result = await run_cli(*argv, "--broker", url)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line == (
        f"peerkit {argv[0]}: no broker at {url} (connection refused); start one with "
        "'peerkit broker', check --broker, or pass --wait to wait for it"
    )


@pytest.mark.parametrize("argv", [["peers"], ["run", "launchpeers:Sleeper"]])
async def test_connect_timeout_bounds_a_server_that_never_answers(
    argv: list[str], nursery: trio.Nursery
) -> None:
    async def say_nothing(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    serve = functools.partial(trio.serve_tcp, say_nothing, 0, host="127.0.0.1")
    (listener,) = await nursery.start(serve)
    port = listener.socket.getsockname()[1]
    url = f"ws://127.0.0.1:{port}"
    with trio.fail_after(FAIL_FAST + 1):
        result = await run_cli(*argv, "--broker", url, "--connect-timeout", "1")
    assert result.returncode == 1
    assert one_line(result.stderr) == (
        f"peerkit {argv[0]}: the server at {url} accepted the connection but did not complete "
        "the peerkit handshake within 1 s; is it a peerkit broker (check --broker)? if it is "
        "only busy, raise --connect-timeout"
    )


async def test_wait_says_so_once_then_connects(nursery: trio.Nursery) -> None:
    port = closed_port()
    url = f"ws://127.0.0.1:{port}"
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            peerkit_cmd("peers", "--broker", url, "--wait"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        assert process.stdout is not None and process.stderr is not None
        try:
            buffer = bytearray()
            line = await read_line(process.stderr, buffer)
            assert line == (
                f"peerkit peers: waiting for the broker at {url} (connection refused); "
                "Ctrl-C to give up"
            )
            broker = Broker(port=port)
            await nursery.start(broker.run)
            assert await process.wait() == 0
            out = await process.stdout.receive_some(1 << 16)
            rest = buffer + await process.stderr.receive_some(1 << 16)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert out == b"no peers connected\n"
        assert rest == b""  # the wait was announced once, however many tries it took
        await broker.shutdown()


async def test_wait_is_bounded_by_connect_timeout() -> None:
    url = f"ws://127.0.0.1:{closed_port()}"
    with trio.fail_after(FAIL_FAST + 1):
        result = await run_cli("ctl", "stop", "amp", "--broker", url, "--wait",
                               "--connect-timeout", "1")  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"peerkit ctl: waiting for up to 1 s for the broker at {url} (connection refused); "
        "Ctrl-C to give up",
        f"peerkit ctl: no broker at {url} within 1 s; start one with 'peerkit broker', check "
        "--broker, or raise --connect-timeout",
    ]


async def test_port_in_use_is_one_line_naming_port_0() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with trio.fail_after(FAIL_FAST):
            result = await run_cli("broker", "--port", str(port))
    assert result.returncode == 1
    assert result.stdout == b""
    assert one_line(result.stderr) == (
        f"peerkit broker: cannot listen on 127.0.0.1:{port}: the port is already in use "
        "(another broker?); stop that program, or choose another port with --port N "
        "(--port 0 picks a free one)"
    )


# ---------------------------------------------------------------------------- flags, not kwargs


def test_flags_replace_keyword_arguments() -> None:
    assert _flags("could not connect ...; is it running? (raise connect_timeout to wait)") == (
        "could not connect ...; is it running? (raise --connect-timeout to wait)"
    )
    assert _flags("wrong or missing token; pass the broker's token=") == (
        "wrong or missing token; pass the broker's --token"
    )
    assert _flags("broker_url must be a ws:// URL") == "--broker must be a ws:// URL"
    assert _flags("token must be a non-empty string") == "--token must be a non-empty string"


def test_broker_beyond_loopback_names_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["broker", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "peerkit broker: binding the broker to '0.0.0.0' exposes it beyond this machine; "
        "pass --token SECRET (a shared secret every peer must present) or --host 127.0.0.1\n"
    )


async def test_token_errors_name_the_flag(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = Broker(token="s3cret")
    await nursery.start(broker.run)

    def command_lines() -> list[str]:
        """stderr, less the log records of the broker (it runs in this process)."""
        err = capsys.readouterr().err
        return [line for line in err.splitlines() if "peerkit.broker:" not in line]

    with trio.fail_after(30):
        assert await run_main(["peers", "--broker", broker.url]) == 1
        assert command_lines() == [
            f"peerkit peers: the broker at {broker.url} requires a token; pass its shared "
            "secret with --token SECRET or $PEERKIT_TOKEN"
        ]
        assert await run_main(["ctl", "stop", "x", "--broker", broker.url, "--token", "no"]) == 1
        assert command_lines() == [
            f"peerkit ctl: the broker at {broker.url} refused the token; pass its shared "
            "secret with --token SECRET or $PEERKIT_TOKEN"
        ]
        assert await run_main(["peers", "--broker", broker.url, "--token", "s3cret"]) == 0
        assert capsys.readouterr().out == "no peers connected\n"


async def test_duplicate_id_names_the_flag(broker: Broker) -> None:
    with trio.fail_after(30):
        async with Peer(broker.url, "twin"):
            result = await run_cli("run", "launchpeers:Sleeper", "--broker", broker.url,
                                   "--id", "twin")  # fmt: skip
    assert result.returncode == 1
    assert one_line(result.stderr) == (
        f"peerkit run: the broker at {broker.url} already has a peer 'twin'; choose another "
        "--id, or stop that peer first"
    )


# ---------------------------------------------------------------------------- usage errors


def test_launch_validation_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_experiment(
        tmp_path,
        """
        [peers.a]
        class = "launchpeers:Counter"
        launch_dependencies = ["b"]
        colour = "red"
        """,
    )
    assert main(["launch", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"peerkit launch: {path} is invalid:" in err
    assert "unknown key peers.a.colour" in err
    assert "peers.a depends on 'b', which is not a peer of this experiment" in err
    assert main(["launch", str(tmp_path / "missing.toml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_launch_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    demo = TESTS.parent / "examples" / "demo.toml"
    assert main(["launch", str(demo), "--check"]) == 0
    assert "start order: amplifier, filter, recorder" in capsys.readouterr().out
    assert main(["launch", str(demo), "--duration", "-1"]) == 2
    assert "--duration must be a positive number of seconds, got -1.0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["nosuchmodule:Peer"], "cannot import module 'nosuchmodule'"),
        (["launchpeers:Sleeper", "-p", "x", "1"], "is not a ConfiguredPeer"),
        (["launchpeers:Ticker", "-p", "rate", "fast"], "'fast' is not a float"),
        (["launchpeers:Ticker", "-p", "speed", "1"], "unknown parameter 'speed'"),
        (
            ["launchpeers:Ticker", "--broker", "http://x"],
            "--broker must be a ws:// or wss:// URL such as ws://127.0.0.1:8765, got 'http://x'",
        ),
    ],
)
def test_run_usage_errors_exit_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", *argv]) == 2
    assert expected in capsys.readouterr().err


# ---------------------------------------------------------------------------- ctl, peers


async def test_ctl_and_peers_against_a_running_broker(
    broker: Broker, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(30):
        target = Peer(broker.url, "target", autostart=False, autoshutdown=False)
        await nursery.start(target.run)
        await target.wait_for_state(lambda p: p.is_ready, 5)
        capsys.readouterr()

        assert await run_main(["peers", "--broker", broker.url]) == 0
        out = capsys.readouterr().out
        lines = out.splitlines()
        assert lines[0].split() == ["PEER", "STATE", "SENT", "RECEIVED", "QUEUED", "DROPPED"]
        assert lines[1].split()[:2] == ["target", "ready"]
        assert "subscribes to: PeerControlMessage" in out
        assert "peerkit-peers-" not in out  # the command does not list itself

        assert await run_main(["peers", "--broker", broker.url, "--json"]) == 0
        (info,) = json.loads(capsys.readouterr().out)
        assert info["peer_id"] == "target" and info["state"] == "ready"
        assert "PeerControlMessage" in info["subscriptions"]

        assert await run_main(["ctl", "start", "target", "--broker", broker.url]) == 0
        assert "target start: running" in capsys.readouterr().out
        assert target.is_running
        assert await run_main(["ctl", "stop", "target", "--broker", broker.url]) == 0
        assert target.is_ready and not target.is_running
        assert await run_main(["ctl", "close", "target", "--broker", broker.url]) == 0
        await target.wait_finished()

        assert await run_main(["ctl", "start", "nobody", "--broker", broker.url]) == 1
        assert capsys.readouterr().err == (
            "peerkit ctl: peer 'nobody' is not connected; 'peerkit peers' lists the "
            "connected peers\n"
        )
        assert await run_main(["peers", "--broker", broker.url]) == 0
        assert capsys.readouterr().out == "no peers connected\n"


@message
class CliPing(Message):
    n: int


async def test_peers_counts_point_the_same_way_in_table_and_json(
    broker: Broker, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(30):
        talker, listener = Peer(broker.url, "talker"), Peer(broker.url, "listener")
        await nursery.start(talker.run)
        await nursery.start(listener.run)
        heard = trio.Semaphore(0)
        await listener.subscribe_for_all_msg_subtype(CliPing, lambda m: heard.release())
        for n in range(3):
            await talker.send_message(CliPing(n=n))
        for _ in range(3):
            await heard.acquire()

        assert await run_main(["peers", "--broker", broker.url, "--json"]) == 0
        records = {r["peer_id"]: r for r in json.loads(capsys.readouterr().out)}
        assert await run_main(["peers", "--broker", broker.url]) == 0
        lines = capsys.readouterr().out.splitlines()
        header = lines[0].split()
        table = {line.split()[0]: dict(zip(header, line.split(), strict=True)) for line in
                 lines[1:] if not line.startswith(" ")}  # fmt: skip
        # the talker sent 3 and received none; the listener the other way round
        assert (records["talker"]["sent"], records["talker"]["received"]) == (3, 0)
        assert (records["listener"]["sent"], records["listener"]["received"]) == (0, 3)
        for pid in ("talker", "listener"):
            assert int(table[pid]["SENT"]) == records[pid]["sent"]
            assert int(table[pid]["RECEIVED"]) == records[pid]["received"]
        await talker.async_shutdown()
        await listener.async_shutdown()


# ---------------------------------------------------------------------------- peers --watch

CALIBRATING = CustomState("calibrating", counts_as=PeerState.ready)


class Calibrating(Peer):
    """Calibrates (a custom state counting as ready) when started, then runs."""

    _VALID_STATES_TRANSITIONS_ = {
        **Peer._VALID_STATES_TRANSITIONS_,
        PeerState.ready: (PeerState.running, PeerState.shutting_down, CALIBRATING),
        CALIBRATING: (PeerState.ready, PeerState.running, PeerState.shutting_down),
    }

    async def _start(self) -> None:
        self._state = CALIBRATING
        await trio.lowlevel.checkpoint()
        self._state = PeerState.ready


async def start_watch(url: str, *args: str) -> tuple[trio.Process, bytearray, bytearray]:
    """``peerkit peers --watch`` as a process, once it says it watches (stdout and stderr
    buffers returned for :func:`read_line`)."""
    process = await trio.lowlevel.open_process(
        peerkit_cmd("peers", "--watch", "--broker", url, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    assert process.stderr is not None
    err = bytearray()
    until = f" for {args[args.index('--duration') + 1]} s" if "--duration" in args else ""
    until = until or "; Ctrl-C to stop"
    assert await read_line(process.stderr, err) == (
        f"peerkit peers: watching the peers of {url}{until}"
    )
    return process, bytearray(), err


async def lines_until_left(process: trio.Process, out: bytearray, peer_id: str) -> list[str]:
    assert process.stdout is not None
    lines: list[str] = []
    while not lines or not re.search(rf"\b{peer_id}\b.*\bleft\b", lines[-1]):
        lines.append(await read_line(process.stdout, out))
    return lines


async def test_peers_watch_prints_each_event_live_until_ctrl_c(broker: Broker) -> None:
    with trio.fail_after(30):
        process, out, _err = await start_watch(broker.url)
        try:
            async with Calibrating(broker.url, "amp") as amp:
                await amp.wait_for_state(lambda p: p.is_running, 5)
            lines = await lines_until_left(process, out, "amp")
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}  amp {13}  \S.*", ln) for ln in lines), lines
    assert [line[32:] for line in lines] == [
        "joined",
        "initializing -> connected",
        "connected -> ready",
        "ready -> calibrating (counts as ready)",
        "calibrating -> ready",
        "ready -> running",
        "running -> shutting_down",
        "left (clean)",
    ]


async def test_peers_watch_json_lines_for_a_duration(broker: Broker) -> None:
    with trio.fail_after(30):
        process, out, err = await start_watch(broker.url, "--json", "--duration", "4")
        try:
            async with Peer(broker.url, "b"):
                pass
            lines = await lines_until_left(process, out, "b")
            assert await process.wait() == 0  # by itself, at the end of the duration
            assert process.stdout is not None and process.stderr is not None
            assert await process.stdout.receive_some() == b""
            assert err + await process.stderr.receive_some() == b""
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    records = [json.loads(line) for line in lines]
    assert all(r.pop("peer_id") == "b" and r.pop("time") for r in records)
    assert records[0] == {"event": "joined", "resumed": False}
    assert records[1] == {"event": "state", "old": "initializing", "new": "connected",
                          "base": "connected"}  # fmt: skip
    assert records[-1] == {"event": "left", "clean": True, "reason": "goodbye"}


async def test_peers_watch_ends_when_the_broker_shuts_down() -> None:
    with trio.fail_after(30):
        async with Broker() as broker:
            url = broker.url
            process, _out, err = await start_watch(url)
        try:
            assert await process.wait() == 0
            assert process.stderr is not None
            rest = err + await process.stderr.receive_some()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert rest.decode() == (f"peerkit peers: the broker at {url} shut down; the watch is over\n")


async def test_peers_watch_rides_out_a_broker_restart(nursery: trio.Nursery) -> None:
    """The watch's peer reconnects (as every peer does by default) and says that the events
    of the time without the broker are missing."""

    async def serve(
        broker: Broker, scope: trio.CancelScope, task_status: trio.TaskStatus[None]
    ) -> None:
        with scope:
            await broker.run(task_status=task_status)

    with trio.fail_after(30):
        first, vanish = Broker(), trio.CancelScope()
        await nursery.start(serve, first, vanish)
        url = first.url
        process, out, err = await start_watch(url)
        try:
            vanish.cancel()  # no shutdown notice: the connections just drop
            second = Broker(port=first.port)
            await nursery.start(serve, second, trio.CancelScope())
            assert process.stderr is not None
            assert await read_line(process.stderr, err) == (
                f"peerkit peers: reconnected to the broker at {url}; events while the "
                "connection was down are missing ('peerkit peers' lists the peers now)"
            )
            async with Peer(url, "late"):
                pass
            lines = await lines_until_left(process, out, "late")
            assert lines[0].endswith("late              joined")
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await second.shutdown()


def test_peers_duration_needs_watch(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["peers", "--duration", "5"]) == 2
    assert capsys.readouterr().err == (
        "peerkit peers: --duration goes with --watch; add --watch to watch the peers live\n"
    )


def test_watch_lines_and_records() -> None:
    when = datetime.datetime(2026, 1, 2, 12, 0, 1, 234567, tzinfo=datetime.UTC)
    events: list[StatusEvent] = [
        PeerJoined(peer_id="amp", resumed=True, sender="amp"),
        PeerStateChanged(peer_id="amp", old="ready", new="running", base="running", sender="amp"),
        PeerLeft(reason="goodbye (RuntimeError: boom)", clean=True, sender="amp"),
        PeerLeft(reason="connection lost without goodbye", clean=False, sender="a-long-peer-id-x"),
    ]
    assert [event_line(e, when) for e in events] == [
        "12:00:01.234  amp               joined (resumed)",
        "12:00:01.234  amp               ready -> running",
        "12:00:01.234  amp               left (clean: goodbye (RuntimeError: boom))",
        "12:00:01.234  a-long-peer-id-x  left (connection lost without goodbye)",
    ]
    assert event_record(events[3], when) == {
        "time": "2026-01-02T12:00:01.234567+00:00",
        "peer_id": "a-long-peer-id-x",
        "event": "left",
        "clean": False,
        "reason": "connection lost without goodbye",
    }


# ---------------------------------------------------------------------------- broker, run


async def test_broker_command_serves_until_sigint() -> None:
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            peerkit_cmd("broker", "--port", "0"), stdout=subprocess.PIPE
        )
        assert process.stdout is not None
        try:
            first = await read_line(process.stdout, bytearray())
            assert first.startswith("peerkit broker listening on ws://127.0.0.1:")
            url = first.rsplit(" ", 1)[1]
            # a configured peer gets ready: the command serves a config server too
            peer = Ticker(url, "client", config_timeout=20)
            async with trio.open_nursery() as nursery:
                await nursery.start(peer.run)
                await peer.wait_for_state(lambda p: p.is_running, 20)
                process.send_signal(signal.SIGINT)
                await peer.wait_finished()  # told by BrokerShutdownMsg
            assert peer.error is None
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def test_run_says_connected_then_running(broker: Broker, nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        config_server = ConfigServer(broker.url)
        await nursery.start(config_server.run)
        cmd = peerkit_cmd("run", "launchpeers:Ticker", "--broker", broker.url, "--id", "t")
        process = await trio.lowlevel.open_process(
            [*cmd, "-p", "rate", "20", "--no-autostart"],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stdout is not None and process.stderr is not None
        try:
            out = bytearray()
            line = await read_line(process.stdout, out)
            assert line == f"peerkit run: peer 't' connected to {broker.url}"
            await config_server.wait_for(lambda reg: reg.is_ready("t"), 20)
            assert config_server.snapshot().peers[0].params == {"rate": 20.0}
            async with Peer(broker.url, "driver") as driver:
                await driver.ask_peer("t", PeerControlMessage(peer_id="t", action="start"))
            assert await read_line(process.stdout, out) == "peerkit run: peer 't' running"
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        err = (await process.stderr.receive_some(1 << 20)).decode()
        assert "SIGTERM received, shutting down" in err


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
async def test_run_log_level(level: str, broker: Broker) -> None:
    with trio.fail_after(30):
        cmd = peerkit_cmd("run", "launchpeers:Sleeper", "--broker", broker.url, "--id", "s")
        process = await trio.lowlevel.open_process(
            [*cmd, "--log-level", level], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert process.stdout is not None and process.stderr is not None
        try:
            assert (await read_line(process.stdout, bytearray())).endswith(
                "connected to " + broker.url
            )
            async with Peer(broker.url, "driver") as driver:
                await driver.ask_peer("s", PeerControlMessage(peer_id="s", action="close"))
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        err = (await process.stderr.receive_some(1 << 20)).decode()
    # the peer logs the control action at INFO
    assert ("INFO    peerkit.peer: peer 's': control action 'close'" in err) == (level == "INFO")


async def test_a_peer_error_is_shown_once(broker: Broker, nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        config_server = ConfigServer(broker.url)
        await nursery.start(config_server.run)
        result = await run_cli("run", "launchpeers:Crasher", "--broker", broker.url,
                               "--id", "crasher", "-p", "message", "kaput")  # fmt: skip
    assert result.returncode == 1
    err = result.stderr.decode()
    # one log record (with its traceback), and no second or third copy of the error
    assert err.count("Traceback (most recent call last)") == 1
    records = [line for line in err.splitlines() if re.match(r"\d{4}-", line) and "kaput" in line]
    assert len(records) == 1 and records[0].endswith(
        "ERROR   peerkit.peer: peer 'crasher' failed: RuntimeError: kaput"
    )
    assert "peerkit run:" not in err
    connected, *running = result.stdout.decode().splitlines()
    assert connected == f"peerkit run: peer 'crasher' connected to {broker.url}"
    # it dies as it starts: the command may see it running or not
    assert running in ([], ["peerkit run: peer 'crasher' running"])


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
async def test_launch_log_level_reaches_the_peer_processes(level: str, tmp_path: Path) -> None:
    path = write_experiment(tmp_path, '[peers.sleeper]\nclass = "launchpeers:Sleeper"\n')
    run_dir = tmp_path / "run"
    with trio.fail_after(60):
        result = await run_cli("launch", str(path), "--duration", "0.2", "--view", "log",
                               "--run-dir", str(run_dir), "--log-level", level)  # fmt: skip
    assert result.returncode == 0, result
    log = (run_dir / "sleeper.log").read_text()
    assert "peerkit run: peer 'sleeper' running" in log
    # the peer process logs its start at INFO
    assert ("INFO    launchpeers: sleeper: run directory" in log) == (level == "INFO")


def test_the_command_leaves_the_root_logger_as_it_found_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    assert main(["peers", "--broker", f"ws://127.0.0.1:{closed_port()}"]) == 1
    assert (list(root.handlers), root.level) == before


async def test_the_library_leaves_logging_to_the_application(broker: Broker) -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    with trio.fail_after(30):
        async with ConfigServer(broker.url), Ticker(broker.url, "t") as peer:
            await peer.wait_for_state(lambda p: p.is_running, 20)
    assert (list(root.handlers), root.level) == before
