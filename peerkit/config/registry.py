"""The config server's bookkeeping (sans-IO): registered configs, readiness, chains.

:class:`ConfigRegistry` stores, for every configured peer, its local parameter values, where
its external parameters come from (``local → (peer_id, param)``), its launch dependencies and
whether it is ready. It resolves chains of external parameters (A's from B's from C's),
explains what is missing (naming the chain, detecting cycles) and computes which values a
change affects. :class:`~peerkit.ConfigServer` is the trio glue around it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from .params import MISSING, ConfigError, UnknownParamError

__all__ = ["ConfigRegistry", "PeerEntry"]


@attrs.define
class PeerEntry:
    """One registered peer."""

    peer_id: str
    params: dict[str, Any]
    external: dict[str, tuple[str, str]] = attrs.field(factory=dict)
    dependencies: dict[str, str] = attrs.field(factory=dict)
    types: dict[str, str] = attrs.field(factory=dict)
    ready: bool = False


class ConfigRegistry:
    """Registered peer configs and readiness; every method is synchronous and pure."""

    def __init__(self) -> None:
        self.peers: dict[str, PeerEntry] = {}
        #: peers that left or died → reason
        self.gone: dict[str, str] = {}

    # ------------------------------------------------------------------ membership
    def register(
        self,
        peer_id: str,
        params: Mapping[str, Any],
        external: Mapping[str, tuple[str, str]] | None = None,
        dependencies: Mapping[str, str] | None = None,
        types: Mapping[str, str] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Store (or replace) ``peer_id``'s config; returns the resulting value changes.

        The changes are the peer's own params and every value derived from them through
        external parameters (to broadcast, so that dependents of a restarted peer update).
        """
        external = dict(external or {})
        overlap = sorted(set(params) & set(external))
        if overlap:
            raise ConfigError(
                f"peer {peer_id!r} registered {', '.join(overlap)} both as local and external"
            )
        self.peers[peer_id] = PeerEntry(
            peer_id, dict(params), external, dict(dependencies or {}), dict(types or {})
        )
        self.gone.pop(peer_id, None)
        return self._propagate(peer_id, dict(params))

    def unregister(self, peer_id: str, reason: str) -> bool:
        """Forget ``peer_id`` (it left or died: ``reason``). False if it was not registered."""
        if self.peers.pop(peer_id, None) is None:
            return False
        self.gone[peer_id] = reason
        return True

    def mark_ready(self, peer_id: str) -> None:
        """Record that ``peer_id`` is ready."""
        self._entry(peer_id).ready = True

    def is_ready(self, peer_id: str) -> bool:
        entry = self.peers.get(peer_id)
        return entry is not None and entry.ready

    def _entry(self, peer_id: str) -> PeerEntry:
        try:
            return self.peers[peer_id]
        except KeyError:
            raise ConfigError(
                f"peer {peer_id!r} is not registered with the config server"
            ) from None

    # ------------------------------------------------------------------ values
    def _absent(self, peer_id: str) -> str:
        if peer_id in self.gone:
            return f"peer {peer_id!r} {self.gone[peer_id]}"
        return f"peer {peer_id!r} has not registered with the config server"

    def resolve(self, peer_id: str, name: str) -> tuple[Any, str]:
        """The value of ``peer_id``'s parameter ``name`` following external chains.

        Returns ``(value, "")`` or ``(MISSING, explanation)``; the explanation shows the chain
        (``a.x ← b.y ← c.z``) and says what breaks it (a peer not registered, left or died, an
        unknown parameter or a cycle).
        """
        chain: list[tuple[str, str]] = []
        pid, pname = peer_id, name
        while True:
            if (pid, pname) in chain:
                chain.append((pid, pname))
                return MISSING, "cycle " + _chain(chain)
            chain.append((pid, pname))
            entry = self.peers.get(pid)
            if entry is None:
                return MISSING, f"{_chain(chain)}: {self._absent(pid)}"
            if pname in entry.external:
                pid, pname = entry.external[pname]
                continue
            if pname in entry.params:
                return entry.params[pname], ""
            return MISSING, f"{_chain(chain)}: peer {pid!r} has no parameter {pname!r}"

    def external_values(self, peer_id: str) -> tuple[dict[str, Any], dict[str, str]]:
        """``(values, missing)`` for ``peer_id``'s external parameters."""
        entry = self._entry(peer_id)
        values: dict[str, Any] = {}
        missing: dict[str, str] = {}
        for local in entry.external:
            value, why = self.resolve(peer_id, local)
            if value is MISSING:
                missing[local] = why
            else:
                values[local] = value
        return values, missing

    def params_of(
        self, peer_id: str, names: list[str] | None = None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Resolved values of ``names`` (all when empty/None) of ``peer_id``."""
        entry = self._entry(peer_id)
        wanted = names or [*entry.params, *entry.external]
        values: dict[str, Any] = {}
        missing: dict[str, str] = {}
        for name in wanted:
            value, why = self.resolve(peer_id, name)
            if value is MISSING:
                missing[name] = why
            else:
                values[name] = value
        return values, missing

    def update_params(self, peer_id: str, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Set ``peer_id``'s local params; returns the changes to broadcast (peer → params),
        including values derived through external chains. Unchanged values are left out."""
        entry = self._entry(peer_id)
        for name in params:
            if name in entry.external:
                a, b = entry.external[name]
                raise ConfigError(
                    f"{peer_id}.{name} is an external parameter (from {a}.{b}); set it on "
                    "its source"
                )
            if name not in entry.params:
                raise UnknownParamError(f"peer {peer_id!r} has no parameter {name!r}")
        changed = {n: v for n, v in params.items() if not _same(entry.params[n], v)}
        entry.params.update(changed)
        return self._propagate(peer_id, changed) if changed else {}

    def _propagate(self, peer_id: str, changed: dict[str, Any]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if changed:
            out[peer_id] = dict(changed)
        todo = [(peer_id, n, v) for n, v in changed.items()]
        seen = {(peer_id, n) for n in changed}
        while todo:
            src, name, value = todo.pop()
            for entry in self.peers.values():
                for local, ref in entry.external.items():
                    if ref == (src, name) and (entry.peer_id, local) not in seen:
                        seen.add((entry.peer_id, local))
                        out.setdefault(entry.peer_id, {})[local] = value
                        todo.append((entry.peer_id, local, value))
        return out

    # ------------------------------------------------------------------ readiness
    def dependency_status(self, peer_id: str) -> tuple[list[str], dict[str, str], list[str]]:
        """``(ready, missing, failed)`` for ``peer_id``'s launch dependencies.

        ``missing`` maps a peer id to an explanation naming the chain
        (``a → b → c: peer 'c' has not registered``) or the cycle; ``failed`` lists the
        dependencies that left or died.
        """
        entry = self._entry(peer_id)
        ready: list[str] = []
        missing: dict[str, str] = {}
        failed: list[str] = []
        for dep in dict.fromkeys(entry.dependencies.values()):
            if self.is_ready(dep):
                ready.append(dep)
                continue
            missing[dep] = self.why_not_ready(dep, [peer_id])
            if dep in self.gone:
                failed.append(dep)
        return ready, missing, failed

    def why_not_ready(self, peer_id: str, path: list[str] | None = None) -> str:
        """Why ``peer_id`` is not ready, following its own dependencies (``path`` leads to it)."""
        path = [*(path or []), peer_id]
        if path.count(peer_id) > 1:
            return "cycle " + " → ".join(path)
        entry = self.peers.get(peer_id)
        if entry is None:
            return f"{' → '.join(path)}: {self._absent(peer_id)}"
        if entry.ready:
            return ""
        reasons = [
            self.why_not_ready(dep, path)
            for dep in dict.fromkeys(entry.dependencies.values())
            if not self.is_ready(dep)
        ]
        if reasons:
            return "; ".join(reasons)
        _values, missing = self.external_values(peer_id)
        if missing:
            return f"{' → '.join(path)}: waits for parameters: " + "; ".join(missing.values())
        return f"{' → '.join(path)}: peer {peer_id!r} is registered but not ready yet"

    def waiting_for(self, peer_id: str) -> dict[str, str]:
        """Everything ``peer_id`` still waits for (params and dependencies) → explanation."""
        entry = self._entry(peer_id)
        if entry.ready:
            return {}
        _values, missing = self.external_values(peer_id)
        _ready, deps, _failed = self.dependency_status(peer_id)
        return {**missing, **deps}


def _chain(chain: list[tuple[str, str]]) -> str:
    return " ← ".join(f"{p}.{n}" for p, n in chain)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b
