"""peerkit's pytest plugin, used as a user would: test files written to a temporary directory
that import no fixture, run by pytest (pytester), in-process and in a fresh interpreter."""

from __future__ import annotations

import importlib.metadata
import textwrap

import pytest

pytest_plugins = ["pytester"]

PLUGIN = "peerkit.pytest_plugin"


def entry_point_installed() -> bool:
    return any(ep.value == PLUGIN for ep in importlib.metadata.entry_points(group="pytest11"))


needs_entry_point = pytest.mark.skipif(
    not entry_point_installed(),
    reason="peerkit's pytest11 entry point is not installed in this environment "
    "(reinstall peerkit: pip install -e .)",
)

TRIO_MODE_INI = "[pytest]\ntrio_mode = true\n"

#: A user's test file: peerkit imported for its classes, no fixture imported.
USER_TESTS = textwrap.dedent(
    """
    import pytest
    import trio

    from peerkit import ConfiguredPeer, Message, Peer, message, param

    @message(type="plugtest.Ping")
    class Ping(Message):
        n: int

    class Counter(Peer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen = []
            self.got = trio.Event()

        async def _connections_established(self):
            await self.subscribe_for_all_msg_subtype(Ping, self.on_ping)

        def on_ping(self, msg):
            self.seen.append((msg.sender, msg.n))
            self.got.set()

    class Amp(ConfiguredPeer):
        rate: int = param(256, doc="samples per second")

    made = []

    async def test_broker_on_a_free_loopback_port(peerkit_broker):
        assert peerkit_broker.url.startswith("ws://127.0.0.1:")
        assert not peerkit_broker.url.endswith(":0")

    async def test_peers_talk(peerkit_peer, autojump_clock):
        with trio.fail_after(10):
            counter = await peerkit_peer(Counter, "counter")
            plain = await peerkit_peer(peer_id="plain")
            assert type(plain) is Peer and counter.is_connected
            await counter.wait_for_state(lambda p: p.is_ready, 5)
            await plain.send_message(Ping(n=7))
            await counter.got.wait()
            assert counter.seen == [("plain", 7)]
            made.extend([counter, plain])

    async def test_peers_were_shut_down_after_the_previous_test():
        assert [p.is_finished for p in made] == [True, True]
        assert [p.error for p in made] == [None, None]

    async def test_options_and_the_same_id_in_another_test(peerkit_peer):
        with trio.fail_after(10):
            peer = await peerkit_peer(Counter, "counter", autostart=False, grace_period=1)
            await peer.wait_for_state(lambda p: p.is_ready, 5)
            assert not peer.is_running and peer.grace_period == 1

    async def test_config_server(peerkit_config_server, peerkit_peer, autojump_clock):
        with trio.fail_after(10):
            assert peerkit_config_server.peer_id == "config_server"
            assert peerkit_config_server.is_ready
            amp = await peerkit_peer(Amp, "amp", local_params={"rate": 512})
            await amp.wait_for_state(lambda p: p.is_ready, 5)
            assert amp.rate == 512
            assert "amp" in [p.peer_id for p in peerkit_config_server.snapshot().peers]

    @pytest.mark.parametrize("peerkit_broker_options", [{"token": "s3cret"}])
    async def test_broker_options(peerkit_broker, peerkit_peer):
        with trio.fail_after(10):
            peer = await peerkit_peer(peer_id="with-token", token="s3cret")
            assert peer.is_connected
    """
)


def run_inprocess(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # explicit -p: these runs test the fixtures even where the entry point is not installed
    # (where it is, -p of the same name is a no-op)
    return pytester.runpytest_inprocess("-p", PLUGIN, "-p", "no:cacheprovider", *args)


def test_fixtures_with_trio_mode(pytester: pytest.Pytester) -> None:
    pytester.makeini(TRIO_MODE_INI)
    pytester.makepyfile(test_user=USER_TESTS)
    result = run_inprocess(pytester, "-v")
    result.assert_outcomes(passed=6)


def test_fixtures_with_the_trio_mark(pytester: pytest.Pytester) -> None:
    marked = USER_TESTS.replace("\nasync def test_", "\n@pytest.mark.trio\nasync def test_")
    assert marked.count("@pytest.mark.trio") == 6
    pytester.makepyfile(test_user=marked)  # no ini: no trio_mode
    result = run_inprocess(pytester, "-v")
    result.assert_outcomes(passed=6)


def test_failing_cases_fail_the_test_with_the_reason(pytester: pytest.Pytester) -> None:
    pytester.makeini(TRIO_MODE_INI)
    pytester.makepyfile(
        test_failing=textwrap.dedent(
            """
            import trio
            from peerkit import Peer

            class Broken(Peer):
                async def _start(self):
                    raise ValueError("the amplifier is on fire")

            async def test_a_peer_that_dies_fails_the_test(peerkit_peer):
                with trio.fail_after(10):
                    peer = await peerkit_peer(Broken, "broken")
                    await peer.wait_finished()

            async def test_class_first(peerkit_peer):
                await peerkit_peer("broken")

            async def test_an_assertion(peerkit_broker):
                assert peerkit_broker.url == "nowhere"

            async def test_duplicate_id(peerkit_peer):
                with trio.fail_after(10):
                    await peerkit_peer(peer_id="twin")
                    await peerkit_peer(peer_id="twin")
            """
        )
    )
    result = run_inprocess(pytester)
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(
        [
            "*ValueError: the amplifier is on fire*",
            "*peerkit_peer takes the peer class first*",
            "*assert 'ws://127.0.0.1:*' == 'nowhere'*",
            "*DuplicatePeerId*twin*",
        ],
        consecutive=False,
    )


@needs_entry_point
def test_entry_point_no_import_no_pytest_plugins_line(pytester: pytest.Pytester) -> None:
    """A fresh interpreter: the fixtures come from the installed entry point alone."""
    pytester.makeini(TRIO_MODE_INI)
    pytester.makepyfile(test_user=USER_TESTS)
    assert "pytest_plugins" not in USER_TESTS
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=6)


@needs_entry_point
def test_entry_point_and_pytest_plugins_line_do_not_clash(pytester: pytest.Pytester) -> None:
    pytester.makeini(TRIO_MODE_INI)
    pytester.makeconftest('pytest_plugins = ["peerkit.testing", "peerkit.pytest_plugin"]\n')
    pytester.makepyfile(
        test_both=textwrap.dedent(
            """
            async def test_old_and_new_fixtures(broker, peerkit_broker, peerkit_peer):
                peer = await peerkit_peer(peer_id="p")
                assert peer.broker_url == peerkit_broker.url != broker.url
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


@needs_entry_point
def test_fixtures_absent_when_the_plugin_is_disabled(pytester: pytest.Pytester) -> None:
    """The deliberate break: without the plugin the same test cannot find its fixture."""
    pytester.makeini(TRIO_MODE_INI)
    pytester.makepyfile(
        test_user="async def test_broker(peerkit_broker):\n    assert peerkit_broker.url\n"
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", f"no:{PLUGIN}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'peerkit_broker' not found*"])
    # and with it, it passes
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
