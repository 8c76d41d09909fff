"""ConfigServer and ConfiguredPeer over a real broker: gating, propagation, remote set."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from peerkit import Broker, ConfigServer, ConfiguredPeer, Peer, param
from peerkit.config_messages import (
    ConfigParams,
    ConfigParamsRequest,
    ConfigSnapshot,
    ConfigSnapshotQuery,
    ParamsChanged,
    PeerSetParamQuery,
    RegisterPeerConfig,
)
from peerkit.config_server import ConfigTimeout, DependencyLost
from peerkit.errors import BrokerLostError
from peerkit.messages import ErrorMsg, OkMsg, PanickMsg, PeerControlMessage, PeerReady
from peerkit.params import ConfigError, ParamTypeError, UnknownParamError, parse_overrides


class Amp(ConfiguredPeer):
    sampling_rate: int = param(256)
    channels: list[str] = param(["C3", "Cz"])
    gain: float = param(1.0)


class Filter(ConfiguredPeer):
    rate: int = param()
    order: int = param(4)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.changes: list[dict[str, Any]] = []
        self.changed = trio.Event()

    async def _params_changed(self, changed: dict[str, Any]) -> None:
        self.changes.append(changed)
        self.changed.set()
        self.changed = trio.Event()


@pytest.fixture
async def config_server(broker: Broker, nursery: trio.Nursery) -> AsyncIterator[ConfigServer]:
    cs = ConfigServer(broker.url)
    await nursery.start(cs.run)
    yield cs
    await cs.async_shutdown()


async def ready(*peers: Peer, timeout: float = 5) -> None:
    for p in peers:
        await p.wait_for_state(lambda q: q.is_ready, timeout)


# ----------------------------------------------------------------------------- construction


def test_constructor_precedence_and_unknown_params(tmp_path: Path) -> None:
    f = tmp_path / "amp.toml"
    f.write_text("[local_params]\nsampling_rate = 128\ngain = 2\n")
    ov = tmp_path / "override.toml"
    ov.write_text("[local_params]\nchannels = ['O1']\ngain = 4.0\n")
    kw = parse_overrides(["-p", "gain", "3.5", "-f", str(ov)])
    # defaults < config files < constructor arguments < -f files < -p
    amp = Amp(
        "ws://127.0.0.1:1",
        "amp",
        config_files=[f],
        local_params={"sampling_rate": 512, "channels": ["X"], "gain": 5.0},
        **kw,
    )
    assert amp.sampling_rate == 512 and amp.get_param("gain") == 3.5
    assert amp.channels == ["O1"] and "override.toml" in amp.config.sources["channels"]
    amp = Amp("ws://127.0.0.1:1", "amp", local_params={"sampling_rate": 512}, **kw)
    assert amp.has_param("gain") and not amp.has_param("x")
    assert amp.param_values() == {"sampling_rate": 512, "channels": ["O1"], "gain": 3.5}
    assert Amp("ws://127.0.0.1:1", "a2", config_files=str(f)).get_param("gain") == 2.0
    with pytest.raises(UnknownParamError, match=r"'rate' in local_params .*sampling_rate"):
        Amp("ws://127.0.0.1:1", "amp", local_params={"rate": 1})
    with pytest.raises(UnknownParamError, match="has no parameter 'rate'"):
        amp.get_param("rate")
    with pytest.raises(ParamTypeError, match=r"'sampling_rate' \(constructor argument\)"):
        Amp("ws://127.0.0.1:1", "amp", local_params={"sampling_rate": "abc"})
    with pytest.raises(ParamTypeError, match=r"'sampling_rate' \(command line -p sampling_rate\)"):
        Amp("ws://127.0.0.1:1", "amp", **parse_overrides(["-p", "sampling_rate", "abc"]))
    with pytest.raises(UnknownParamError, match=r"'rate' in external_params \(command line\)"):
        Amp("ws://127.0.0.1:1", "amp", **parse_overrides(["-e", "rate", "x.y"]))
    with pytest.raises(ConfigError, match="'rate' of 'f' has no value"):
        Filter("ws://127.0.0.1:1", "f")
    with pytest.raises(AttributeError, match="set_param"):
        amp.gain = 3.0


# ----------------------------------------------------------------------------- gating


async def test_dependency_gating_order(broker: Broker, config_server: ConfigServer) -> None:
    with trio.fail_after(10):
        order: list[str] = []
        gate = trio.Event()

        class Slow(Amp):
            async def _connections_established(self) -> None:
                await gate.wait()
                order.append("amp connections established")

        class Dependent(Filter):
            async def _dependencies_are_ready(self) -> None:
                assert amp.is_ready
                order.append("filter dependencies ready")

            async def _connections_established(self) -> None:
                order.append("filter connections established")

            async def _start(self) -> None:
                order.append("filter started")

        amp = Slow(broker.url, "amp")
        flt = Dependent(
            broker.url,
            "filter",
            external_params={"rate": "source.sampling_rate"},
            config_sources={"source": "amp"},
            launch_dependencies={"source": ""},
        )
        observer = Peer(broker.url, "observer")
        async with observer, observer.subscription(PeerReady) as readies, flt:
            await config_server.wait_for(lambda r: "filter" in r.peers, 5)
            assert flt.is_connected and not flt.is_ready
            async with amp:
                await config_server.wait_for(lambda r: "amp" in r.peers, 5)
                assert not amp.is_ready and not flt.is_ready
                gate.set()
                await ready(amp, flt)
                await flt.wait_for_state(lambda p: p.is_running, 5)
                assert flt.rate == 256
                first, second = await readies.receive(), await readies.receive()
                assert [first.sender, second.sender] == ["amp", "filter"]
        assert order == [
            "amp connections established",
            "filter dependencies ready",
            "filter connections established",
            "filter started",
        ]


async def test_peer_waits_for_config_server_to_appear(
    broker: Broker, nursery: trio.Nursery
) -> None:
    with trio.fail_after(10):
        async with Amp(broker.url, "amp") as amp:
            assert amp.is_connected and not amp.is_ready
            cs = ConfigServer(broker.url)
            await nursery.start(cs.run)
            await cs.wait_until_ready(["amp"], 5)
            assert amp.is_ready
        await cs.async_shutdown()


async def test_external_chain(broker: Broker, config_server: ConfigServer) -> None:
    with trio.fail_after(10):

        class Middle(ConfiguredPeer):
            rate: int = param()

        a = Filter(broker.url, "a", external_params={"rate": "b.rate"}, autostart=False)
        b = Middle(broker.url, "b", external_params={"rate": "c.sampling_rate"})
        c = Amp(broker.url, "c", local_params={"sampling_rate": 1000})
        async with a, b:
            await config_server.wait_for(lambda r: {"a", "b"} <= set(r.peers), 5)
            assert not a.is_ready and not b.is_ready
            async with c:
                await ready(a, b, c)
                assert a.rate == b.rate == 1000
                await b.wait_for_state(lambda p: p.is_running, 5)
                changed = a.changed
                await c.set_param("sampling_rate", 2000)
                await changed.wait()
                assert a.rate == 2000 and a.changes == [{"rate": 2000}]
                assert b.is_running and b.get_param("rate") == 1000  # b defers while running
                reply = await a.ask_peer("config_server", ConfigParamsRequest(peer_id="a"))
                assert isinstance(reply, ConfigParams) and reply.params == {
                    "rate": 2000,
                    "order": 4,
                }


# ----------------------------------------------------------------------------- set_param


async def test_set_param_propagates_and_running_dependent_defers(
    broker: Broker, config_server: ConfigServer
) -> None:
    with trio.fail_after(10):
        amp = Amp(broker.url, "amp", autostart=False)
        flt = Filter(
            broker.url,
            "filter",
            external_params={"rate": "amp.sampling_rate"},
            launch_dependencies=["amp"],
            autoshutdown=False,
        )
        async with amp, flt:
            await ready(amp, flt)
            await flt.wait_for_state(lambda p: p.is_running, 5)
            seen = trio.Event()  # runs after the peer's own ParamsChanged handler
            await flt.subscribe_for_specific_msg_subtype(
                ParamsChanged, "config_server", lambda m: seen.set()
            )
            await amp.set_param("sampling_rate", 300)
            await seen.wait()
            assert flt.rate == 256 and flt.changes == []  # deferred while running
            seen = trio.Event()
            await amp.set_param("sampling_rate", 400)
            await seen.wait()
            assert amp.sampling_rate == 400
            await flt.stop()
            assert flt.rate == 400 and flt.changes == [{"rate": 400}]  # nothing lost
            # not running: applied at once
            changed = flt.changed
            await amp.set_param("sampling_rate", 500)
            await changed.wait()
            assert flt.rate == 500 and flt.changes[-1] == {"rate": 500}
            # setting an unchanged value is a no-op; wrong types and externals are refused
            await amp.set_param("sampling_rate", 500)
            with pytest.raises(ParamTypeError, match=r"'sampling_rate' \(set_param\)"):
                await amp.set_param("sampling_rate", "fast")
            with pytest.raises(ConfigError, match="is external"):
                await flt.set_param("rate", 3)
            with pytest.raises(UnknownParamError):
                await amp.set_param("nope", 3)
            assert config_server.registry.peers["amp"].params["sampling_rate"] == 500


async def test_changes_deferred_while_running_apply_after_a_remote_stop(
    broker: Broker, config_server: ConfigServer
) -> None:
    with trio.fail_after(10):
        amp = Amp(broker.url, "amp", autostart=False)
        flt = Filter(
            broker.url,
            "filter",
            external_params={"rate": "amp.sampling_rate"},
            launch_dependencies=["amp"],
            autoshutdown=False,
        )
        async with amp, flt, Peer(broker.url, "ctl") as ctl:
            await flt.wait_for_state(lambda p: p.is_running, 5)
            seen = trio.Event()
            await flt.subscribe_for_specific_msg_subtype(
                ParamsChanged, "config_server", lambda m: seen.set()
            )
            await amp.set_param("sampling_rate", 300)
            await seen.wait()
            assert flt.rate == 256  # deferred while running
            # the launcher's way of stopping a peer: a control query
            reply = await ctl.ask_peer(
                "filter", PeerControlMessage(peer_id="filter", action="stop")
            )
            assert isinstance(reply, OkMsg) and flt.is_ready and not flt.is_running
            assert flt.rate == 300 and flt.changes == [{"rate": 300}]
            changed = flt.changed
            await amp.set_param("sampling_rate", 400)  # ready, not running: applied at once
            await changed.wait()
            assert flt.rate == 400 and flt.changes[-1] == {"rate": 400}


async def test_remote_set_param(broker: Broker, config_server: ConfigServer) -> None:
    with trio.fail_after(10):
        amp = Amp(broker.url, "amp")
        flt = Filter(
            broker.url, "filter", external_params={"rate": "amp.sampling_rate"}, autoshutdown=False
        )
        async with amp, flt, Peer(broker.url, "remote") as remote:
            await ready(amp, flt)
            reply = await remote.ask_peer("amp", PeerSetParamQuery(key="sampling_rate", value=1024))
            assert isinstance(reply, OkMsg) and amp.sampling_rate == 1024
            # strings are parsed with the declared type
            reply = await remote.ask_peer("amp", PeerSetParamQuery(key="sampling_rate", value="12"))
            assert isinstance(reply, OkMsg) and amp.sampling_rate == 12
            reply = await remote.ask_peer(
                "amp", PeerSetParamQuery(key="channels", value='["O1", "O2"]')
            )
            assert isinstance(reply, OkMsg) and amp.channels == ["O1", "O2"]
            await flt.stop()
            await amp.set_param("gain", 2.5)
            for key, value, code, fragment in [
                ("nope", 1, "unknown_param", "no parameter 'nope'"),
                ("sampling_rate", "abc", "wrong_type", "'abc' is not an int"),
                ("sampling_rate", 1.5, "wrong_type", "expected int, got float"),
                ("rate", 3, "external_param", "comes from amp.sampling_rate"),
            ]:
                target = "filter" if key == "rate" else "amp"
                reply = await remote.ask_peer(target, PeerSetParamQuery(key=key, value=value))
                assert isinstance(reply, ErrorMsg) and reply.code == code, reply
                assert fragment in reply.details
            assert amp.sampling_rate == 12 and flt.rate == 12
            snap = await remote.ask_peer("config_server", ConfigSnapshotQuery())
            assert isinstance(snap, ConfigSnapshot)
            info = {p.peer_id: p for p in snap.peers}
            assert info["amp"].params == {
                "sampling_rate": 12,
                "channels": ["O1", "O2"],
                "gain": 2.5,
            }
            assert info["filter"].params == {"rate": 12, "order": 4}
            assert info["filter"].external_params == {"rate": "amp.sampling_rate"}
            assert info["amp"].types["channels"] == "list[str]"
            assert info["amp"].ready and info["filter"].ready


# ----------------------------------------------------------------------------- timeouts


async def test_dependency_that_never_arrives(
    broker: Broker, config_server: ConfigServer, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        flt = Filter(
            broker.url,
            "filter",
            local_params={"rate": 1},
            launch_dependencies={"amp": "ghost"},
            config_timeout=10,
        )
        start = trio.current_time()
        with pytest.raises(ConfigTimeout) as info:
            await flt.run()
        assert 10 <= trio.current_time() - start < 12
        text = str(info.value)
        assert "'filter' was not ready within 10.0 s" in text
        assert "launch dependencies" in text
        assert "filter → ghost: peer 'ghost' has not registered" in text
        # it unregistered when it died
        await config_server.wait_for(lambda r: "filter" not in r.peers, 5)
        assert "ConfigTimeout" in config_server.registry.gone["filter"]


async def test_missing_external_source_times_out(
    broker: Broker, config_server: ConfigServer, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):

        class Middle(ConfiguredPeer):
            rate: int = param()

        b = Middle(
            broker.url, "b", external_params={"rate": "ghost.sampling_rate"}, config_timeout=30
        )
        flt = Filter(broker.url, "a", external_params={"rate": "b.rate"}, config_timeout=5)
        async with b:
            with pytest.raises(ConfigTimeout) as info:
                await flt.run()
            assert not b.is_ready
        assert (
            "still waiting for external parameters: rate: "
            "a.rate ← b.rate ← ghost.sampling_rate: peer 'ghost' has not registered"
            in str(info.value)
        )


async def test_dependency_cycle_times_out_naming_the_cycle(
    broker: Broker, config_server: ConfigServer, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        errors: dict[str, BaseException] = {}
        x = Amp(broker.url, "x", launch_dependencies=["y"], config_timeout=5)
        y = Amp(broker.url, "y", launch_dependencies=["x"], config_timeout=5)

        async def run(p: Peer) -> None:
            try:
                await p.run()
            except ConfigError as exc:
                errors[p.peer_id] = exc

        async with trio.open_nursery() as n:
            n.start_soon(run, x)
            n.start_soon(run, y)
        assert set(errors) == {"x", "y"}
        assert "cycle x → y → x" in str(errors["x"]) or "cycle y → x → y" in str(errors["y"])
        assert all("cycle" in str(e) for e in errors.values())
        assert any(isinstance(e, ConfigTimeout) for e in errors.values())


async def test_no_config_server_times_out(broker: Broker, autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(60):
        amp = Amp(broker.url, "amp", config_timeout=3)
        with pytest.raises(
            ConfigTimeout, match=r"waiting for the config server 'config_server'.*not connected"
        ):
            await amp.run()


# ----------------------------------------------------------------------------- deaths


async def test_dependency_dying_while_others_wait(
    broker: Broker, config_server: ConfigServer
) -> None:
    with trio.fail_after(10):
        gate = trio.Event()

        class Doomed(Amp):
            async def _connections_established(self) -> None:
                await gate.wait()
                raise RuntimeError("amplifier on fire")

        amp = Doomed(broker.url, "amp")
        flt = Filter(broker.url, "filter", local_params={"rate": 1}, launch_dependencies=["amp"])
        amp_error: list[BaseException] = []

        async def run_amp() -> None:
            try:
                await amp.run()
            except RuntimeError as exc:
                amp_error.append(exc)

        async def run_filter() -> None:
            with pytest.raises(DependencyLost, match=r"dependency 'amp'.*died.*amplifier on fire"):
                await flt.run()

        async with trio.open_nursery() as n:
            n.start_soon(run_amp)
            await config_server.wait_for(lambda r: "amp" in r.peers, 5)
            n.start_soon(run_filter)
            await config_server.wait_for(lambda r: "filter" in r.peers, 5)
            assert not flt.is_ready
            gate.set()
        assert amp_error and "fire" in str(amp_error[0])
        assert "amp" not in config_server.registry.peers


async def test_panick_removes_peer_and_tells_waiters(
    broker: Broker, config_server: ConfigServer
) -> None:
    with trio.fail_after(10):
        async with Peer(broker.url, "fake") as fake:
            reply = await fake.ask_peer("config_server", RegisterPeerConfig(params={"x": 1}))
            assert isinstance(reply, OkMsg)
            flt = Filter(
                broker.url, "filter", local_params={"rate": 1}, launch_dependencies=["fake"]
            )
            async with trio.open_nursery() as n:

                async def run() -> None:
                    with pytest.raises(DependencyLost, match=r"'fake' died .*PeerLost: gone"):
                        await flt.run()

                n.start_soon(run)
                await config_server.wait_for(lambda r: "filter" in r.peers, 5)
                await fake.send_message(PanickMsg(message="gone", error_type="PeerLost"))
        assert "fake" in config_server.registry.gone


async def test_dependency_losing_its_connection_while_others_wait(
    broker: Broker, config_server: ConfigServer
) -> None:
    with trio.fail_after(10):

        class Stuck(Amp):
            async def _connections_established(self) -> None:
                await trio.sleep_forever()

        amp = Stuck(broker.url, "amp")
        flt = Filter(
            broker.url,
            "filter",
            external_params={"rate": "amp.no_such_param"},  # keeps it waiting for params
            launch_dependencies=["amp"],
        )

        async def run_amp() -> None:
            with pytest.raises(BrokerLostError):
                await amp.run()

        async def run_filter() -> None:
            with pytest.raises(
                DependencyLost, match=r"filter → amp: peer 'amp' died .*without goodbye"
            ):
                await flt.run()

        async with trio.open_nursery() as n:
            n.start_soon(run_amp)
            n.start_soon(run_filter)
            await config_server.wait_for(lambda r: {"amp", "filter"} <= set(r.peers), 5)
            assert (
                "no parameter 'no_such_param'"
                in config_server.registry.waiting_for("filter")["rate"]
            )
            await amp._link.abort()  # no goodbye
        assert "without goodbye" in config_server.registry.gone["amp"]
        assert "amp" not in config_server.registry.peers


async def test_ready_dependent_is_told_when_dependency_leaves(
    broker: Broker, config_server: ConfigServer
) -> None:
    with trio.fail_after(10):
        lost = trio.Event()
        got: list[tuple[str, str]] = []

        class Watcher(Filter):
            async def _dependency_lost(self, peer_id: str, detail: str) -> None:
                got.append((peer_id, detail))
                lost.set()

        flt = Watcher(
            broker.url,
            "filter",
            external_params={"rate": "amp.sampling_rate"},
            launch_dependencies=["amp"],
        )
        async with flt:
            async with Amp(broker.url, "amp") as amp:
                await ready(amp, flt)
            await lost.wait()
            assert got == [("amp", "left")]
            assert config_server.registry.gone == {"amp": "left"}
            assert flt.is_running  # it decides itself what to do


async def test_config_server_restart_reregisters(broker: Broker, nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        cs = ConfigServer(broker.url)
        await nursery.start(cs.run)
        async with Amp(broker.url, "amp"):
            await cs.wait_until_ready(["amp"], 5)
            await cs.async_shutdown()
            cs2 = ConfigServer(broker.url)
            await nursery.start(cs2.run)
            await cs2.wait_until_ready(["amp"], 5)
            assert cs2.snapshot().peers[0].params["sampling_rate"] == 256
        await cs2.async_shutdown()


async def test_wait_until_ready_embedded(
    broker: Broker, config_server: ConfigServer, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        async with Amp(broker.url, "amp") as amp:
            await config_server.wait_until_ready(["amp"], 5)
            assert amp.is_ready
            with pytest.raises(ConfigTimeout, match="'ghost' has not registered"):
                await config_server.wait_until_ready(["amp", "ghost"], 2)
        with pytest.raises(DependencyLost, match="'amp' left"):
            await config_server.wait_until_ready(["amp"], 2)


async def test_config_server_restart_while_a_peer_waits(
    broker: Broker, nursery: trio.Nursery
) -> None:
    with trio.fail_after(10):
        cs = ConfigServer(broker.url)
        await nursery.start(cs.run)
        flt = Filter(broker.url, "filter", local_params={"rate": 1}, launch_dependencies=["amp"])
        async with flt:
            await cs.wait_for(lambda r: "filter" in r.peers, 5)
            await cs.async_shutdown()
            cs2 = ConfigServer(broker.url)
            await nursery.start(cs2.run)
            await cs2.wait_for(lambda r: "filter" in r.peers, 5)  # it registered again
            assert not flt.is_ready
            async with Amp(broker.url, "amp"):
                await cs2.wait_until_ready(["amp", "filter"], 5)
        await cs2.async_shutdown()


@pytest.mark.parametrize("attempt", range(3))
async def test_shutdown_right_as_the_peer_becomes_ready_is_clean(
    broker: Broker, config_server: ConfigServer, nursery: trio.Nursery, attempt: int
) -> None:
    with trio.fail_after(10):
        amp = Amp(broker.url, "amp")
        await nursery.start(amp.run)
        await config_server.wait_for(lambda r: r.is_ready("amp"), 5)
        await amp.async_shutdown()
        assert amp.is_finished and amp.error is None


# ----------------------------------------------------------------------------- docs


async def test_worked_example_of_the_docs_runs(capsys: pytest.CaptureFixture[str]) -> None:
    text = (Path(__file__).parent.parent / "docs" / "configuration.rst").read_text()
    block = text.split("A worked example", 1)[1].split(".. code-block:: python\n", 1)[1]
    lines = []
    for line in block.splitlines()[1:]:
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    source = "\n".join(lines).strip()
    assert source.endswith("trio.run(main)")
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(source.removesuffix("trio.run(main)"), "configuration.rst", "exec"), namespace)
    with trio.fail_after(10):
        await namespace["main"]()
    out = capsys.readouterr().out
    assert "filter: amplifier ready, rate = 512" in out
    assert "filter: parameters changed: {'rate': 1024}" in out
    assert "('filter', True, {'order': 6, 'rate': 1024})" in out
