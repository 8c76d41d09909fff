"""The ``peerkit`` command: help, exit statuses, and each subcommand against real brokers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from launchhelpers import write_experiment
from launchpeers import Ticker

from peerkit import Broker, ConfigServer, Peer
from peerkit.cli import main

TESTS = Path(__file__).parent
COMMANDS = ["broker", "run", "launch", "ctl", "peers"]


def peerkit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "peerkit", *args]


async def run_main(argv: Sequence[str]) -> int:
    """``peerkit ARGV`` in a worker thread (it runs its own trio loop)."""
    return await trio.to_thread.run_sync(main, list(argv))


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: peerkit")
    if command is None:
        assert all(c in out for c in COMMANDS)
    if command == "run":
        assert "-p NAME VALUE" in out and "-f FILE" in out


async def test_python_dash_m_peerkit() -> None:
    with trio.fail_after(20):
        result = await trio.run_process(peerkit_cmd("--help"), capture_stdout=True)
    assert b"usage: peerkit" in result.stdout


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
    assert "duration must be a positive number of seconds, got -1.0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["nosuchmodule:Peer"], "cannot import module 'nosuchmodule'"),
        (["launchpeers:Sleeper", "-p", "x", "1"], "is not a ConfiguredPeer"),
        (["launchpeers:Ticker", "-p", "rate", "fast"], "'fast' is not a float"),
        (["launchpeers:Ticker", "-p", "speed", "1"], "unknown parameter 'speed'"),
        (["launchpeers:Ticker", "--broker", "http://x"], "must be a ws:// or wss:// URL"),
    ],
)
def test_run_usage_errors_exit_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", *argv]) == 2
    assert expected in capsys.readouterr().err


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
        assert "peer 'nobody' is not connected" in capsys.readouterr().err
        assert await run_main(["peers", "--broker", broker.url]) == 0
        assert capsys.readouterr().out == "no peers connected\n"


async def test_peers_without_a_broker_fails(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(20):
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.close()  # nothing listens there now
        argv = ["peers", "--broker", f"ws://127.0.0.1:{port}", "--timeout", "0.5"]
        assert await run_main(argv) == 1
    assert "could not connect to the broker" in capsys.readouterr().err


async def test_broker_command_serves_until_sigint() -> None:
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            peerkit_cmd("broker", "--port", "0"), stdout=subprocess.PIPE
        )
        assert process.stdout is not None
        try:
            output = b""
            while b"\n" not in output:
                output += await process.stdout.receive_some()
            first = output.decode().splitlines()[0]
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


async def test_run_command(broker: Broker, nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        config_server = ConfigServer(broker.url)
        await nursery.start(config_server.run)
        env = {**os.environ, "PYTHONPATH": str(TESTS)}
        cmd = peerkit_cmd("run", "launchpeers:Ticker", "--broker", broker.url, "--id", "t")
        process = await trio.lowlevel.open_process(
            [*cmd, "-p", "rate", "20"], env=env, stderr=subprocess.PIPE
        )
        try:
            await config_server.wait_for(lambda reg: reg.is_ready("t"), 20)
            assert config_server.snapshot().peers[0].params == {"rate": 20.0}
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.stderr is not None
        err = (await process.stderr.receive_some(1 << 20)).decode()
        assert "SIGTERM received, shutting down" in err

        # a peer that dies of an error: exit status 1, the error on stderr
        cmd = peerkit_cmd("run", "launchpeers:Crasher", "--broker", broker.url)
        result = await trio.run_process(
            [*cmd, "-p", "message", "kaput"], env=env, check=False, capture_stderr=True
        )
        assert result.returncode == 1
        assert b"peerkit run: RuntimeError: kaput" in result.stderr
