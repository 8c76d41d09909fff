"""The config server (trio): a peer holding every configured peer's configuration.

:class:`ConfigServer` answers the queries of :mod:`peerkit.config_messages` with the
bookkeeping of :class:`~peerkit.config_registry.ConfigRegistry`, and publishes
``ConfigServerReady``, ``PeerStatusChanged`` and ``ParamsChanged``.

Introspection (used by the launcher and the CLI): ask it ``ConfigSnapshotQuery()``; it
answers :class:`~peerkit.config_messages.ConfigSnapshot`, whose ``peers`` list every
configured peer (:class:`~peerkit.config_messages.ConfiguredPeerInfo`: ``peer_id``,
``params`` with resolved external values, ``external_params``, ``launch_dependencies``,
``types``, ``ready`` and ``waiting_for``) and whose ``gone`` maps the peers that left or died
to the reason::

    snap = await peer.ask_peer("config_server", ConfigSnapshotQuery())

Embedded in the same program, use :meth:`ConfigServer.snapshot`,
:meth:`ConfigServer.wait_until_ready` and :meth:`ConfigServer.wait_for`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import trio

from ..messages import ErrorMsg, Message, OkMsg, PanickMsg, PeerLeft
from ..peer import Peer, query_handler, subscribe
from .messages import (
    ConfigParams,
    ConfigParamsRequest,
    ConfigServerReady,
    ConfigSnapshot,
    ConfigSnapshotQuery,
    ConfiguredPeerInfo,
    DependenciesQuery,
    DependenciesStatus,
    ExternalParams,
    ExternalParamsQuery,
    MarkPeerReady,
    ParamsChanged,
    PeerStatusChanged,
    RegisterPeerConfig,
    UnregisterPeerConfig,
    UpdateParams,
)
from .paramtypes import ConfigError, UnknownParamError
from .registry import ConfigRegistry

__all__ = ["DEFAULT_CONFIG_SERVER_ID", "ConfigServer", "ConfigTimeout", "DependencyLost"]

log = logging.getLogger("peerkit.config")

#: The peer id of the config server unless told otherwise.
DEFAULT_CONFIG_SERVER_ID = "config_server"


class ConfigTimeout(ConfigError, TimeoutError):
    """A configured peer did not get its config, external params or dependencies in time."""


class DependencyLost(ConfigError):
    """A launch dependency left or died while the peer waited for it."""


class ConfigServer(Peer):
    """The peer (id ``config_server``) that holds every configured peer's configuration.

    It answers the queries of :mod:`peerkit.config_messages` through the broker like any
    other peer. Run it standalone (``await nursery.start(ConfigServer(url).run)``, or
    ``async with ConfigServer(url):``) or embedded next to other peers in one program.
    A peer that unregisters, or dies (the server sees its ``PanickMsg``), is removed and
    the change is published, so peers waiting on it are told.
    """

    def __init__(
        self, broker_url: str, peer_id: str = DEFAULT_CONFIG_SERVER_ID, **peer_options: Any
    ) -> None:
        peer_options.setdefault("max_concurrent_queries", 64)
        super().__init__(broker_url, peer_id, **peer_options)
        #: the bookkeeping (read it freely; change it only through queries)
        self.registry = ConfigRegistry()
        self._changed = trio.lowlevel.ParkingLot()

    async def _connections_established(self) -> None:
        await self.send_message(ConfigServerReady())

    # ------------------------------------------------------------------ embedded API
    def snapshot(self) -> ConfigSnapshot:
        """Every configured peer with its parameters and readiness (sorted by peer id)."""
        reg = self.registry
        peers = []
        for pid in sorted(reg.peers):
            entry = reg.peers[pid]
            values, _missing = reg.params_of(pid)
            peers.append(
                ConfiguredPeerInfo(
                    peer_id=pid,
                    params=values,
                    external_params={n: f"{a}.{b}" for n, (a, b) in entry.external.items()},
                    launch_dependencies=dict(entry.dependencies),
                    types=dict(entry.types),
                    ready=entry.ready,
                    waiting_for=reg.waiting_for(pid),
                )
            )
        return ConfigSnapshot(peers=peers, gone=dict(reg.gone))

    async def wait_for(self, predicate: Callable[[ConfigRegistry], bool], timeout: float) -> None:
        """Wait until ``predicate(self.registry)`` holds; it is re-checked after every
        registration, readiness, departure and parameter change (no polling).
        :class:`~peerkit.config_server.ConfigTimeout` after ``timeout`` seconds."""
        with trio.move_on_after(timeout) as scope:
            while not predicate(self.registry):
                await self._changed.park()
        if scope.cancelled_caught:
            raise ConfigTimeout(f"config server: condition not met within {timeout} s")

    async def wait_until_ready(self, peer_ids: Iterable[str], timeout: float) -> None:
        """Wait until every peer of ``peer_ids`` is registered and ready.

        :class:`~peerkit.config_server.ConfigTimeout` (naming what is missing) after
        ``timeout`` seconds; :class:`~peerkit.config_server.DependencyLost` as soon as one of
        them leaves or dies.
        """
        ids = list(peer_ids)
        with trio.move_on_after(timeout) as scope:
            while True:
                missing = [p for p in ids if not self.registry.is_ready(p)]
                if not missing:
                    return
                gone = [p for p in missing if p in self.registry.gone]
                if gone:
                    raise DependencyLost(
                        "; ".join(f"peer {p!r} {self.registry.gone[p]}" for p in gone)
                    )
                await self._changed.park()
        if scope.cancelled_caught:
            missing = [p for p in ids if not self.registry.is_ready(p)]
            raise ConfigTimeout(
                f"not ready within {timeout} s: "
                + "; ".join(self.registry.why_not_ready(p) for p in missing)
            )

    # ------------------------------------------------------------------ helpers
    async def _publish_changes(self, changes: dict[str, dict[str, Any]]) -> None:
        if changes:
            await self.send_message(ParamsChanged(changes=changes))

    async def _publish_status(self, peer_id: str, status: str, detail: str = "") -> None:
        self._changed.unpark_all()
        await self.send_message(PeerStatusChanged(peer_id=peer_id, status=status, detail=detail))

    # ------------------------------------------------------------------ handlers
    @query_handler(RegisterPeerConfig)
    async def _on_register(self, msg: RegisterPeerConfig) -> Message:
        external: dict[str, tuple[str, str]] = {}
        for name, ref in msg.external_params.items():
            if len(ref) != 2:
                return ErrorMsg(
                    code="bad_config", details=f"external param {name!r}: expected [peer, param]"
                )
            external[name] = (ref[0], ref[1])
        try:
            changes = self.registry.register(
                msg.sender, msg.params, external, msg.launch_dependencies, msg.types
            )
        except ConfigError as exc:
            return ErrorMsg(code="bad_config", details=str(exc))
        log.info("config server: %r registered", msg.sender)
        await self._publish_changes(changes)
        await self._publish_status(msg.sender, "registered")
        return OkMsg(detail=f"{msg.sender} registered")

    @query_handler(UnregisterPeerConfig)
    async def _on_unregister(self, msg: UnregisterPeerConfig) -> Message:
        reason = f"died ({msg.error})" if msg.error else "left"
        if self.registry.unregister(msg.sender, reason):
            log.info("config server: %r %s", msg.sender, reason)
            await self._publish_status(msg.sender, "died" if msg.error else "left", msg.error)
        return OkMsg(detail=f"{msg.sender} unregistered")

    @subscribe(PanickMsg)
    async def _on_panick(self, msg: PanickMsg) -> None:
        reason = f"died ({msg.error_type}: {msg.message})" if msg.error_type else "died"
        if self.registry.unregister(msg.sender, reason):
            log.warning("config server: %r %s", msg.sender, reason)
            await self._publish_status(msg.sender, "died", msg.message)

    @subscribe(PeerLeft)
    async def _on_peer_left(self, msg: PeerLeft) -> None:
        # normally the peer unregistered itself first; this catches a peer whose grace
        # period ran out, and one that left without a word
        reason = "left" if msg.clean else f"died ({msg.reason})"
        if self.registry.unregister(msg.sender, reason):
            log.warning("config server: %r %s without unregistering", msg.sender, reason)
            await self._publish_status(msg.sender, "left" if msg.clean else "died", msg.reason)

    @query_handler(ExternalParamsQuery)
    async def _on_external(self, msg: ExternalParamsQuery) -> Message:
        try:
            values, missing = self.registry.external_values(msg.sender)
        except ConfigError as exc:
            return ErrorMsg(code="not_registered", details=str(exc))
        return ExternalParams(values=values, missing=missing)

    @query_handler(DependenciesQuery)
    async def _on_dependencies(self, msg: DependenciesQuery) -> Message:
        try:
            ready, missing, failed = self.registry.dependency_status(msg.sender)
        except ConfigError as exc:
            return ErrorMsg(code="not_registered", details=str(exc))
        return DependenciesStatus(ready=ready, missing=missing, failed=failed)

    @query_handler(MarkPeerReady)
    async def _on_ready(self, msg: MarkPeerReady) -> Message:
        try:
            self.registry.mark_ready(msg.sender)
        except ConfigError as exc:
            return ErrorMsg(code="not_registered", details=str(exc))
        log.info("config server: %r is ready", msg.sender)
        await self._publish_status(msg.sender, "ready")
        return OkMsg(detail=f"{msg.sender} ready")

    @query_handler(UpdateParams)
    async def _on_update(self, msg: UpdateParams) -> Message:
        try:
            changes = self.registry.update_params(msg.sender, msg.params)
        except UnknownParamError as exc:
            return ErrorMsg(code="unknown_param", details=str(exc))
        except ConfigError as exc:
            return ErrorMsg(code="bad_update", details=str(exc))
        await self._publish_changes(changes)
        self._changed.unpark_all()
        return OkMsg(detail=f"{len(changes.get(msg.sender, {}))} changed")

    @query_handler(ConfigParamsRequest)
    async def _on_params_request(self, msg: ConfigParamsRequest) -> Message:
        try:
            values, missing = self.registry.params_of(msg.peer_id, list(msg.names))
        except ConfigError as exc:
            return ErrorMsg(code="not_registered", details=str(exc))
        return ConfigParams(peer_id=msg.peer_id, params=values, missing=missing)

    @query_handler(ConfigSnapshotQuery)
    async def _on_snapshot(self, msg: ConfigSnapshotQuery) -> Message:
        return self.snapshot()
