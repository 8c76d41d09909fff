"""peerkit: a trio structured-concurrency peer runtime.

Peers exchange typed messages and queries through a WebSocket broker; every peer lives in one
trio nursery and follows a strict lifecycle (see :mod:`peerkit.states`).
"""

from .broker import Broker
from .config.configured import ConfigServer, ConfiguredPeer
from .config.params import param
from .errors import (
    BrokerBusyError,
    BrokerConnectError,
    BrokerLostError,
    BrokerRequestError,
    DecodeError,
    DuplicatePeerId,
    HandlerAlreadyRegistered,
    HandlerGoneError,
    HandlerSignatureError,
    HandshakeRejected,
    InvalidStateTransition,
    MessageTooLarge,
    MultiplePeersAvailable,
    NoHandlerError,
    NotConnectedException,
    PeerkitError,
    QueryAnswerUnknown,
    QueryTimeout,
    RemoteError,
    ShuttingDownException,
    UnknownMessageType,
)
from .messages import Message, message
from .peer import Peer, query_handler, subscribe
from .states import CustomState, PeerState

#: The installed distribution's version (``importlib.metadata``), read on first use so that
#: importing peerkit does not pay for the metadata lookup.
__version__: str


def __getattr__(name: str) -> str:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("peerkit")
        except PackageNotFoundError:  # running from a source tree that was never installed
            found = "0+unknown"
        globals()["__version__"] = found
        return found
    raise AttributeError(f"module 'peerkit' has no attribute {name!r}")


__all__ = [
    "Broker",
    "BrokerBusyError",
    "BrokerConnectError",
    "BrokerLostError",
    "BrokerRequestError",
    "ConfigServer",
    "ConfiguredPeer",
    "CustomState",
    "DecodeError",
    "DuplicatePeerId",
    "HandlerAlreadyRegistered",
    "HandlerGoneError",
    "HandlerSignatureError",
    "HandshakeRejected",
    "InvalidStateTransition",
    "Message",
    "MessageTooLarge",
    "MultiplePeersAvailable",
    "NoHandlerError",
    "NotConnectedException",
    "Peer",
    "PeerState",
    "PeerkitError",
    "QueryAnswerUnknown",
    "QueryTimeout",
    "RemoteError",
    "ShuttingDownException",
    "UnknownMessageType",
    "message",
    "param",
    "query_handler",
    "subscribe",
]
