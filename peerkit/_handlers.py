"""Checking a message handler's signature where it is registered (sans-IO, internal).

A handler is called with one positional argument, the message. A handler that cannot take
it would otherwise fail on the first message, far from the line that registered it (and, for
a subscriber, take its peer down then); :func:`check_handler` refuses it at registration.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from .errors import HandlerSignatureError

__all__ = ["HandlerSignatureError", "check_handler"]


def _name(handler: Callable[..., Any]) -> str:
    name = getattr(handler, "__qualname__", None) or getattr(handler, "__name__", None)
    return name if isinstance(name, str) else repr(handler)


def check_handler(handler: object, what: str) -> None:
    """Refuse ``handler`` unless it can be called with exactly one positional argument.

    ``what`` says where it is being registered (``"subscribe_for_all_msg_subtype(Sample)"``)
    and starts the error message. Sync and async functions, bound methods,
    :func:`functools.partial` objects and callable instances are judged by their
    signature; a callable without one (some built-ins) passes. Raises
    :class:`HandlerSignatureError` naming the fix.
    """
    if not callable(handler):
        raise HandlerSignatureError(
            f"{what}: the handler must be a function or method taking the message, "
            f"got {type(handler).__name__} {handler!r}"
        )
    # A bound method's signature hides `self`; read its function's, with `self` bound, so
    # that a method written without `self` is caught too.
    target = handler.__func__ if inspect.ismethod(handler) else handler
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # no signature to read (some built-ins): trust it
        return
    args = (handler.__self__, None) if target is not handler else (None,)  # type: ignore[attr-defined]
    try:
        signature.bind(*args)
    except TypeError:
        pass
    else:
        return
    name = _name(handler)
    params = list(signature.parameters.values())[len(args) - 1 :]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required_kw = [p for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if target is not handler and not signature.parameters:
        hint = f"{name} is a method: give it `self` first, then the message: def handler(self, msg)"
    elif positional and positional[0].name == "self" and target is handler:
        hint = (
            f"{name} looks like a method taken from its class: pass the bound method "
            "(self.handler or peer.handler), not Class.handler"
        )
    elif not positional and required_kw and not any(p.kind is p.VAR_POSITIONAL for p in params):
        hint = (
            f"peerkit passes the message positionally: make `{required_kw[0].name}` a "
            "positional parameter (before any `*`)"
        )
    elif len(positional) > 1 or required_kw:
        hint = (
            "give its other parameters defaults, or bind them first with "
            "functools.partial(handler, ...) so that only the message is left"
        )
    else:
        hint = "a handler takes exactly one positional argument, the message: def handler(msg)"
    raise HandlerSignatureError(
        f"{what}: {name}{inspect.signature(handler) if target is handler else signature} "
        f"cannot be called with the message alone; {hint}"
    )
