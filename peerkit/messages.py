"""Typed messages: the :class:`Message` base, the :func:`message` decorator, the registry and
the built-in protocol messages (sans-IO).

A message is a frozen, keyword-only attrs class registered under a wire type name::

    @message
    class Sample(Message):
        channel: int
        values: list[float]

``sender`` is stamped by the broker from the authenticated connection; a value given locally is
never sent over the wire. ``subtype`` is the same as ``sender`` (OBCI's name).
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, dataclass_transform, overload

import attrs

from .errors import PeerkitError, UnknownMessageType

__all__ = [
    "BrokerGoodbyeMsg",
    "BrokerShutdownMsg",
    "ErrorMsg",
    "HeartbeatMsg",
    "Message",
    "MessagesDropped",
    "OkMsg",
    "PanickMsg",
    "PeerControlMessage",
    "PeerLeft",
    "PeerReady",
    "get_message_class",
    "message",
    "message_type_of",
    "registered_types",
]

M = TypeVar("M", bound="type[Message]")

_REGISTRY: dict[str, type[Message]] = {}


@attrs.frozen(kw_only=True)
class Message:
    """Base class of every message. Subclass it and decorate with :func:`message`."""

    __message_type__: ClassVar[str] = ""

    #: Peer id of the sender, stamped by the broker on delivery ("" before sending).
    sender: str = attrs.field(default="")

    @property
    def subtype(self) -> str:
        """The sender's peer id (OBCI's "subtype")."""
        return self.sender

    @classmethod
    def message_type(cls) -> str:
        """The wire type name this class is registered under."""
        if not cls.__message_type__ or _REGISTRY.get(cls.__message_type__) is not cls:
            raise PeerkitError(
                f"{cls.__qualname__} is not a registered message; decorate it with @peerkit.message"
            )
        return cls.__message_type__


def _register(cls: type[Message], type_name: str) -> None:
    if not isinstance(type_name, str) or not type_name:
        raise PeerkitError(f"message type name must be a non-empty string, got {type_name!r}")
    try:
        type_name.encode("utf-8")
    except UnicodeEncodeError:
        raise PeerkitError(f"message type name {type_name!r} is not valid UTF-8 text") from None
    old = _REGISTRY.get(type_name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise PeerkitError(
            f"message type {type_name!r} is already registered by "
            f"{old.__module__}.{old.__qualname__}; give {cls.__module__}.{cls.__qualname__} "
            "another name with @message(type='...')"
        )
    _REGISTRY[type_name] = cls
    cls.__message_type__ = type_name


@overload
def message(cls: M, /) -> M: ...
@overload
def message(*, type: str | None = None) -> Callable[[M], M]: ...


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(attrs.field,))
def message(cls: Any = None, /, *, type: str | None = None) -> Any:
    """Make a :class:`Message` subclass a frozen keyword-only attrs class and register it.

    The wire type is the class name unless ``type="..."`` is given. Registering a *different*
    class under a name already taken is an error (redefining the same class is allowed).
    """

    def wrap(c: builtins.type[Message]) -> builtins.type[Message]:
        if not (isinstance(c, builtins.type) and issubclass(c, Message)):
            raise PeerkitError(f"@message decorates subclasses of peerkit.Message, not {c!r}")
        new = attrs.frozen(c, kw_only=True)
        _register(new, c.__name__ if type is None else type)
        return new

    if cls is None:
        return wrap
    return wrap(cls)


def get_message_class(type_name: str) -> type[Message]:
    """The class registered under ``type_name``; :class:`UnknownMessageType` if none."""
    try:
        return _REGISTRY[type_name]
    except KeyError:
        raise UnknownMessageType(
            f"unknown message type {type_name!r}: no class is registered under that name; "
            "import the module that defines it in the receiving program"
        ) from None


def message_type_of(obj: Message | type[Message]) -> str:
    """Wire type name of a message instance or class."""
    cls = obj if isinstance(obj, type) else type(obj)
    return cls.message_type()


def registered_types() -> dict[str, type[Message]]:
    """A copy of the registry (type name → class)."""
    return dict(_REGISTRY)


# --------------------------------------------------------------------------- built-ins


@message
class OkMsg(Message):
    """A positive answer with an optional detail text."""

    detail: str = ""


@message
class ErrorMsg(Message):
    """A negative answer: a short machine-readable ``code`` and human ``details``."""

    code: str
    details: str = ""


@message
class HeartbeatMsg(Message):
    """Liveness signal. Peers send heartbeats to the broker only (a protocol envelope)."""


CONTROL_ACTIONS = ("start", "stop", "close")


def _check_action(_inst: object, _attr: object, value: str) -> None:
    if value not in CONTROL_ACTIONS:
        raise ValueError(f"action must be one of {', '.join(CONTROL_ACTIONS)}, not {value!r}")


@message
class PeerControlMessage(Message):
    """Drive a peer remotely: ``action`` is ``start``, ``stop`` or ``close``."""

    peer_id: str
    action: str = attrs.field(validator=_check_action)


@message
class PeerReady(Message):
    """Published by a configured peer when it becomes ready (the sender is the peer)."""


@message
class PanickMsg(Message):
    """A peer died of an error (published by it, or by the broker on its behalf)."""

    message: str = ""
    error_type: str = ""
    was_essential: bool = True


@message
class BrokerGoodbyeMsg(Message):
    """Sent by a peer to the broker as its last word; ``error_msg`` if it died of an error."""

    error_msg: str | None = None


@message
class BrokerShutdownMsg(Message):
    """Sent by the broker to every peer when it shuts down cleanly."""

    msg: str = "Shut down all peers."


@message
class PeerLeft(Message):
    """Published by the broker, on behalf of a peer (``sender``), when it has left.

    ``clean`` is true after a goodbye; ``reason`` says why it left.
    """

    reason: str
    clean: bool


@message
class MessagesDropped(Message):
    """Told to a subscriber whose broker queue overflowed: ``count`` messages were dropped."""

    count: int
