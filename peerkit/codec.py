"""Bytes ⇄ envelopes ⇄ messages (sans-IO).

Message bodies are msgpack maps produced by a strict cattrs converter: bytes travel as msgpack
``bin``; decoding checks every field's type, refuses missing and unknown fields, and turns every
failure into :class:`~peerkit.errors.DecodeError` naming the type, the sender and the field.

The sender is never taken from a body: a message's ``sender`` is the one given to the decoder
(the envelope's, which the broker stamps from the authenticated connection), and a message
nested in a field of another (``inner: Sample``, ``items: list[Sample]``, ...) always has
sender ``""``. Encoding writes no sender at any depth; a ``sender`` key found in a body, at
any depth, is ignored.
"""

from __future__ import annotations

import collections.abc
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, get_args, get_origin

import attrs
import cattrs
import msgpack
from cattrs.cols import is_any_set, is_sequence, mapping_structure_factory
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.preconf.msgpack import make_converter

from .errors import DecodeError, MessageTooLarge, PeerkitError, UnknownMessageType
from .messages import Message, get_message_class
from .protocol import KIND_VALUES, Kind

__all__ = [
    "Envelope",
    "converter",
    "decode_body",
    "decode_message",
    "decode_run",
    "encode_body",
    "envelope_head",
    "fit_run",
    "iter_envelopes",
    "pack_envelope",
    "split_run",
]

#: Default maximum size of one message body in bytes.
DEFAULT_MAX_MESSAGE_SIZE = 1 << 20


# ----------------------------------------------------------------------------- converter


def _strict_int(v: object, _t: object) -> int:
    if type(v) is int:
        return v
    raise TypeError(f"expected an int, got {type(v).__name__} {v!r}")


def _strict_float(v: object, _t: object) -> float:
    if type(v) is float:
        return v
    if type(v) is int:
        return float(v)
    raise TypeError(f"expected a float, got {type(v).__name__} {v!r}")


def _strict_str(v: object, _t: object) -> str:
    if type(v) is str:
        return v
    raise TypeError(f"expected a str, got {type(v).__name__} {v!r}")


def _strict_bool(v: object, _t: object) -> bool:
    if type(v) is bool:
        return v
    raise TypeError(f"expected a bool, got {type(v).__name__} {v!r}")


def _strict_bytes(v: object, _t: object) -> bytes:
    if type(v) is bytes:
        return v
    if type(v) is bytearray:
        return bytes(v)
    raise TypeError(f"expected bytes, got {type(v).__name__} {v!r}")


_SCALARS: dict[type, str] = {
    int: "an int",
    float: "a float",
    str: "a str",
    bool: "a bool",
    bytes: "bytes",
    type(None): "None",
}


def _is_scalar_union(t: Any) -> bool:
    """``int | str``, ``float | None``, ...: a union of scalar types only."""
    if get_origin(t) not in (typing.Union, types.UnionType):
        return False
    return all(a in _SCALARS for a in get_args(t))


def _scalar_union_hook(t: Any) -> Callable[[object, object], object]:
    members = get_args(t)
    expected = " or ".join(_SCALARS[a] for a in members)

    def hook(v: object, _t: object) -> object:
        # Exact types: a bool is not an int here, an int is accepted where only float is.
        if type(v) in members:
            return v
        if type(v) is int and float in members:
            return float(v)
        raise TypeError(f"expected {expected}, got {type(v).__name__} {v!r}")

    return hook


_MAPPING_ORIGINS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def _is_container(t: Any) -> bool:
    return (
        is_sequence(t)
        or is_any_set(t)
        or get_origin(t) is tuple
        or (get_origin(t) or t) in _MAPPING_ORIGINS
    )


def _make_converter(detailed: bool = True) -> cattrs.Converter:
    c = make_converter(forbid_extra_keys=True, detailed_validation=detailed)
    c.register_structure_hook(int, _strict_int)
    c.register_structure_hook(float, _strict_float)
    c.register_structure_hook(str, _strict_str)
    c.register_structure_hook(bool, _strict_bool)
    c.register_structure_hook(bytes, _strict_bytes)
    # cattrs' union passthrough uses isinstance (True passes for ``int | str``): be exact.
    c.register_structure_hook_factory(_is_scalar_union, _scalar_union_hook)

    # cattrs structures any iterable into a list/tuple/set (a str into a list of characters,
    # a map into a list of its keys): insist on the msgpack array (or map) first.
    building: set[object] = set()

    def default_hook(t: Any) -> Callable[[Any, Any], Any]:
        if (get_origin(t) or t) in _MAPPING_ORIGINS:
            return mapping_structure_factory(t, c, structure_to=dict, detailed_validation=detailed)
        # The hook cattrs would make for ``t``: skip the factory below while asking for it.
        building.add(t)
        try:
            return c.get_structure_hook(t, cache_result=False)
        finally:
            building.discard(t)

    def container_hook(t: Any) -> Callable[[Any, Any], Any]:
        inner = default_hook(t)
        wire = dict if (get_origin(t) or t) in _MAPPING_ORIGINS else list
        what = "a map" if wire is dict else "an array"

        def hook(v: Any, typ: Any) -> Any:
            if type(v) is not wire:
                raise TypeError(f"expected {what}, got {type(v).__name__} {v!r}")
            return inner(v, typ)

        return hook

    c.register_structure_hook_factory(
        lambda t: t not in building and _is_container(t), container_hook
    )

    def is_message(t: Any) -> bool:
        return isinstance(t, type) and issubclass(t, Message) and attrs.has(t)

    c.register_unstructure_hook_factory(
        is_message, lambda cls: make_dict_unstructure_fn(cls, c, sender=override(omit=True))
    )
    # A message nested in a field of another never has a sender: only the envelope's, which
    # the broker stamps, is trusted, and it belongs to the outer message. A "sender" key in a
    # nested body (no encoder writes one) is read as "" whatever it holds. The outer message
    # is built by _top_level_hook instead, which takes its sender from the envelope.
    c.register_structure_hook_factory(
        is_message,
        lambda cls: make_dict_structure_fn(
            cls,
            c,
            _cattrs_forbid_extra_keys=True,
            _cattrs_detailed_validation=detailed,
            sender=override(struct_hook=_no_sender),
        ),
    )
    return c


def _no_sender(_value: object, _t: object) -> str:
    """The sender of a nested message, whatever its body says."""
    return ""


def _top_level_hook(
    c: cattrs.Converter, cls: type[Message], detailed: bool
) -> Callable[[Any, Any], Message]:
    """Structure ``cls`` from a map whose ``sender`` key the caller set (from the envelope)."""
    return make_dict_structure_fn(
        cls, c, _cattrs_forbid_extra_keys=True, _cattrs_detailed_validation=detailed
    )


#: The cattrs converter used for message bodies (strict, with detailed error reports). It
#: structures every message as a nested one (sender ``""``); the decoders stamp the sender.
converter: cattrs.Converter = _make_converter()
#: The same rules without detailed validation: the fast first try when decoding; a failure
#: is then re-run through :data:`converter` for a precise message.
_fast_converter: cattrs.Converter = _make_converter(detailed=False)

_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack

#: Per-class unstructure functions (the hot path skips cattrs' dispatch).
_UNSTRUCTURE: dict[type, Callable[[Any], Any]] = {}


# ----------------------------------------------------------------------------- bodies


def _fmt(exc: BaseException, typ: object) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown fields {', '.join(sorted(map(str, exc.extra_fields)))}"
    name = str(typ) if get_args(typ) else getattr(typ, "__name__", None) or str(typ)
    text = str(exc) or type(exc).__name__
    return f"invalid value for {name}: {text}" if typ is not None else f"invalid value: {text}"


def encode_body(msg: Message, max_size: int | None = None) -> bytes:
    """Encode ``msg`` (without its sender) to msgpack bytes.

    Raises :class:`MessageTooLarge` if ``max_size`` is given and exceeded, and
    :class:`PeerkitError` for a value msgpack cannot carry.
    """
    cls = type(msg)
    try:
        unstructure = _UNSTRUCTURE[cls]
    except KeyError:
        if not isinstance(msg, Message):
            raise PeerkitError(
                f"expected a peerkit.Message instance, got {type(msg).__name__}"
            ) from None
        cls.message_type()  # raises a clear error for an unregistered class
        unstructure = _UNSTRUCTURE[cls] = converter.get_unstructure_hook(cls)
    try:
        data: bytes = _packb(unstructure(msg))
    except (TypeError, ValueError, OverflowError) as exc:
        raise PeerkitError(
            f"cannot encode {type(msg).__qualname__}: {exc}; message fields must be "
            "msgpack-compatible (str, int, float, bool, bytes, lists, dicts, attrs classes)"
        ) from exc
    if max_size is not None and len(data) > max_size:
        raise MessageTooLarge(len(data), max_size, type(msg).__qualname__)
    return data


_SCALAR_TYPES = frozenset({int, float, str, bool, bytes})


#: ``structure(data, sender)`` per class: the first, fast try at building a message from its
#: unpacked body (raises anything on failure; :func:`_structure` then explains it)
_Structurer = Callable[[dict[str, Any], str], Message]
_STRUCTURE: dict[type, _Structurer] = {}


def _scalar_structurer(cls: type[Message]) -> _Structurer | None:
    """A generated structuring function for messages whose fields are all scalars.

    Same rules as the converter (exact types, an int accepted for a float, no unknown or
    missing fields), without cattrs' per-field machinery: the common case (every field
    present with its exact type) is one straight-line function made for the class, the rest
    a generic check. None if the class does not qualify.
    """
    try:
        fields = attrs.fields(attrs.resolve_types(cls))
    except Exception:
        return None
    if any(f.validator or f.converter or f.type not in _SCALAR_TYPES for f in fields):
        return None
    names = frozenset(f.name for f in fields)
    required = frozenset(f.name for f in fields if f.default is attrs.NOTHING)
    checks = tuple((f.name, f.type) for f in fields if f.name != "sender")

    def generic(data: dict[str, Any], sender: str) -> Message:
        data["sender"] = sender
        keys = data.keys()
        if not (keys <= names and required <= keys):
            raise TypeError("unknown or missing fields")
        for name, typ in checks:
            if name in data:
                value = data[name]
                if type(value) is not typ:
                    if typ is float and type(value) is int:
                        data[name] = float(value)
                    else:
                        raise TypeError(f"{name}: expected {typ}")
        return cls(**data)

    # field names are identifiers (attrs checked them); the types are bound, not spelled
    lines = ["def structure(data, sender):"]
    if checks:
        lines += [f"    if type(data) is dict and len(data) == {len(checks)}:", "        try:"]
        lines += [f"            v{i} = data[{name!r}]" for i, (name, _) in enumerate(checks)]
        lines += ["        except KeyError:", "            pass", "        else:"]
        exact = " and ".join(f"type(v{i}) is t{i}" for i in range(len(checks)))
        args = "".join(f", {name}=v{i}" for i, (name, _) in enumerate(checks))
        lines += [f"            if {exact}:", f"                return cls(sender=sender{args})"]
    else:
        lines += ["    if type(data) is dict and not data:", "        return cls(sender=sender)"]
    lines += ["    return generic(data, sender)"]
    namespace: dict[str, Any] = {"cls": cls, "generic": generic}
    namespace.update((f"t{i}", typ) for i, (_, typ) in enumerate(checks))
    exec("\n".join(lines), namespace)
    return namespace["structure"]  # type: ignore[no-any-return]


#: Per-class top-level structure hooks of :data:`converter` (the slow, explaining path).
_DETAILED: dict[type, Callable[[Any, Any], Message]] = {}


def _converter_structurer(cls: type[Message]) -> _Structurer:
    hook = _top_level_hook(_fast_converter, cls, False)

    def structure(data: dict[str, Any], sender: str) -> Message:
        data["sender"] = sender
        return hook(data, cls)

    return structure


def _structurer(cls: type[Message]) -> _Structurer:
    try:
        return _STRUCTURE[cls]
    except KeyError:
        fast = _STRUCTURE[cls] = _scalar_structurer(cls) or _converter_structurer(cls)
        return fast


def _what(cls: type[Message], sender: str) -> str:
    return f"{cls.__message_type__!r}" + (f" from {sender!r}" if sender else "")


def _structure(cls: type[Message], data: object, sender: str) -> Message:
    """Build ``cls`` from an unpacked body, or raise a :class:`DecodeError` saying why."""
    fast = _structurer(cls)
    try:
        return fast(data, sender)  # type: ignore[arg-type]
    except Exception:  # _explain says why, precisely
        return _explain(cls, data, sender)


def _explain(cls: type[Message], data: object, sender: str) -> Message:
    """The slow path after the fast try failed: the detailed converter builds the message,
    or the :class:`DecodeError` names the fields at fault."""
    if type(data) is not dict:
        raise DecodeError(f"cannot decode message {_what(cls, sender)}: body is not a map")
    data["sender"] = sender
    try:
        try:
            structure = _DETAILED[cls]
        except KeyError:
            structure = _DETAILED[cls] = _top_level_hook(converter, cls, True)
        return structure(data, cls)
    except cattrs.BaseValidationError as exc:
        problems = "; ".join(
            cattrs.transform_error(exc, path=cls.__message_type__, format_exception=_fmt)
        )
        raise DecodeError(f"invalid message {_what(cls, sender)}: {problems}") from None
    except Exception as exc:  # a validator of the class refused the values
        raise DecodeError(
            f"invalid message {_what(cls, sender)}: {type(exc).__name__}: {exc}"
        ) from None


def decode_body(cls: type[Message], body: bytes, sender: str = "") -> Message:
    """Decode ``body`` as an instance of ``cls`` and stamp ``sender``."""
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(
            f"cannot decode message {_what(cls, sender)}: body is not valid msgpack ({exc})"
        ) from None
    return _structure(cls, data, sender)


def split_run(bodies: bytes, keep: int) -> bytes:
    """The first ``keep`` bodies of a run (for a queue with room for only part of it).

    Raises :class:`DecodeError` if the run does not hold ``keep`` readable bodies.
    """
    unpacker = msgpack.Unpacker(max_buffer_size=0)
    unpacker.feed(bodies)
    try:
        for _ in range(keep):
            unpacker.skip()
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"cannot split a run of message bodies: {exc}") from None
    return bodies[: unpacker.tell()]


def fit_run(bodies: bytes, count: int, room: int, *, newest: bool = False) -> tuple[bytes, int]:
    """What of a run of ``count`` bodies fits a queue with ``room`` messages free: the
    bodies and how many they are (``b"", 0`` when none fits or the run cannot be cut).
    The first bodies of the run, or with ``newest`` the last ones."""
    if count <= room:
        return bodies, count
    if room <= 0:
        return b"", 0
    try:
        if newest:
            return bodies[len(split_run(bodies, count - room)) :], room
        return split_run(bodies, room), room
    except DecodeError:
        return b"", 0


def decode_run(
    cls: type[Message], bodies: bytes, sender: str, count: int
) -> list[Message | DecodeError]:
    """Decode the ``count`` bodies packed back to back in one PUB envelope.

    Returns the messages in order; a body that does not decode is a :class:`DecodeError` in
    its place and the rest still decode. Unreadable msgpack ends the run with one error; so
    does a count that does not match the bodies.
    """
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=0)
    unpacker.feed(bodies)
    out: list[Message | DecodeError] = []
    append = out.append
    fast = _structurer(cls)
    end = 0
    try:
        for data in unpacker:
            if len(out) == count:  # more bodies than announced: the rest is not delivered
                end = -1
                break
            end = unpacker.tell()
            try:
                append(fast(data, sender))
                continue
            except Exception:  # explained below
                pass
            try:
                append(_explain(cls, data, sender))
            except DecodeError as exc:
                append(exc)
    except Exception as exc:  # msgpack raises several unrelated types
        out.append(
            DecodeError(
                f"cannot decode message {_what(cls, sender)}: body is not valid msgpack ({exc})"
            )
        )
        return out
    if end < 0:
        why = "more bodies than announced (the extra ones were not delivered)"
    elif len(out) != count:
        why = f"{len(out)} found" + ("" if end == len(bodies) else " and a truncated one")
    elif end != len(bodies):
        why = "then a truncated one"
    else:
        return out
    out.append(
        DecodeError(f"malformed run of {_what(cls, sender)}: {count} bodies announced, {why}")
    )
    return out


def decode_message(type_name: str, body: bytes, sender: str = "") -> Message:
    """Look ``type_name`` up in the registry and decode ``body``."""
    try:
        cls = get_message_class(type_name)
    except UnknownMessageType as exc:
        if sender:
            raise UnknownMessageType(f"{exc} (sent by {sender!r})") from None
        raise
    return decode_body(cls, body, sender)


# ----------------------------------------------------------------------------- envelopes


class Envelope(NamedTuple):
    """One protocol unit; see :mod:`peerkit.protocol`."""

    kind: int
    type: str
    sender: str
    corr: int
    target: str
    body: bytes


def envelope_head(
    kind: int, type: str, sender: str, corr: int, target: str, body_size: int
) -> bytes:
    """The bytes of an envelope up to its body: ``envelope_head(...) + body`` is the packed
    envelope, so writers can join bodies into a frame without copying them first."""
    fields: bytes = _packb((kind, type, sender, corr, target))  # a fixarray: 1 header byte
    if body_size < 0x100:
        size = b"\xc4" + body_size.to_bytes(1, "big")
    elif body_size < 0x10000:
        size = b"\xc5" + body_size.to_bytes(2, "big")
    else:
        size = b"\xc6" + body_size.to_bytes(4, "big")
    return b"\x96" + fields[1:] + size


def pack_envelope(
    kind: int, type: str = "", sender: str = "", corr: int = 0, target: str = "", body: bytes = b""
) -> bytes:
    """Pack one envelope; frames are concatenations of packed envelopes."""
    return envelope_head(kind, type, sender, corr, target, len(body)) + body


def run_type(head: bytes) -> str:
    """The message type named in a packed envelope head (or whole envelope)."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(head)
    unpacker.read_array_header()
    unpacker.skip()  # kind
    typ = unpacker.unpack()
    return typ if isinstance(typ, str) else ""


#: builds an Envelope from the checked 6-tuple without re-reading its fields
_new_tuple = tuple.__new__


def _bad(why: str) -> DecodeError:
    return DecodeError(f"malformed frame: {why}")


def _checked(item: object) -> Envelope:
    """The envelope ``item`` (an unpacked msgpack object), with its header validated."""
    if type(item) is not tuple or len(item) != 6:
        raise _bad("an envelope must be an array of 6 items")
    kind, typ, sender, corr, target, body = item
    if type(kind) is not int:  # (no repr: a hostile value may be nested thousands deep)
        raise _bad(f"unknown envelope kind: it must be an integer, got {type(kind).__name__}")
    if kind not in KIND_VALUES:
        raise _bad(f"unknown envelope kind {kind}")
    if type(typ) is not str or type(sender) is not str or type(target) is not str:
        raise _bad("type, sender and target must be strings")
    if type(corr) is not int or corr < 0:
        raise _bad("correlation id must be a non-negative integer")
    if type(body) is not bytes:
        raise _bad("body must be binary")
    return _new_tuple(Envelope, item)  # the 6 fields were checked


def iter_envelopes(frame: bytes | bytearray) -> Iterator[Envelope]:
    """The envelopes of one frame, each header validated.

    Raises :class:`DecodeError` at the first malformed envelope (earlier ones were yielded).
    A frame of one envelope (a query, a reply, a lone message) is unpacked in one call.
    """
    if not isinstance(frame, bytes | bytearray):
        raise _bad("expected a binary WebSocket message, got text")
    if not frame:
        raise _bad("empty frame")
    try:
        item = msgpack.unpackb(frame, raw=False, use_list=False, strict_map_key=True)
    except Exception:  # several envelopes (ExtraData), or not msgpack: the general path
        return _iter_many(frame)
    return iter((_checked(item),))


def _iter_many(frame: bytes | bytearray) -> Iterator[Envelope]:
    unpacker = msgpack.Unpacker(raw=False, use_list=False, strict_map_key=True, max_buffer_size=0)
    unpacker.feed(frame)
    end = 0  # where the last complete envelope ended
    try:
        for item in unpacker:
            end = unpacker.tell()
            yield _checked(item)
        # The unpacker stops quietly at an incomplete object: a truncated last envelope.
        if end != len(frame):
            raise _bad(f"truncated envelope at byte {end} of {len(frame)} (not valid msgpack)")
    except DecodeError:
        raise
    except Exception as exc:
        raise _bad(f"not valid msgpack ({type(exc).__name__}: {exc})") from None


def control(
    kind: Kind,
    msg: Message | None = None,
    *,
    corr: int = 0,
    type: str = "",
    sender: str = "",
    target: str = "",
) -> bytes:
    """Pack a control envelope whose body is a (built-in) message."""
    body = encode_body(msg) if msg is not None else b""
    return pack_envelope(int(kind), type, sender, corr, target, body)
