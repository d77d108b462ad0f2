"""Python SDK and ``rexec`` CLI for the Rexec Container API served by rexecd.

The names below are imported on first use, so ``import rexecd.client.cli`` (every
``rexec`` start) does not pay for aiohttp and pydantic until a command needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rexecd.client.base import DEFAULT_HOST as DEFAULT_HOST
    from rexecd.client.base import ApiError as ApiError
    from rexecd.client.base import ProtocolError as ProtocolError
    from rexecd.client.base import RexecClientError as RexecClientError
    from rexecd.client.base import TransportError as TransportError
    from rexecd.client.base import parse_host as parse_host
    from rexecd.client.sdk import AsyncClient as AsyncClient
    from rexecd.client.sdk import EventStream as EventStream
    from rexecd.client.sdk import ExecStream as ExecStream
    from rexecd.client.sdk import TerminalSession as TerminalSession
    from rexecd.client.sync import Client as Client
    from rexecd.client.sync import SyncEventStream as SyncEventStream
    from rexecd.client.sync import SyncTerminal as SyncTerminal

_WHERE = {
    "DEFAULT_HOST": "base",
    "ApiError": "base",
    "ProtocolError": "base",
    "RexecClientError": "base",
    "TransportError": "base",
    "parse_host": "base",
    "AsyncClient": "sdk",
    "EventStream": "sdk",
    "ExecStream": "sdk",
    "TerminalSession": "sdk",
    "Client": "sync",
    "SyncEventStream": "sync",
    "SyncTerminal": "sync",
}

__all__ = [
    "DEFAULT_HOST",
    "ApiError",
    "AsyncClient",
    "Client",
    "EventStream",
    "ExecStream",
    "ProtocolError",
    "RexecClientError",
    "SyncEventStream",
    "SyncTerminal",
    "TerminalSession",
    "TransportError",
    "parse_host",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'rexecd.client' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rexecd.client.{module}"), name)
