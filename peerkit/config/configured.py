"""ConfiguredPeer (trio): parameters, external parameters and ready-gated dependencies.

A :class:`ConfiguredPeer` declares typed parameters with :func:`~peerkit.param`, loads them
from defaults, TOML config files, constructor arguments and command-line overrides (see
:mod:`peerkit.params`), and between *connected* and *ready* it:

1. registers its configuration with the config server (peer id ``config_server``; if that
   peer is not up yet it waits for its :class:`~peerkit.config_messages.ConfigServerReady`);
2. resolves its external parameters through the config server, waiting until their sources
   have registered (chains are followed);
3. waits until its launch dependencies are ready -- the config server publishes
   :class:`~peerkit.config_messages.PeerStatusChanged` and the peer re-asks only then, there
   is no polling;
4. calls ``_dependencies_are_ready()`` and ``_connections_established()``, tells the config
   server and publishes :class:`~peerkit.messages.PeerReady`.

All of it is bounded by ``config_timeout`` seconds; the
:class:`~peerkit.config_server.ConfigTimeout` error says which sources, parameters or
dependency chains (cycles too) were missing. A launch dependency that leaves or dies meanwhile
fails the wait at once with :class:`~peerkit.config_server.DependencyLost`.

The config server itself lives in :mod:`peerkit.config_server` (re-exported here), with its
introspection query ``ConfigSnapshotQuery`` → ``ConfigSnapshot``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from .._checks import check_seconds
from ..errors import (
    HandlerGoneError,
    NoHandlerError,
    PeerkitError,
    QueryAnswerUnknown,
    ShuttingDownException,
)
from ..messages import ErrorMsg, Message, OkMsg, PeerReady
from ..peer import Peer, query_handler
from ..states import PeerState
from .messages import (
    ConfigServerReady,
    DependenciesQuery,
    DependenciesStatus,
    ExternalParams,
    ExternalParamsQuery,
    MarkPeerReady,
    ParamsChanged,
    PeerSetParamQuery,
    PeerStatusChanged,
    RegisterPeerConfig,
    UnregisterPeerConfig,
    UpdateParams,
)
from .params import (
    MISSING,
    ConfigError,
    ConfigLayer,
    Overrides,
    ParamDecl,
    ParamTypeError,
    PeerConfig,
    UnknownParamError,
    build_config,
    check_value,
    declared_params,
    load_config_file,
    load_value,
    parse_text,
    type_name,
)
from .server import DEFAULT_CONFIG_SERVER_ID, ConfigTimeout, DependencyLost
from .server import ConfigServer as ConfigServer  # re-exported

__all__ = ["DEFAULT_CONFIG_SERVER_ID", "ConfigTimeout", "ConfiguredPeer", "DependencyLost"]

log = logging.getLogger("peerkit.config")


def _error_text(reply: Message) -> str:
    if isinstance(reply, ErrorMsg):
        return f"{reply.code}: {reply.details}"
    return f"unexpected answer {type(reply).__name__}"


# ============================================================================= ConfiguredPeer


class ConfiguredPeer(Peer):
    """A peer with declared parameters, external parameters and launch dependencies.

    ``ConfiguredPeer(broker_url, peer_id, *, config_files=(), local_params=None,
    external_params=None, config_sources=None, launch_dependencies=None, **peer_options)``.
    Besides the :class:`~peerkit.Peer` options it takes ``config_server`` (the server's peer
    id, default ``"config_server"``), ``config_timeout`` (seconds allowed from connected
    to ready, default 30) and ``config_overrides`` (command-line ``-p/-e/-c/-d/-f``, made by
    :func:`~peerkit.params.parse_overrides`; they rank above every other source).

    Hooks: ``_dependencies_are_ready()`` (after the launch dependencies are ready, before
    ``_connections_established()``), ``_params_changed(changed)`` (after parameters changed;
    for a running peer, changes from other peers are deferred until it stops) and
    ``_dependency_lost(peer_id, detail)`` (a dependency left or died after this peer became
    ready).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared_params(cls)  # errors in declarations show at class creation
        own = cls.__dict__.get("_shutting_down")
        if own is not None and not getattr(own, "__peerkit_unregisters__", False):
            # make sure a subclass hook that forgets super() still unregisters the peer
            @functools.wraps(own)
            async def _shutting_down(self: ConfiguredPeer) -> None:
                try:
                    await own(self)
                finally:
                    await self._unregister()

            _shutting_down.__peerkit_unregisters__ = True  # type: ignore[attr-defined]
            cls._shutting_down = _shutting_down  # type: ignore[method-assign]

    def __init__(
        self,
        broker_url: str,
        peer_id: str | None = None,
        *,
        config_files: str | Path | Sequence[str | Path] = (),
        local_params: Mapping[str, Any] | None = None,
        external_params: Mapping[str, str] | None = None,
        config_sources: Mapping[str, str] | None = None,
        launch_dependencies: Mapping[str, str] | Sequence[str] | None = None,
        config_server: str = DEFAULT_CONFIG_SERVER_ID,
        config_timeout: float = 30.0,
        config_overrides: Overrides | None = None,
        **peer_options: Any,
    ) -> None:
        super().__init__(broker_url, peer_id, **peer_options)
        if isinstance(config_files, str | Path):
            config_files = [config_files]
        check_seconds("config_timeout", config_timeout)
        if not isinstance(config_server, str) or not config_server:
            raise PeerkitError(f"config_server must be a peer id, got {config_server!r}")
        if config_overrides is not None and not isinstance(config_overrides, Overrides):
            raise PeerkitError(
                "config_overrides must be what peerkit.params.parse_overrides makes, got "
                f"{type(config_overrides).__name__}"
            )
        layers = [load_config_file(f) for f in config_files]
        layers.append(
            ConfigLayer.from_args(
                "constructor argument",
                local_params,
                external_params,
                config_sources,
                launch_dependencies,
            )
        )
        if config_overrides is not None:
            layers += config_overrides.layers()
        self._config: PeerConfig = build_config(declared_params(type(self)), self.peer_id, layers)
        self.config_server = config_server
        self.config_timeout = float(config_timeout)
        self._registered = False
        self._unregistered = False
        self._gating = True
        self._cfg_event = trio.Event()
        self._waiting_for: dict[str, str] = {}
        self._waiting_phase = ""
        self._deferred: dict[str, Any] = {}
        self._external_seq = 0  # counts ParamsChanged for this peer's external params
        self._set_lock = trio.Lock()

    # ------------------------------------------------------------------ accessors
    @property
    def config(self) -> PeerConfig:
        """The merged configuration (declarations, values and where they came from)."""
        return self._config

    def _decl(self, name: str) -> ParamDecl:
        try:
            return self._config.decls[name]
        except KeyError:
            known = ", ".join(sorted(self._config.decls)) or "(none declared)"
            raise UnknownParamError(
                f"{type(self).__name__} {self.peer_id!r} has no parameter {name!r}; "
                f"the declared parameters are: {known}"
            ) from None

    def has_param(self, name: str) -> bool:
        """Whether ``name`` is a declared parameter."""
        return name in self._config.decls

    def get_param(self, name: str) -> Any:
        """The current value of parameter ``name``.

        :class:`~peerkit.paramtypes.UnknownParamError` if it is not declared. An external
        parameter without a default has no value before the peer is ready.
        """
        self._decl(name)
        value = self._config.values[name]
        if value is MISSING:
            ref = self._config.external[name]
            raise ConfigError(
                f"parameter {name!r} of {self.peer_id!r} comes from {ref} and is not "
                "resolved yet (it is once the peer is ready)"
            )
        return value

    def param_values(self) -> dict[str, Any]:
        """Every parameter that has a value: name → value (a copy)."""
        return {n: v for n, v in self._config.values.items() if v is not MISSING}

    # ------------------------------------------------------------------ hooks
    async def _dependencies_are_ready(self) -> None:
        """Called once the launch dependencies are ready (before _connections_established)."""

    async def _params_changed(self, changed: dict[str, Any]) -> None:
        """Called after parameters changed: ``changed`` maps names to the new values."""

    async def _dependency_lost(self, peer_id: str, detail: str) -> None:
        """Called when a launch dependency leaves or dies after this peer became ready.

        By default it logs (a warning if the dependency died); the peer carries on.
        """
        level = logging.INFO if detail == "left" else logging.WARNING
        log.log(level, "peer %r: launch dependency %r is gone: %s", self.peer_id, peer_id, detail)

    # ------------------------------------------------------------------ set_param
    async def set_param(self, name: str, value: Any) -> None:
        """Set a local parameter: checked against its type, stored by the config server,
        broadcast to the peers whose external parameters come from it, then
        ``_params_changed({name: value})`` is called. Setting an unchanged value does nothing.
        """
        decl = self._decl(name)
        if name in self._config.external:
            raise ConfigError(
                f"parameter {name!r} of {self.peer_id!r} is external (from "
                f"{self._config.external[name]}); set it on its source"
            )
        value = load_value(decl, value, "set_param")
        async with self._set_lock:
            if _same(self._config.values[name], value):
                return
            if self._registered and not self._unregistered:
                reply = await self.ask_peer(self.config_server, UpdateParams(params={name: value}))
                if not isinstance(reply, OkMsg):
                    raise ConfigError(
                        f"the config server refused {self.peer_id}.{name} = {value!r}: "
                        f"{_error_text(reply)}"
                    )
            self._config.values[name] = value
            self._config.sources[name] = "set_param"
        await self._params_changed({name: value})

    @query_handler(PeerSetParamQuery, policy="explicit")
    async def _on_set_param_query(self, msg: PeerSetParamQuery) -> Message:
        if not self.has_param(msg.key):
            known = ", ".join(sorted(self._config.decls)) or "(none declared)"
            return ErrorMsg(
                code="unknown_param",
                details=f"{self.peer_id!r} has no parameter {msg.key!r}; known: {known}",
            )
        if msg.key in self._config.external:
            return ErrorMsg(
                code="external_param",
                details=f"{self.peer_id}.{msg.key} comes from {self._config.external[msg.key]}",
            )
        decl = self._decl(msg.key)
        source = f"PeerSetParamQuery from {msg.sender!r}"
        try:
            if isinstance(msg.value, str) and decl.type is not str:
                value = parse_text(decl.type, msg.value, name=msg.key, source=source)
            else:
                value = check_value(decl.type, msg.value, name=msg.key, source=source)
        except ParamTypeError as exc:
            return ErrorMsg(code="wrong_type", details=str(exc))
        try:
            await self.set_param(msg.key, value)
        except (ConfigError, QueryAnswerUnknown) as exc:
            return ErrorMsg(code="config_server", details=str(exc))
        return OkMsg(detail=f"{self.peer_id}.{msg.key} = {value!r}")

    # ------------------------------------------------------------------ notifications
    def _bump(self) -> None:
        self._cfg_event.set()
        self._cfg_event = trio.Event()

    async def _on_config_server_ready(self, msg: ConfigServerReady) -> None:
        self._bump()
        if self._registered and not self._unregistered and not self._gating:
            # the config server restarted: tell it who we are again
            self.create_task(self._reregister)

    async def _reconnected(self) -> None:
        """After a reconnection the config server may have forgotten this peer (the broker
        told it the peer was lost): register again, and say it is ready if it is."""
        await super()._reconnected()
        if self._registered and not self._unregistered and not self._gating:
            await self._reregister()

    async def _reregister(self) -> None:
        try:
            await self._register_once()
            if self.is_ready:
                await self._ask_cs(MarkPeerReady())
        except (PeerkitError, QueryAnswerUnknown) as exc:
            log.error("peer %r: could not register again: %s", self.peer_id, exc)

    async def _on_status(self, msg: PeerStatusChanged) -> None:
        self._bump()
        if (
            not self._gating
            and msg.status in ("left", "died")
            and msg.peer_id in self._config.launch_dependencies.values()
        ):
            await self._dependency_lost(msg.peer_id, msg.detail or msg.status)

    async def _on_params_changed(self, msg: ParamsChanged) -> None:
        self._bump()
        mine = msg.changes.get(self.peer_id)
        if not mine:
            return
        changed: dict[str, Any] = {}
        for name, value in mine.items():
            ref = self._config.external.get(name)
            if ref is None:
                continue  # an echo of our own local change
            try:
                changed[name] = check_value(
                    self._config.decls[name].type, value, name=name, source=f"external {ref}"
                )
            except ParamTypeError as exc:
                log.error("peer %r: ignored a change: %s", self.peer_id, exc)
        if not changed:
            return
        self._external_seq += 1
        if self._gating:
            self._config.values.update(changed)
        elif self.is_running:
            self._deferred.update(changed)
            log.info("peer %r is running: deferred changes of %s", self.peer_id, sorted(changed))
        else:
            await self._apply_deferred(changed)

    async def _apply(self, changed: dict[str, Any]) -> None:
        really = {n: v for n, v in changed.items() if not _same(self._config.values[n], v)}
        self._config.values.update(really)
        if really:
            await self._params_changed(really)

    async def _apply_deferred(self, changed: dict[str, Any] | None = None) -> None:
        """Apply the changes deferred while running (and ``changed``), unless running."""
        if changed:
            self._deferred.update(changed)
        while self._deferred and not self.is_running and not self.is_shutting_down:
            deferred, self._deferred = self._deferred, {}
            await self._apply(deferred)

    async def _stopped(self) -> None:
        # after every running → ready (stop() and the control query alike): apply the
        # parameter changes held back while running
        await super()._stopped()
        await self._apply_deferred()

    # ------------------------------------------------------------------ becoming ready
    async def _ask_cs(self, msg: Message) -> Message:
        return await self.ask_peer(self.config_server, msg)

    async def _wait_for(self, step: Callable[[], Awaitable[bool]]) -> None:
        """Run ``step`` until it returns True, re-running it on each config notification."""
        while True:
            event = self._cfg_event
            if await step():
                return
            await event.wait()

    def _register_msg(self) -> RegisterPeerConfig:
        cfg = self._config
        return RegisterPeerConfig(
            params=cfg.local_values(),
            external_params={n: [r.peer_id, r.param] for n, r in cfg.external.items()},
            launch_dependencies=dict(cfg.launch_dependencies),
            types={n: type_name(d.type) for n, d in cfg.decls.items()},
        )

    async def _register_once(self) -> None:
        reply = await self._ask_cs(self._register_msg())
        if not isinstance(reply, OkMsg):
            raise ConfigError(
                f"the config server refused the config of {self.peer_id!r}: {_error_text(reply)}"
            )
        self._registered = True

    async def _register_step(self) -> bool:
        try:
            await self._register_once()
        except (NoHandlerError, HandlerGoneError) as exc:
            self._waiting_for = {"config server": str(exc)}
            return False
        return True

    async def _gating_query(self, msg: Message) -> Message | None:
        """Ask the config server during gating; None (wait for news) if it is gone, and
        register again if it forgot us (it restarted)."""
        try:
            reply = await self._ask_cs(msg)
            if isinstance(reply, ErrorMsg) and reply.code == "not_registered":
                await self._register_once()
                reply = await self._ask_cs(msg)
        except (NoHandlerError, HandlerGoneError) as exc:
            self._waiting_for = {"config server": str(exc)}
            return None
        return reply

    async def _external_step(self) -> bool:
        seq = self._external_seq
        reply = await self._gating_query(ExternalParamsQuery())
        if reply is None:
            return False
        if seq != self._external_seq:
            return False  # a change arrived meanwhile: the answer may be stale, ask again
        if not isinstance(reply, ExternalParams):
            raise ConfigError(f"cannot get external params: {_error_text(reply)}")
        for name, value in reply.values.items():
            ref = self._config.external[name]
            self._config.values[name] = check_value(
                self._config.decls[name].type,
                value,
                name=name,
                source=f"external {ref.source}.{ref.param} = {ref} for {self.peer_id!r}",
            )
        if reply.missing and self._config.launch_dependencies:
            # a launch dependency that is gone fails the wait at once, in this phase too
            await self._dependency_status()
        self._waiting_for = dict(reply.missing)
        return not reply.missing

    async def _dependency_status(self) -> DependenciesStatus | None:
        """The status of the launch dependencies; DependencyLost if one left or died."""
        reply = await self._gating_query(DependenciesQuery())
        if reply is None:
            return None
        if not isinstance(reply, DependenciesStatus):
            raise ConfigError(f"cannot get dependency status: {_error_text(reply)}")
        if reply.failed:
            names = {pid: n for n, pid in self._config.launch_dependencies.items()}
            raise DependencyLost(
                f"peer {self.peer_id!r} cannot become ready: launch "
                + "; ".join(
                    f"dependency {names.get(p, p)!r}: {reply.missing[p]}" for p in reply.failed
                )
            )
        return reply

    async def _dependencies_step(self) -> bool:
        reply = await self._dependency_status()
        if reply is None:
            return False
        self._waiting_for = dict(reply.missing)
        return not reply.missing

    async def _become_ready(self) -> None:
        try:
            await self._gate_and_announce()
        except ShuttingDownException:
            if not self.is_shutting_down:
                raise
            # shutdown began meanwhile (e.g. SIGTERM right as we became ready): not an error

    async def _gate_and_announce(self) -> None:
        cs = self.config_server
        await self.subscribe_for_specific_msg_subtype(
            ConfigServerReady, cs, self._on_config_server_ready
        )
        await self.subscribe_for_specific_msg_subtype(PeerStatusChanged, cs, self._on_status)
        await self.subscribe_for_specific_msg_subtype(ParamsChanged, cs, self._on_params_changed)
        phases: list[tuple[str, Callable[[], Awaitable[bool]]]] = [
            (f"the config server {cs!r}", self._register_step),
            ("external parameters", self._external_step),
            ("launch dependencies", self._dependencies_step),
        ]
        with trio.move_on_after(self.config_timeout) as scope:
            for phase, step in phases:
                self._waiting_phase = phase
                self._waiting_for = {}
                if phase == "external parameters" and not self._config.external:
                    continue
                if phase == "launch dependencies" and not self._config.launch_dependencies:
                    continue
                await self._wait_for(step)
        if scope.cancelled_caught:
            raise ConfigTimeout(self._timeout_text())
        self._gating = False
        await self._dependencies_are_ready()
        await self._connections_established()
        if self.is_shutting_down:
            return
        # ready before anyone hears of it (the base class sets it again, then autostarts)
        self._state = PeerState.ready
        reply = await self._ask_cs(MarkPeerReady())
        if not isinstance(reply, OkMsg):
            raise ConfigError(f"the config server refused readiness: {_error_text(reply)}")
        await self.send_message(PeerReady())

    def _timeout_text(self) -> str:
        head = (
            f"peer {self.peer_id!r} was not ready within {self.config_timeout} s: "
            f"still waiting for {self._waiting_phase}"
        )
        if not self._waiting_for:
            return head
        return head + ": " + "; ".join(f"{k}: {v}" for k, v in self._waiting_for.items())

    # ------------------------------------------------------------------ leaving
    async def _unregister(self) -> None:
        if not self._registered or self._unregistered:
            return
        self._unregistered = True
        error = self.error
        text = "" if error is None else f"{type(error).__name__}: {error}"
        try:
            with trio.move_on_after(max(self.grace_period / 2, 0.1)):
                await self._ask_cs(UnregisterPeerConfig(error=text))
        except (PeerkitError, QueryAnswerUnknown) as exc:
            log.info("peer %r: could not unregister from the config server: %s", self.peer_id, exc)

    async def _shutting_down(self) -> None:
        """Unregisters from the config server (a timeout or a missing server is tolerated)."""
        await self._unregister()

    _shutting_down.__peerkit_unregisters__ = True  # type: ignore[attr-defined]


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b
