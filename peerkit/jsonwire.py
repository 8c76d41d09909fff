"""The JSON text subprotocol: msgpack frames ⇄ JSON text (sans-IO, no trio).

Browsers do not speak msgpack, so a WebSocket connection that negotiates the subprotocol
:data:`SUBPROTOCOL` exchanges *text* messages holding JSON instead of binary frames; one
that proposes no subprotocol keeps the default binary msgpack protocol. This module
translates both ways without knowing any message class (the broker never imports its
users' classes): message bodies are turned from msgpack into JSON and back by their shape
alone, so a browser and a Python peer exchange the same typed messages.

A JSON text message holds one envelope object or an array of them::

    [{"kind": "PUB", "type": "SignalChunk", "sender": "amp", "corr": 1, "target": "",
      "body": {"seq": 7, "timestamp": 1712.5, "samples": {"$bytes": "AACAPwAAAEA="}}}]

======== ===============================================================================
kind     the envelope kind by name (``"HELLO"``, ``"PUB"``, ...; see :class:`Kind`)
type     message type name; ``""`` where unused (default)
sender   stamped by the broker; ``""`` from peers (default)
corr     correlation id of requests and queries (default 0). A JSON ``PUB`` object is one
         message: its ``corr`` is 1 (0 or absent is accepted from clients)
target   peer id of an ``ask_peer`` query, or a sender filter for ``SUB``; ``""`` (default)
body     the message's fields as a JSON object; ``null`` or absent for an empty body
error    broker → client only, instead of ``body``: why a body could not be shown as JSON
======== ===============================================================================

Values that JSON cannot carry are *tagged*: an object with exactly one key, which starts
with ``$``:

* ``{"$bytes": "<base64>"}``: a ``bytes`` value (standard base64 with padding); arrives in
  Python as ``bytes``;
* ``{"$float": "NaN" | "Infinity" | "-Infinity"}``: a float JSON has no literal for;
* ``{"$int": "<decimal digits>"}``: an integer outside ±(2**53 - 1), which JavaScript
  numbers cannot hold exactly (either form is accepted from clients);
* ``{"$map": {...}}``: a map that would otherwise read as a tag (one key starting with
  ``$``); its values are translated, its keys are not.

An unknown tag is an error. Message bodies go through the same strict decoding at the
receiving peer as msgpack ones (types, missing and unknown fields).

The broker's part (see ``docs/browser.rst``): at the WebSocket handshake it accepts
:data:`SUBPROTOCOL` when the client proposes it (:func:`choose_subprotocol`); on such a
connection its reader turns each text message into a frame with :func:`json_to_frame`
before its usual envelope handling (a :class:`~peerkit.errors.DecodeError` is answered as
for a malformed msgpack frame), and its writer sends each outgoing frame as one text
message made by :func:`frame_to_json`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterable, Iterator
from typing import Any

import msgpack

from ._batching import MAX_BATCH
from .codec import Envelope, iter_envelopes, pack_envelope
from .errors import DecodeError
from .protocol import PROTOCOL_VERSION, Kind

__all__ = [
    "SUBPROTOCOL",
    "TIME",
    "BodyError",
    "body_from_json",
    "body_to_json",
    "choose_subprotocol",
    "envelopes_to_frame",
    "frame_objects",
    "frame_to_json",
    "json_envelopes",
    "json_to_frame",
]

#: The WebSocket subprotocol name of the JSON wire (the binary msgpack one has none).
SUBPROTOCOL = f"peerkit.json.v{PROTOCOL_VERSION}"

#: Kind number of the proposed ``TIME`` request (a peer asks the broker for its clock:
#: ``corr`` → ``REPLY`` of type ``peerkit.BrokerTime`` with body ``{"time": <seconds since
#: the epoch>}``), until :class:`~peerkit.protocol.Kind` has it.
TIME: int = int(getattr(Kind, "TIME", 22))

_KIND_BY_NAME: dict[str, int] = {k.name: int(k) for k in Kind}
_KIND_BY_NAME.setdefault("TIME", TIME)
_NAME_BY_KIND: dict[int, str] = {v: k for k, v in _KIND_BY_NAME.items()}
_KIND_NAMES = ", ".join(_KIND_BY_NAME)
_PUB = int(Kind.PUB)

#: JavaScript numbers hold integers exactly up to this magnitude (Number.MAX_SAFE_INTEGER).
_SAFE_INT = (1 << 53) - 1
_TAGS = "$bytes, $float, $int, $map"
_FIELDS = frozenset({"kind", "type", "sender", "corr", "target", "body"})
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_INT_TEXT = re.compile(r"-?[0-9]{1,20}")
#: kinds whose body is empty; every other kind carries a message's fields
_NO_BODY = frozenset(
    _KIND_BY_NAME[name]
    for name in ("HEARTBEAT", "SUB", "UNSUB", "UNREG", "ACK", "QCANCEL", "INFO", "TIME")
)

_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def choose_subprotocol(proposed: Iterable[str]) -> str | None:
    """The subprotocol a server accepts from a client that proposed ``proposed``:
    :data:`SUBPROTOCOL` when it is among them, else None (binary msgpack, the default; a
    browser that asked for another one, say a later version, then fails to connect)."""
    return SUBPROTOCOL if SUBPROTOCOL in proposed else None


class BodyError(ValueError):
    """A value that cannot be translated (the message says where and why)."""


# ----------------------------------------------------------------- msgpack → JSON


def body_to_json(value: Any, where: str = "") -> Any:
    """A value unpacked from msgpack, as JSON-ready Python data (tags where needed).

    Raises :class:`BodyError` for what JSON cannot show (map keys that are not strings,
    msgpack extension types).
    """
    t = type(value)
    if t is str or t is bool or value is None:
        return value
    if t is int:
        return value if -_SAFE_INT <= value <= _SAFE_INT else {"$int": str(value)}
    if t is float:
        if math.isfinite(value):
            return value
        return {"$float": "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")}
    if t is bytes:
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if t is list:
        return [body_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if t is dict:
        out: dict[str, Any] = {}
        for key, v in value.items():
            if type(key) is not str:
                raise BodyError(
                    f"{where or 'body'}: a map key {key!r} is not a string (JSON keys are strings)"
                )
            out[key] = body_to_json(v, f"{where}.{key}" if where else key)
        if len(out) == 1 and next(iter(out)).startswith("$"):
            return {"$map": out}
        return out
    raise BodyError(f"{where or 'body'}: a {t.__name__} value has no JSON form")


# Bodies are unpacked with any scalar as a map key (strict_map_key=False) so that a body
# with, say, integer keys is one error in its place (body_to_json refuses keys that are not
# strings) instead of ending the rest of its run.


def _body_json(body: bytes) -> Any:
    if not body:
        return None
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BodyError(f"body is not valid msgpack ({exc})") from None
    return body_to_json(value)


def _why(exc: Exception) -> str:
    return "the body is nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def _obj(kind: int, typ: str, sender: str, corr: int, target: str) -> dict[str, Any]:
    return {
        "kind": _NAME_BY_KIND.get(kind, kind),
        "type": typ,
        "sender": sender,
        "corr": corr,
        "target": target,
    }


def _run_objects(env: Envelope) -> Iterator[dict[str, Any]]:
    """One JSON object per message of a PUB run; a body that cannot be shown is an object
    with ``error`` in its place (unreadable msgpack ends the run with one)."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=0)
    unpacker.feed(env.body)
    shown = 0
    try:
        for value in unpacker:
            if shown == env.corr:
                break
            obj = _obj(_PUB, env.type, env.sender, 1, env.target)
            try:
                obj["body"] = body_to_json(value)
            except (BodyError, RecursionError) as exc:
                obj["error"] = _why(exc)
            shown += 1
            yield obj
    except Exception as exc:  # msgpack raises several unrelated types
        obj = _obj(_PUB, env.type, env.sender, 1, env.target)
        obj["error"] = f"body is not valid msgpack ({exc})"
        yield obj
        return
    if shown != env.corr:
        obj = _obj(_PUB, env.type, env.sender, 1, env.target)
        obj["error"] = f"malformed run: {env.corr} bodies announced, {shown} found"
        yield obj


def frame_objects(frame: bytes | bytearray) -> list[dict[str, Any]]:
    """The JSON objects of every envelope of a msgpack frame (PUB runs split into one
    object per message). Raises :class:`DecodeError` for a malformed frame."""
    out: list[dict[str, Any]] = []
    for env in iter_envelopes(frame):
        if env.kind == _PUB:
            out.extend(_run_objects(env))
            continue
        obj = _obj(env.kind, env.type, env.sender, env.corr, env.target)
        try:
            obj["body"] = _body_json(env.body)
        except (BodyError, RecursionError) as exc:
            obj["error"] = _why(exc)
        out.append(obj)
    return out


def frame_to_json(frame: bytes | bytearray) -> str:
    """Broker → browser: a msgpack frame as the text of one JSON message (an array).

    A message body that has no JSON form (not msgpack, a map with non-string keys) becomes
    an object with ``error`` instead of ``body``: the client counts it as a decode error,
    the rest of the frame still arrives. Raises :class:`DecodeError` for a malformed frame
    (the broker never makes one).
    """
    return json.dumps(
        frame_objects(frame), separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


# ----------------------------------------------------------------- JSON → msgpack


def _bad(why: str) -> DecodeError:
    return DecodeError(f"malformed frame: {why}")


def _no_constant(name: str) -> Any:
    raise ValueError(f'{name} is not JSON; write it as {{"$float": "{name}"}}')


def body_from_json(value: Any, where: str = "") -> Any:
    """JSON data (as :func:`json.loads` gives it) as msgpack-ready Python data: the tags
    resolved. Raises :class:`BodyError` saying where the value is wrong."""
    t = type(value)
    if t is dict:
        if len(value) == 1:
            ((key, inner),) = value.items()
            if key.startswith("$"):
                return _tag(key, inner, where or "body")
        return {k: body_from_json(v, f"{where}.{k}" if where else k) for k, v in value.items()}
    if t is list:
        return [body_from_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value  # str, int, float, bool, None


def _tag(tag: str, inner: Any, where: str) -> Any:
    if tag == "$bytes":
        if type(inner) is not str:
            raise BodyError(f"{where}: $bytes takes a base64 string, got {_json_type(inner)}")
        try:
            return base64.b64decode(inner, validate=True)
        except (binascii.Error, ValueError):
            raise BodyError(f"{where}: $bytes is not valid base64 (standard, padded)") from None
    if tag == "$float":
        if type(inner) is str and inner in _NON_FINITE:
            return _NON_FINITE[inner]
        raise BodyError(f"{where}: $float takes 'NaN', 'Infinity' or '-Infinity', got {inner!r}")
    if tag == "$int":
        if type(inner) is str and _INT_TEXT.fullmatch(inner):
            return int(inner)
        raise BodyError(f"{where}: $int takes a string of decimal digits, got {inner!r}")
    if tag == "$map":
        if type(inner) is not dict:
            raise BodyError(f"{where}: $map takes an object, got {_json_type(inner)}")
        return {k: body_from_json(v, f"{where}.{k}") for k, v in inner.items()}
    raise BodyError(
        f"{where}: unknown tag {tag!r}; tags are {_TAGS} (wrap a map whose only key starts "
        'with "$" as {"$map": {...}})'
    )


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key, "")
    if type(value) is not str:
        raise _bad(f"{where}: {key} must be a string, got {_json_type(value)}")
    return value


def _envelope(obj: Any, where: str) -> Envelope:
    if type(obj) is not dict:
        raise _bad(f"{where} must be a JSON object, got {_json_type(obj)}")
    extra = obj.keys() - _FIELDS
    if extra:
        raise _bad(
            f"{where}: unknown fields {', '.join(sorted(extra))} "
            "(an envelope has kind, type, sender, corr, target, body)"
        )
    name = obj.get("kind")
    kind = _KIND_BY_NAME.get(name) if type(name) is str else None
    if kind is None:
        raise _bad(f"{where}: unknown envelope kind {name!r} (one of {_KIND_NAMES})")
    typ = _string(obj, "type", where)
    corr = obj.get("corr", 0)
    if type(corr) is not int or corr < 0 or corr > 0xFFFFFFFFFFFFFFFF:
        raise _bad(f"{where}: corr must be a non-negative integer, got {corr!r}")
    if kind == _PUB:
        if corr > 1:
            raise _bad(f"{where}: a PUB object carries one message; its corr is 1 (or absent)")
        corr = 1
    body = obj.get("body")
    if body is None and kind in _NO_BODY:
        data = b""
    elif type(body) is not dict:
        raise _bad(
            f"{where}: a {name} envelope needs a body: the message's fields as a JSON object "
            f"({{}} for none), got {_json_type(body)}"
        )
    else:
        label = f"{where} ({typ!r})" if typ else where
        try:
            data = _packb(body_from_json(body))
        except BodyError as exc:
            raise _bad(f"{label}: {exc}") from None
        except RecursionError:
            raise _bad(f"{label}: the body is nested too deeply") from None
        except (ValueError, OverflowError) as exc:
            raise _bad(f"{label}: the body cannot be encoded ({exc})") from None
    return Envelope(
        kind, typ, _string(obj, "sender", where), corr, _string(obj, "target", where), data
    )


def json_envelopes(text: str) -> list[Envelope]:
    """Browser → broker, first step: the validated envelopes of one JSON text message,
    each body encoded as msgpack (a PUB envelope per message, ``corr`` 1).

    Raises :class:`DecodeError` naming the first problem (not JSON, not envelopes, an
    unknown kind or tag, a field of the wrong type).
    """
    if type(text) is not str:
        raise _bad("expected a text WebSocket message holding JSON, got binary")
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise _bad("not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, and ours for NaN/Infinity
        raise _bad(f"not valid JSON ({exc})") from None
    if type(data) is list:
        if not data:
            raise _bad("empty array: a message holds at least one envelope")
        return [_envelope(obj, f"envelope {i + 1}") for i, obj in enumerate(data)]
    return [_envelope(data, "the envelope")]


def envelopes_to_frame(envelopes: Iterable[Envelope], max_size: int) -> bytes:
    """Browser → broker, second step: pack envelopes into one msgpack frame.

    Consecutive PUB envelopes of one type join one run (as a Python peer's writer does),
    up to ``max_size`` bytes of bodies (the broker's ``max_message_size``) and
    ``MAX_BATCH`` messages; a body alone over ``max_size`` travels by itself and the
    broker refuses it with its usual error.
    """
    parts: list[bytes] = []
    run: list[bytes] = []
    key: tuple[str, str] | None = None  # (type, sender) of the run
    size = 0

    def flush() -> None:
        if run:
            assert key is not None
            parts.append(pack_envelope(_PUB, key[0], key[1], len(run), "", b"".join(run)))
            run.clear()

    for env in envelopes:
        if env.kind != _PUB:
            flush()
            key = None
            parts.append(
                pack_envelope(env.kind, env.type, env.sender, env.corr, env.target, env.body)
            )
            continue
        body = env.body
        if key == (env.type, env.sender) and size + len(body) <= max_size and len(run) < MAX_BATCH:
            run.append(body)
            size += len(body)
            continue
        flush()
        key, size = (env.type, env.sender), len(body)
        run.append(body)
    flush()
    return b"".join(parts)


def json_to_frame(text: str, max_size: int) -> bytes:
    """Browser → broker: one JSON text message as a msgpack frame the broker handles as it
    handles a frame from a Python peer. ``max_size`` is the broker's ``max_message_size``.

    Raises :class:`DecodeError` (see :func:`json_envelopes`).
    """
    return envelopes_to_frame(json_envelopes(text), max_size)
