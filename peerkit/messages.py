"""Typed messages: the :class:`Message` base, the :func:`message` decorator, the registry and
the built-in protocol messages (sans-IO).

A message is a frozen, keyword-only attrs class registered under a wire type name::

    @message
    class Sample(Message):
        channel: int
        values: list[float]

``sender`` is stamped by the broker from the authenticated connection; a value given locally is
never sent over the wire. ``subtype`` is the same as ``sender`` (OBCI's name).

Mistakes show where they are made. Building a message checks each field against its annotation
(``Sample(channel="3")`` raises :class:`MessageFieldError` naming the field, what it expects and
what it got); the check is shallow to stay cheap (a ``list[float]`` field must be a list, its
elements are checked by the receiver's decoder). Building an instance of a ``Message`` subclass
that lacks ``@message`` says to decorate it.
"""

from __future__ import annotations

import builtins
import enum
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar, dataclass_transform, get_args, get_origin, overload

import attrs

from .errors import PeerkitError, UnknownMessageType

__all__ = [
    "BrokerGoodbyeMsg",
    "BrokerShutdownMsg",
    "ErrorMsg",
    "HeartbeatMsg",
    "Message",
    "MessageFieldError",
    "MessagesDropped",
    "OkMsg",
    "PanickMsg",
    "PeerControlMessage",
    "PeerJoined",
    "PeerLeft",
    "PeerReady",
    "PeerStateChanged",
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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Until @message makes it an attrs class, a subclass would inherit Message.__init__
        # and fail with "unexpected keyword argument": say what is missing instead.
        # (@message removes this before attrs builds the real __init__.)
        if "__init__" not in cls.__dict__:
            cls.__init__ = _undecorated_init  # type: ignore[method-assign]

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


class MessageFieldError(PeerkitError, TypeError, ValueError):
    """A message was built with a field value its class does not accept.

    Raised when the message is constructed, on the sender, so the mistake is seen where it
    is made rather than as a decode error at every receiver.
    """


def _undecorated_init(self: Message, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    raise PeerkitError(
        f"{cls.__qualname__} subclasses peerkit.Message but is not decorated: put "
        f"@peerkit.message (or @message(type='...')) on the line above "
        f"`class {cls.__name__}(...)`"
    )


# ---------------------------------------------------------------- field checks at construction
#
# A cheap, shallow check of every field against its annotation, run by the attrs __init__
# (through __attrs_post_init__): scalars by type, containers by kind (a list, a map), nested
# attrs classes by class. Elements inside containers are left to the receiver's decoder,
# which checks everything (checking them here would cost as much as encoding them). The
# rules accept what the codec carries (an int for a float, a bytearray for bytes) and refuse
# what it would refuse (a bool for an int). The checker of a class is generated at its first
# construction, when forward references in the annotations can be resolved.

_USER_POST_INIT = "__peerkit_user_post_init__"

#: annotation -> (test expression on ``v``, what it expects)
_SCALAR_TESTS: dict[object, tuple[str, str]] = {
    int: ("type(v) is int or (isinstance(v, int) and not isinstance(v, bool))", "an int"),
    float: (
        "type(v) is float or type(v) is int or "
        "(isinstance(v, (int, float)) and not isinstance(v, bool))",
        "a float",
    ),
    str: ("type(v) is str or isinstance(v, str)", "a str"),
    bool: ("type(v) is bool", "a bool"),
    bytes: ("type(v) is bytes or isinstance(v, (bytes, bytearray))", "bytes"),
    type(None): ("v is None", "None"),
}
_SEQUENCE_ORIGINS = {
    list,
    tuple,
    set,
    frozenset,
    *(get_origin(t) for t in (typing.Sequence[int], typing.MutableSequence[int])),
    *(get_origin(t) for t in (typing.AbstractSet[int], typing.MutableSet[int])),
}
_MAPPING_ORIGINS = {dict, *(get_origin(t) for t in (typing.Mapping[int, int],))}


def _field_test(t: object, bound: dict[str, object]) -> tuple[str, str] | None:
    """(expression testing ``v``, what it expects) for annotation ``t``; None: no check."""
    if t in _SCALAR_TESTS:
        return _SCALAR_TESTS[t]
    origin = get_origin(t) or t
    if origin in (typing.Union, types.UnionType):
        parts = [_field_test(a, bound) for a in get_args(t)]
        if any(p is None for p in parts):
            return None
        tests = [p for p in parts if p is not None]
        return (
            " or ".join(f"({test})" for test, _ in tests),
            " or ".join(what for _, what in tests),
        )
    if origin in _SEQUENCE_ORIGINS:
        return ("isinstance(v, (list, tuple, set, frozenset))", "a list")
    if origin in _MAPPING_ORIGINS:
        return ("isinstance(v, Mapping)", "a dict")
    if origin is typing.Literal:
        name = f"_c{len(bound)}"
        bound[name] = get_args(t)
        return (f"v in {name}", " or ".join(repr(a) for a in get_args(t)))
    if isinstance(t, type) and (attrs.has(t) or issubclass(t, enum.Enum)):
        name = f"_c{len(bound)}"
        bound[name] = t
        return (f"isinstance(v, {name})", f"a {t.__qualname__}")
    return None  # Any, object, type variables, anything else: not checked here


def _make_checker(cls: type[Message]) -> Callable[[Message], None]:
    """Generate ``cls``'s ``__attrs_post_init__``: the field checks, then the user's hook."""
    user = getattr(cls, _USER_POST_INIT, None)
    bound: dict[str, object] = {"Mapping": Mapping, "_fail": _field_failed, "_user": user}
    expected: dict[str, str] = {}
    lines = ["def __attrs_post_init__(self):"]
    try:
        fields = attrs.fields(attrs.resolve_types(cls))
    except Exception:  # unresolvable annotations: the codec will say so when it is used
        fields = ()
    for field in fields:
        if field.name == "sender":
            continue
        test = _field_test(field.type, bound)
        if test is None:
            continue
        expected[field.name] = test[1]
        lines += [f"    v = self.{field.name}", f"    if not ({test[0]}):"]
        lines += [f"        _fail(self, {field.name!r}, v, {test[1]!r})"]
    if user is not None:
        lines.append("    _user(self)")
    lines.append("    return None")
    exec("\n".join(lines), bound)
    return bound["__attrs_post_init__"]  # type: ignore[return-value]


def _field_failed(msg: Message, name: str, value: object, expected: str) -> None:
    cls = type(msg)
    annotation = attrs.fields_dict(cls)[name].type
    declared = str(annotation).replace("typing.", "")
    if isinstance(annotation, type) and not get_args(annotation):
        declared = annotation.__qualname__
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    raise MessageFieldError(
        f"{cls.__qualname__}.{name} must be {expected} (it is declared "
        f"`{name}: {declared}`), got {type(value).__name__} "
        f"{shown}; convert the value, or change the field's annotation"
    )


def _first_post_init(self: Message) -> None:
    """The first construction of a class: generate its checker, install it, run it."""
    cls = type(self)
    checker = _make_checker(cls)
    cls.__attrs_post_init__ = checker  # type: ignore[attr-defined]
    checker(self)


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

    Building a message checks each field against its annotation (scalars by type, lists and
    dicts by kind, nested attrs classes by class) and raises :class:`MessageFieldError` for a
    wrong one; elements inside lists and dicts are checked by the receiver's decoder. A
    ``__attrs_post_init__`` of the class runs after these checks.
    """

    def wrap(c: builtins.type[Message]) -> builtins.type[Message]:
        if not (isinstance(c, builtins.type) and issubclass(c, Message)):
            raise PeerkitError(f"@message decorates subclasses of peerkit.Message, not {c!r}")
        if c.__dict__.get("__init__") is _undecorated_init:
            del c.__init__  # let attrs write the real one
        own = c.__dict__.get("__attrs_post_init__")
        if own is not None:
            setattr(c, _USER_POST_INIT, own)  # run after the field checks
        c.__attrs_post_init__ = _first_post_init  # type: ignore[attr-defined]
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


#: The actions every peer knows; any other goes to the peer's ``_control_action`` hook.
CONTROL_ACTIONS = ("start", "stop", "close")


def _check_action(_inst: object, _attr: object, value: Any) -> None:
    if not isinstance(value, str) or not value or not value.isprintable():
        raise MessageFieldError(
            f"PeerControlMessage.action must be a non-empty printable string "
            f"({', '.join(CONTROL_ACTIONS)} or an action the peer defines), got {value!r}"
        )


@message
class PeerControlMessage(Message):
    """Drive a peer remotely: ``action`` is ``start``, ``stop``, ``close`` or an action the
    peer's class defines (its ``_control_action`` hook handles those)."""

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

    ``clean`` is true after a goodbye; ``reason`` says why it left; ``peer_id`` is the
    sender's id again (for subscribers that read the field rather than ``sender``).
    """

    reason: str
    clean: bool
    peer_id: str = ""


@message
class PeerJoined(Message):
    """Published by the broker, on behalf of a peer (``sender``), when it has connected
    (``resumed`` when it came back after losing its connection: see "Failures and
    recovery")."""

    peer_id: str
    resumed: bool = False


@message
class PeerStateChanged(Message):
    """Published by the broker, on behalf of a peer (``sender``), for every change of
    state the peer reports: ``old`` and ``new`` are state names (custom states included),
    ``base`` the base state ``new`` counts as (``ready`` for a ``calibrating`` that counts
    as ready)."""

    peer_id: str
    old: str
    new: str
    base: str = ""


@message
class MessagesDropped(Message):
    """Told to a subscriber whose broker queue overflowed: ``count`` messages were dropped."""

    count: int
