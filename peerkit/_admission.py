"""Who may connect to the broker (sans-IO, internal): the checks of a hello, and of the
address the broker binds."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping

from .errors import PeerkitError
from .protocol import PROTOCOL_VERSION, Hello, Reject

#: The sender id the broker uses for messages it publishes itself.
BROKER_ID = "broker"
RESERVED_IDS = frozenset({BROKER_ID, ""})
MAX_ID_LEN = 200


def admit(
    hello: Hello,
    *,
    token: str | None,
    connected: Mapping[str, str],
    max_peers: int,
    shutting_down: bool,
    max_id_length: int = MAX_ID_LEN,
) -> Reject | None:
    """None if the peer that said ``hello`` may join, else the :class:`Reject` to send it.

    ``connected`` maps the ids of the connected peers to their resume tokens: a hello with
    a connected id is refused, unless it presents that connection's token (the same peer,
    reconnecting before the broker noticed it had gone; the caller replaces the old
    connection)."""
    pid = hello.peer_id
    if hello.protocol_version != PROTOCOL_VERSION:
        return Reject(
            reason="bad_version",
            detail=(
                f"protocol version {hello.protocol_version} is not supported by this broker "
                f"(it speaks {PROTOCOL_VERSION}); use the same peerkit version everywhere"
            ),
        )
    if token is not None and not hmac.compare_digest(hello.token.encode(), token.encode()):
        return Reject(reason="bad_token", detail="wrong or missing token; pass the broker's token")
    if pid in RESERVED_IDS or len(pid) > max_id_length or not pid.isprintable():
        return Reject(
            reason="bad_id",
            detail=(
                f"invalid peer id {pid!r}: use 1..{max_id_length} printable characters, "
                f"not {BROKER_ID!r}"
            ),
        )
    if pid in connected:
        if hello.resume_token and hmac.compare_digest(
            hello.resume_token.encode(), connected[pid].encode()
        ):
            return None  # the peer itself, back on a new connection: it replaces the old one
        return Reject(
            reason="duplicate_id",
            detail=f"a peer with id {pid!r} is already connected; choose another peer_id",
        )
    if len(connected) >= max_peers:
        return Reject(
            reason="too_many_peers", detail=f"the broker already has max_peers={max_peers} peers"
        )
    if shutting_down:
        return Reject(reason="shutting_down", detail="the broker is shutting down")
    return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) means this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to bind beyond loopback without a token."""
    if not isinstance(host, str) or not host:
        raise PeerkitError(f"host must be a non-empty string, got {host!r}")
    if token is not None and (not isinstance(token, str) or not token):
        raise PeerkitError("token must be a non-empty string (or None on loopback)")
    if not is_loopback(host) and token is None:
        raise PeerkitError(
            f"binding the broker to {host!r} exposes it beyond this machine; pass token='...' "
            "(a shared secret every peer must present) or bind 127.0.0.1"
        )
