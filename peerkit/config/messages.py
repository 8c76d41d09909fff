"""Messages between configured peers and the config server (sans-IO).

Queries a :class:`~peerkit.ConfiguredPeer` asks the config server (peer id ``config_server``)
with ``ask_peer``:

================================ =============================== ================================
query                            answer                          meaning
================================ =============================== ================================
:class:`RegisterPeerConfig`      ``OkMsg``                       store (or replace) my config
:class:`UnregisterPeerConfig`    ``OkMsg``                       forget me (I leave)
:class:`ExternalParamsQuery`     :class:`ExternalParams`         my external params' values
:class:`DependenciesQuery`       :class:`DependenciesStatus`     are my dependencies ready?
:class:`MarkPeerReady`           ``OkMsg``                       I am ready now
:class:`UpdateParams`            ``OkMsg``                       my local params changed
:class:`ConfigParamsRequest`     :class:`ConfigParams`           any peer's (resolved) params
:class:`ConfigSnapshotQuery`     :class:`ConfigSnapshot`         every configured peer
================================ =============================== ================================

Refusals come back as ``ErrorMsg(code, details)``. The config server publishes
:class:`ConfigServerReady` when it starts, :class:`PeerStatusChanged` when a peer registers,
becomes ready, leaves or dies, and :class:`ParamsChanged` when parameter values change.
Every configured peer answers :class:`PeerSetParamQuery` (ask it with ``ask_peer``).

Parameter values travel as msgpack values (None, int, float, str, bool, lists, dicts with
str keys) and keep their Python type.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..messages import Message, message

__all__ = [
    "ConfigParams",
    "ConfigParamsRequest",
    "ConfigServerReady",
    "ConfigSnapshot",
    "ConfigSnapshotQuery",
    "ConfiguredPeerInfo",
    "DependenciesQuery",
    "DependenciesStatus",
    "ExternalParams",
    "ExternalParamsQuery",
    "MarkPeerReady",
    "ParamsChanged",
    "PeerSetParamQuery",
    "PeerStatusChanged",
    "RegisterPeerConfig",
    "UnregisterPeerConfig",
    "UpdateParams",
]


@message
class RegisterPeerConfig(Message):
    """Store the sender's configuration (replacing an older registration of the same id).

    ``external_params`` maps a local name to ``[peer_id, param]``; ``types`` holds the
    declared type names (for introspection).
    """

    params: dict[str, Any]
    external_params: dict[str, list[str]] = attrs.field(factory=dict)
    launch_dependencies: dict[str, str] = attrs.field(factory=dict)
    types: dict[str, str] = attrs.field(factory=dict)


@message
class UnregisterPeerConfig(Message):
    """The sender leaves; ``error`` is the error that killed it, if any."""

    error: str = ""


@message
class ExternalParamsQuery(Message):
    """Ask for the current values of the sender's external parameters."""


@message
class ExternalParams(Message):
    """``values`` of the resolved external params; ``missing`` says why the others are not."""

    values: dict[str, Any]
    missing: dict[str, str] = attrs.field(factory=dict)


@message
class DependenciesQuery(Message):
    """Ask whether the sender's launch dependencies are ready."""


@message
class DependenciesStatus(Message):
    """``ready`` dependencies (peer ids); ``missing`` peer id → why it is not ready.

    ``failed`` lists the peer ids among ``missing`` that left or died.
    """

    ready: list[str]
    missing: dict[str, str] = attrs.field(factory=dict)
    failed: list[str] = attrs.field(factory=list)


@message
class MarkPeerReady(Message):
    """The sender is ready (asked just before it publishes :class:`~peerkit.messages.PeerReady`)."""


@message
class UpdateParams(Message):
    """The sender's local parameters changed to these values."""

    params: dict[str, Any]


@message
class ParamsChanged(Message):
    """Published by the config server: ``changes`` maps a peer id to its changed params.

    It includes the values derived through chains of external parameters.
    """

    changes: dict[str, dict[str, Any]]


@message
class PeerStatusChanged(Message):
    """Published by the config server: ``status`` is registered, ready, left or died."""

    peer_id: str
    status: str
    detail: str = ""


@message
class ConfigServerReady(Message):
    """Published by the config server once it answers queries."""


@message
class ConfigParamsRequest(Message):
    """Ask for the (resolved) values of ``names`` of ``peer_id`` (all of them if empty)."""

    peer_id: str
    names: list[str] = attrs.field(factory=list)


@message
class ConfigParams(Message):
    """Answer to :class:`ConfigParamsRequest`; ``missing`` says why a value is unknown."""

    peer_id: str
    params: dict[str, Any]
    missing: dict[str, str] = attrs.field(factory=dict)


@message
class ConfiguredPeerInfo(Message):
    """One configured peer as the config server sees it."""

    peer_id: str
    params: dict[str, Any] = attrs.field(factory=dict)
    #: local name → "peer_id.param"
    external_params: dict[str, str] = attrs.field(factory=dict)
    launch_dependencies: dict[str, str] = attrs.field(factory=dict)
    types: dict[str, str] = attrs.field(factory=dict)
    ready: bool = False
    #: what the peer still waits for (param or dependency → explanation)
    waiting_for: dict[str, str] = attrs.field(factory=dict)


@message
class ConfigSnapshotQuery(Message):
    """Introspection: ask the config server for every configured peer."""


@message
class ConfigSnapshot(Message):
    """Every configured peer (sorted by id), with its parameters and readiness.

    ``gone`` maps peers that left or died to the reason.
    """

    peers: list[ConfiguredPeerInfo]
    gone: dict[str, str] = attrs.field(factory=dict)


@message
class PeerSetParamQuery(Message):
    """Ask a configured peer to set its parameter ``key`` to ``value``.

    ``value`` is a typed value, or a string parsed as on the command line when the parameter
    is not a ``str``. The answer is ``OkMsg`` or ``ErrorMsg`` with code ``unknown_param``,
    ``external_param``, ``wrong_type`` or ``config_server``.
    """

    key: str
    value: Any
