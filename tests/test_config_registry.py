"""Sans-IO tests of the config server's registry: chains, cycles, readiness, propagation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerkit.config_registry import ConfigRegistry
from peerkit.params import MISSING, ConfigError, UnknownParamError


def chain_registry() -> ConfigRegistry:
    reg = ConfigRegistry()
    reg.register("a", {"own": 1}, {"z": ("b", "y")}, {"b": "b"})
    reg.register("b", {}, {"y": ("c", "x")}, {"c": "c"})
    return reg


def test_resolve_follows_chains_and_explains_missing() -> None:
    reg = chain_registry()
    value, why = reg.resolve("a", "z")
    assert value is MISSING
    assert why == "a.z ← b.y ← c.x: peer 'c' has not registered with the config server"
    reg.register("c", {"x": 5})
    assert reg.resolve("a", "z") == (5, "")
    assert reg.external_values("a") == ({"z": 5}, {})
    assert reg.params_of("a") == ({"own": 1, "z": 5}, {})


def test_resolve_unknown_param_and_cycle() -> None:
    reg = ConfigRegistry()
    reg.register("a", {}, {"p": ("b", "q")})
    reg.register("b", {}, {"q": ("a", "p")})
    value, why = reg.resolve("a", "p")
    assert value is MISSING and why == "cycle a.p ← b.q ← a.p"
    reg.register("c", {}, {"r": ("d", "nope")})
    reg.register("d", {"yes": 1})
    assert reg.resolve("c", "r")[1] == "c.r ← d.nope: peer 'd' has no parameter 'nope'"


def test_update_propagates_through_chains() -> None:
    reg = chain_registry()
    changes = reg.register("c", {"x": 5})
    assert changes == {"c": {"x": 5}, "b": {"y": 5}, "a": {"z": 5}}
    assert reg.update_params("c", {"x": 6}) == {"c": {"x": 6}, "b": {"y": 6}, "a": {"z": 6}}
    assert reg.update_params("c", {"x": 6}) == {}  # unchanged
    assert reg.update_params("c", {"x": 6.0}) != {}  # a change of type is a change
    with pytest.raises(UnknownParamError):
        reg.update_params("c", {"nope": 1})
    with pytest.raises(ConfigError, match="external parameter"):
        reg.update_params("b", {"y": 1})
    with pytest.raises(ConfigError, match="not registered"):
        reg.update_params("zzz", {"y": 1})


def test_dependency_status_with_chains_cycles_and_gone_peers() -> None:
    reg = ConfigRegistry()
    reg.register("a", {}, dependencies={"b": "b"})
    reg.register("b", {}, dependencies={"c": "c"})
    ready, missing, failed = reg.dependency_status("a")
    assert ready == [] and failed == []
    assert missing == {"b": "a → b → c: peer 'c' has not registered with the config server"}
    reg.register("c", {})
    assert (
        reg.dependency_status("a")[1]["b"] == "a → b → c: peer 'c' is registered but not ready yet"
    )
    reg.mark_ready("c")
    assert reg.dependency_status("a")[1]["b"] == "a → b: peer 'b' is registered but not ready yet"
    reg.mark_ready("b")
    assert reg.dependency_status("a") == (["b"], {}, [])
    assert reg.unregister("b", "died (RuntimeError: boom)")
    assert not reg.unregister("b", "again")
    ready, missing, failed = reg.dependency_status("a")
    assert failed == ["b"] and "died (RuntimeError: boom)" in missing["b"]
    # cycle
    reg.register("x", {}, dependencies={"y": "y"})
    reg.register("y", {}, dependencies={"x": "x"})
    assert reg.dependency_status("x")[1] == {"y": "cycle x → y → x"}
    # a registered peer waiting for parameters says so
    reg.register("w", {}, {"p": ("ghost", "q")})
    reg.register("v", {}, dependencies={"w": "w"})
    assert "waits for parameters: w.p ← ghost.q" in reg.dependency_status("v")[1]["w"]
    assert set(reg.waiting_for("v")) == {"w"}


def test_register_replaces_and_clears_gone() -> None:
    reg = ConfigRegistry()
    reg.register("a", {"x": 1})
    reg.mark_ready("a")
    reg.unregister("a", "left")
    assert reg.gone == {"a": "left"} and not reg.is_ready("a")
    reg.register("a", {"x": 2})
    assert reg.gone == {} and reg.peers["a"].params == {"x": 2} and not reg.is_ready("a")
    with pytest.raises(ConfigError, match="both as local and external"):
        reg.register("b", {"x": 1}, {"x": ("a", "x")})
    with pytest.raises(ConfigError, match="not registered"):
        reg.mark_ready("nobody")


PEERS = ["p0", "p1", "p2", "p3"]
NAMES = ["a", "b", "c"]


@st.composite
def registries(draw: st.DrawFn) -> ConfigRegistry:
    reg = ConfigRegistry()
    for pid in draw(st.lists(st.sampled_from(PEERS), unique=True, min_size=1)):
        params: dict[str, int] = {}
        external: dict[str, tuple[str, str]] = {}
        for name in NAMES:
            kind = draw(st.sampled_from(["local", "external", "none"]))
            if kind == "local":
                params[name] = draw(st.integers(0, 3))
            elif kind == "external":
                external[name] = (draw(st.sampled_from(PEERS)), draw(st.sampled_from(NAMES)))
        reg.register(pid, params, external)
    return reg


def all_values(reg: ConfigRegistry) -> dict[tuple[str, str], object]:
    return {(p, n): reg.resolve(p, n)[0] for p in PEERS for n in NAMES}


@given(registries(), st.data())
def test_update_reports_exactly_the_changed_resolutions(
    reg: ConfigRegistry, data: st.DataObject
) -> None:
    owners = [p for p, e in reg.peers.items() if e.params]
    if not owners:
        return
    owner = data.draw(st.sampled_from(owners))
    name = data.draw(st.sampled_from(sorted(reg.peers[owner].params)))
    value = data.draw(st.integers(0, 3))
    before = all_values(reg)
    changes = reg.update_params(owner, {name: value})
    after = all_values(reg)
    reported = {(p, n) for p, params in changes.items() for n in params}
    changed = {k for k in before if before[k] != after[k] or type(before[k]) is not type(after[k])}
    assert changed <= reported
    for p, params in changes.items():
        for n, v in params.items():
            assert after[(p, n)] == v  # every reported value is what resolving gives now


@given(registries())
def test_resolve_always_terminates_with_a_value_or_a_reason(reg: ConfigRegistry) -> None:
    for p in PEERS:
        for n in NAMES:
            value, why = reg.resolve(p, n)
            assert (value is MISSING) == bool(why)
