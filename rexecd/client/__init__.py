"""Python SDK and ``rexec`` CLI for the Rexec Container API served by rexecd."""

from rexecd.client.sdk import (
    DEFAULT_HOST,
    ApiError,
    AsyncClient,
    EventStream,
    ProtocolError,
    RexecClientError,
    TerminalSession,
    TransportError,
    parse_host,
)
from rexecd.client.sync import Client, SyncEventStream, SyncTerminal

__all__ = [
    "DEFAULT_HOST",
    "ApiError",
    "AsyncClient",
    "Client",
    "EventStream",
    "ProtocolError",
    "RexecClientError",
    "SyncEventStream",
    "SyncTerminal",
    "TerminalSession",
    "TransportError",
    "parse_host",
]
