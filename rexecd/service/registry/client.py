"""An HTTP client of the OCI distribution API: endpoints and mirrors, auth, redirects.

* Endpoints: a registry's configured mirrors first, then the registry itself (unless
  ``mirrors_only``). Docker Hub's API lives at registry-1.docker.io.
* Transport: HTTPS with certificate checks, always. A registry on a loopback address,
  or listed in ``insecure``, may also be reached over plain HTTP (HTTPS is tried first,
  and HTTPS there does not check certificates), as Docker treats insecure registries.
  A redirect never downgrades HTTPS to HTTP elsewhere, and credentials are never sent
  to another host than the one they were given for.
* Auth: on a 401, the ``WWW-Authenticate`` challenge decides. ``Bearer`` (Docker Hub
  and most registries): a token is fetched from the realm, anonymously or with the
  registry's configured credentials, cached per scope until it expires. ``Basic``:
  the configured credentials are sent.
* Time: every connection attempt is bounded by ``connect_timeout_s`` and every silence
  by ``read_timeout_s``; failures of idempotent requests are retried with backoff,
  ``retries`` times. An unreachable registry is a RegistryError, never a hang.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp

from rexecd.config import RegistriesConfig
from rexecd.errors import NotFound, RegistryError
from rexecd.runtime.images.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    digest_of,
)
from rexecd.runtime.images.models import DOCKER_HUB

log = logging.getLogger(__name__)

HUB_API = "registry-1.docker.io"
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
# Manifests, indexes and configs are small; a bigger answer is not one of them.
SMALL_LIMIT = 4 << 20
MAX_REDIRECTS = 5
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Endpoint:
    """One place a registry's content can be fetched from: the registry or a mirror."""

    registry: str  # the registry this serves ("docker.io"): whose credentials apply
    host: str  # "host[:port]" actually contacted
    scheme: str | None  # fixed by a mirror URL; None: HTTPS, then HTTP where allowed
    prefix: str  # path before /v2/ (mirrors may live under a path)
    insecure: bool  # plain HTTP or unverified HTTPS allowed
    mirror: bool

    @property
    def label(self) -> str:
        return f"mirror {self.host}" if self.mirror else f"registry {self.host}"


def is_loopback(host: str) -> bool:
    """``host`` ("name[:port]", "[::1]:port") is this machine's loopback."""
    name = host
    if name.startswith("["):
        name = name[1 : name.find("]")]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _backoff(attempt: int) -> float:
    return float(min(5.0, 0.2 * 2 ** (attempt - 1)))


class RegistryClient:
    """Requests to registries over one aiohttp session (owned by the caller)."""

    def __init__(self, cfg: RegistriesConfig, session: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.session = session
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            connect=cfg.connect_timeout_s,
            sock_connect=cfg.connect_timeout_s,
            sock_read=cfg.read_timeout_s,
        )
        self._schemes: dict[str, str] = {}
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}

    # --- where ----------------------------------------------------------------------

    def _insecure(self, host: str) -> bool:
        return is_loopback(host) or host in self.cfg.insecure

    def endpoints(self, registry: str) -> list[Endpoint]:
        out = []
        mirrors = self.cfg.mirrors.get(registry, [])
        for m in mirrors:
            parts = urlsplit(m if "://" in m else f"//{m}")
            host = parts.netloc
            scheme = parts.scheme or None
            if scheme == "http" and not self._insecure(host):
                raise RegistryError(
                    f"mirror {m}: plain HTTP is only used for loopback or registries.insecure hosts"
                )
            out.append(
                Endpoint(registry, host, scheme, parts.path.rstrip("/"), self._insecure(host), True)
            )
        if not (mirrors and self.cfg.mirrors_only):
            host = HUB_API if registry == DOCKER_HUB else registry
            out.append(Endpoint(registry, host, None, "", self._insecure(registry), False))
        return out

    # --- requests -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def get(
        self,
        ep: Endpoint,
        path: str,
        *,
        repo: str,
        headers: dict[str, str] | None = None,
        retry: bool = True,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET ``/v2/<path>`` from ``ep`` with auth for pulling ``repo``; yields a
        response with a 2xx status. Raises NotFound on 404, RegistryError otherwise."""
        attempt = 0
        while True:
            try:
                resp = await self._authorized(ep, path, repo, headers or {})
            except RegistryError:
                raise
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                attempt += 1
                if not retry or attempt > self.cfg.retries:
                    raise RegistryError(f"{ep.label} unreachable: {_describe(e)}") from None
                log.info("%s: %s; retrying", ep.label, _describe(e))
                await asyncio.sleep(_backoff(attempt))
                continue
            if resp.status in RETRY_STATUS and retry and attempt < self.cfg.retries:
                resp.release()
                attempt += 1
                await asyncio.sleep(_backoff(attempt))
                continue
            try:
                _check_status(ep, path, resp)
                yield resp
            finally:
                resp.release()
            return

    async def fetch_small(
        self, ep: Endpoint, path: str, *, repo: str, accept: str | None = None
    ) -> tuple[bytes, str | None]:
        """A manifest or config: the body (at most 4 MiB) and its Content-Type."""
        headers = {"Accept": accept} if accept else {}
        async with self.get(ep, path, repo=repo, headers=headers) as resp:
            length = resp.content_length
            if length is not None and length > SMALL_LIMIT:
                raise RegistryError(f"{ep.label}: {path} is too large ({length} bytes)")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > SMALL_LIMIT:
                    raise RegistryError(f"{ep.label}: {path} is too large")
            ctype = resp.headers.get("Content-Type")
            return bytes(body), ctype.split(";")[0].strip() if ctype else None

    async def fetch_blob(self, ep: Endpoint, repo: str, digest: str) -> bytes:
        data, _ = await self.fetch_small(ep, f"{repo}/blobs/{digest}", repo=repo)
        if digest_of(data, digest) != digest:
            raise RegistryError(f"{ep.label}: blob {digest} does not match its digest")
        return data

    async def _authorized(
        self, ep: Endpoint, path: str, repo: str, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        scope = f"repository:{repo}:pull"
        auth = self._cached_auth(ep, scope)
        resp = await self._send(ep, path, headers, auth)
        if resp.status != 401:
            return resp
        challenge = resp.headers.get("WWW-Authenticate", "")
        resp.release()
        auth = await self._answer(ep, challenge, scope)
        return await self._send(ep, path, headers, auth)

    async def _send(
        self, ep: Endpoint, path: str, headers: dict[str, str], auth: str | None
    ) -> aiohttp.ClientResponse:
        scheme = ep.scheme or self._schemes.get(ep.host, "https")
        url = f"{ep.host}{ep.prefix}/v2/{path}"
        try:
            return await self._follow(ep, f"{scheme}://{url}", headers, auth)
        except (aiohttp.ClientOSError, aiohttp.ClientSSLError, aiohttp.ServerDisconnectedError):
            if ep.scheme is not None or scheme == "http" or not ep.insecure:
                raise
        # An insecure registry that does not speak HTTPS: plain HTTP, from now on.
        log.info("%s: no HTTPS, using plain HTTP", ep.label)
        self._schemes[ep.host] = "http"
        return await self._follow(ep, f"http://{url}", headers, auth)

    async def _follow(
        self, ep: Endpoint, url: str, headers: dict[str, str], auth: str | None
    ) -> aiohttp.ClientResponse:
        for _ in range(MAX_REDIRECTS + 1):
            host = urlsplit(url).netloc
            send = dict(headers)
            if auth is not None and host == ep.host:
                send["Authorization"] = auth
            resp = await self.session.get(
                url,
                headers=send,
                allow_redirects=False,
                timeout=self.timeout,
                ssl=not self._insecure(host),
            )
            if resp.status not in (301, 302, 303, 307, 308):
                return resp
            location = resp.headers.get("Location")
            resp.release()
            if not location:
                raise RegistryError(f"{ep.label}: redirect without a Location")
            nxt = urljoin(url, location)
            if urlsplit(nxt).scheme not in ("http", "https"):
                raise RegistryError(f"{ep.label}: redirect to {nxt!r}")
            if urlsplit(nxt).scheme == "http" and not self._insecure(urlsplit(nxt).netloc):
                raise RegistryError(f"{ep.label}: refusing a redirect to plain HTTP ({nxt})")
            url = nxt
        raise RegistryError(f"{ep.label}: too many redirects")

    # --- auth -----------------------------------------------------------------------

    def _cached_auth(self, ep: Endpoint, scope: str) -> str | None:
        tok = self._tokens.get((ep.host, scope))
        if tok is None:
            return None
        if tok[1] < time.monotonic():
            del self._tokens[(ep.host, scope)]
            return None
        return tok[0]

    def _basic(self, ep: Endpoint) -> str | None:
        cred = self.cfg.credentials.get(ep.registry) or self.cfg.credentials.get(ep.host)
        if cred is None:
            return None
        raw = f"{cred.username}:{cred.secret()}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    async def _answer(self, ep: Endpoint, challenge: str, scope: str) -> str:
        kind, _, params = challenge.partition(" ")
        fields = dict(_CHALLENGE_RE.findall(params))
        if kind.lower() == "basic":
            basic = self._basic(ep)
            if basic is None:
                raise RegistryError(
                    f"{ep.label} requires a login: add it to registries.credentials"
                )
            self._tokens[(ep.host, scope)] = (basic, time.monotonic() + 3600)
            return basic
        if kind.lower() != "bearer" or "realm" not in fields:
            raise RegistryError(f"{ep.label}: unsupported authentication {challenge!r}")
        token, ttl = await self._token(ep, fields, scope)
        value = f"Bearer {token}"
        # Renew a little early: a token must not expire in the middle of a request.
        self._tokens[(ep.host, scope)] = (value, time.monotonic() + max(ttl - 10, 1))
        return value

    async def _token(self, ep: Endpoint, fields: dict[str, str], scope: str) -> tuple[str, int]:
        realm = fields["realm"]
        parts = urlsplit(realm)
        if parts.scheme == "http" and not self._insecure(parts.netloc):
            raise RegistryError(f"{ep.label}: token service {realm} is not HTTPS")
        if parts.scheme not in ("http", "https"):
            raise RegistryError(f"{ep.label}: bad token realm {realm!r}")
        query = {"scope": fields.get("scope", scope)}
        if "service" in fields:
            query["service"] = fields["service"]
        headers = {}
        basic = self._basic(ep)
        if basic is not None:
            headers["Authorization"] = basic
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        try:
            async with self.session.get(
                url,
                headers=headers,
                timeout=self.timeout,
                ssl=not self._insecure(parts.netloc),
            ) as resp:
                if resp.status in (401, 403):
                    raise RegistryError(f"{ep.label}: the token service refused the credentials")
                if resp.status != 200:
                    raise RegistryError(f"{ep.label}: token service answered {resp.status}")
                doc: Any = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            raise RegistryError(f"{ep.label}: token service {realm}: {_describe(e)}") from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{ep.label}: token service gave no token")
        ttl = doc.get("expires_in", 60)
        return token, ttl if isinstance(ttl, int) and ttl > 0 else 60


def _check_status(ep: Endpoint, path: str, resp: aiohttp.ClientResponse) -> None:
    if 200 <= resp.status < 300:
        return
    if resp.status == 404:
        raise NotFound(f"{ep.label}: {path} not found")
    if resp.status in (401, 403):
        raise RegistryError(f"{ep.label}: access to {path} denied ({resp.status})")
    raise RegistryError(f"{ep.label}: {path}: HTTP {resp.status} {resp.reason or ''}".rstrip())


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__
