"""The HTTP layer: aiohttp routes, middlewares and wire (de)serialisation of the Rexec API."""

from rexecd.api.app import make_app
from rexecd.api.auth import WS_PROTOCOLS, principal, principal_from_ws_request
from rexecd.api.keys import WEBSOCKETS, track_websocket

__all__ = [
    "WEBSOCKETS",
    "WS_PROTOCOLS",
    "make_app",
    "principal",
    "principal_from_ws_request",
    "track_websocket",
]
