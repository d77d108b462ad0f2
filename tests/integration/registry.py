"""A real OCI registry on loopback for the pull tests, and what the tests do with it.

* ``Registry``: Debian's ``docker-registry`` (the CNCF distribution registry) on
  127.0.0.1 with its own storage dir; plain, htpasswd basic auth, or bearer-token auth.
  It can be stopped and started again on the same port and storage.
* ``push_image`` / ``push_index``: a small pusher of the project's own, through the
  distribution API's monolithic blob upload (``skopeo`` pushes the Debian image).
* ``TokenServer``: a token service (aiohttp on 127.0.0.1) that signs the JWTs the
  registry checks (RS256, key and certificate made with ``openssl``), anonymously.
* ``CutProxy``: a TCP proxy in front of the registry that can hold a connection once
  it has passed N bytes, so a test can stop the registry mid-blob, deterministically.

Everything listens on 127.0.0.1 only and goes when the test ends.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from rexecd.runtime.images.manifest import host_arch
from tests.deadlines import scaled
from tests.integration.daemon import free_port
from tests.integration.daemon_fixtures import BUSYBOX_TAR

REGISTRY_BIN = shutil.which("docker-registry")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def need_registry() -> str:
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed (Debian package docker-registry)")
    return REGISTRY_BIN


def busybox_rootfs() -> bytes:
    """The uncompressed layer of the busybox test image (an OCI layout tarball)."""
    if not BUSYBOX_TAR.exists():
        pytest.skip(f"{BUSYBOX_TAR} missing: run ./scripts/setup (scripts/build-test-image)")
    with tarfile.open(BUSYBOX_TAR) as tar:

        def blob(digest: str) -> bytes:
            f = tar.extractfile(f"blobs/sha256/{digest.partition(':')[2]}")
            assert f is not None
            return f.read()

        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        return gzip.decompress(blob(manifest["layers"][0]["digest"]))


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Registry:
    base: Path
    auth: dict[str, Any] | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.storage = self.base / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.log = self.base / "registry.log"
        self.config = self.base / "config.yml"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self, auth: dict[str, Any] | None = None) -> None:
        if auth is not None:
            self.auth = auth
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info"},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}},
            "http": {"addr": self.host},
        }
        if self.auth:
            cfg["auth"] = self.auth
        self.config.write_text(yaml.safe_dump(cfg))
        out = open(self.log, "ab")  # noqa: SIM115 - the registry writes to it until stopped
        self.proc = subprocess.Popen(
            [need_registry(), "serve", str(self.config)], stdout=out, stderr=out
        )
        out.close()
        deadline = time.monotonic() + scaled(20)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=1):
                    return
            except urllib.error.HTTPError as e:
                if e.code == 401:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("docker-registry did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=scaled(10))
        self.proc = None

    def blob_file(self, digest: str) -> Path:
        hexd = digest.partition(":")[2]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def blob_gets(self, digest: str) -> int:
        """Successful GETs of a blob, from the registry's access log."""
        text = self.log.read_text(errors="replace")
        return sum(
            1 for line in text.splitlines() if f"/blobs/{digest} " in line and '"GET ' in line
        )


def catalogue_entry(name: str, ref: str | None, **kw: Any) -> dict[str, Any]:
    """An ``images.catalogue`` entry of a test daemon's config, pulled from ``ref``."""
    return {
        "name": name,
        "display_name": name,
        "description": f"{name} for tests",
        "category": "test",
        "reference": ref,
        **kw,
    }


def mirror_of_hub(host: str, **extra: Any) -> dict[str, Any]:
    """A daemon's ``registries`` section with Docker Hub mirrored at ``host`` only: a
    test never reaches the real Hub."""
    return {"pull": True, "mirrors": {"docker.io": [host]}, "mirrors_only": True, **extra}


@contextmanager
def running_registry(base: Path, auth: dict[str, Any] | None = None) -> Iterator[Registry]:
    reg = Registry(base, auth)
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


# ------------------------------------------------------------------ pushing


def _request(
    url: str, method: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> Any:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    return urllib.request.urlopen(req, timeout=scaled(30))


def push_blob(reg: Registry, repo: str, data: bytes) -> dict[str, Any]:
    digest = sha256(data)
    with _request(f"{reg.url}/v2/{repo}/blobs/uploads/", "POST") as r:
        location = r.headers["Location"]
    if location.startswith("/"):
        location = reg.url + location
    sep = "&" if "?" in location else "?"
    with _request(
        f"{location}{sep}digest={digest}",
        "PUT",
        data,
        {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
    ):
        pass
    return {"digest": digest, "size": len(data)}


def push_manifest(reg: Registry, repo: str, ref: str, doc: dict[str, Any], media: str) -> str:
    body = json.dumps(doc).encode()
    with _request(f"{reg.url}/v2/{repo}/manifests/{ref}", "PUT", body, {"Content-Type": media}):
        pass
    return sha256(body)


@dataclass
class Pushed:
    digest: str  # the manifest's (or the index's)
    diff_ids: list[str]
    blobs: list[str]  # layer blob digests
    manifest: dict[str, Any]


def push_image(
    reg: Registry,
    repo: str,
    tag: str | None,
    layers: list[bytes],
    *,
    gzip_layers: bool = True,
    env: list[str] | None = None,
    arch: str | None = None,
) -> Pushed:
    """Push an image of uncompressed layer tars (gzip-compressed on the way, unless not)."""
    diff_ids = [sha256(layer) for layer in layers]
    blobs = [gzip.compress(layer, mtime=0) if gzip_layers else layer for layer in layers]
    config = json.dumps(
        {
            "architecture": arch or host_arch(),
            "os": "linux",
            "config": {"Env": env or ["PATH=/bin"], "Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    media = "tar+gzip" if gzip_layers else "tar"
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **push_blob(reg, repo, config),
        },
        "layers": [
            {"mediaType": f"application/vnd.oci.image.layer.v1.{media}", **push_blob(reg, repo, b)}
            for b in blobs
        ],
    }
    ref = tag or sha256(json.dumps(doc).encode())
    digest = push_manifest(reg, repo, ref, doc, OCI_MANIFEST)
    return Pushed(digest, diff_ids, [sha256(b) for b in blobs], doc)


def push_index(
    reg: Registry, repo: str, tag: str, images: dict[str, list[bytes]]
) -> dict[str, Pushed]:
    """An image index with one image per architecture (``{"amd64": layers, ...}``)."""
    pushed = {
        arch: push_image(reg, repo, None, layers, arch=arch) for arch, layers in images.items()
    }
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": p.digest,
                "size": len(json.dumps(p.manifest).encode()),
                "platform": {"os": "linux", "architecture": arch},
            }
            for arch, p in pushed.items()
        ]
        # BuildKit's attestation manifests ride along in real indexes: never chosen.
        + [
            {
                "mediaType": OCI_MANIFEST,
                "digest": next(iter(pushed.values())).digest,
                "size": len(json.dumps(next(iter(pushed.values())).manifest).encode()),
                "platform": {"os": "unknown", "architecture": "unknown"},
                "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
            }
        ],
    }
    push_manifest(reg, repo, tag, index, OCI_INDEX)
    return pushed


# ------------------------------------------------------------------ token auth


class TokenServer:
    """Issues registry bearer tokens for anonymous pulls, as Docker Hub's auth service.

    The registry is configured with ``token`` auth naming this realm, service and
    issuer, and trusts the self-signed certificate whose key signs the tokens."""

    SERVICE = "rexecd-test-registry"
    ISSUER = "rexecd-test-issuer"

    def __init__(self, base: Path) -> None:
        self.base = base
        self.key = base / "token.key"
        self.cert = base / "token.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=rexecd-test-token", "-keyout", str(self.key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
        self.x5c = base64.b64encode(der).decode()
        self.port = free_port()
        self.requests: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_auth(self) -> dict[str, Any]:
        return {
            "token": {
                "realm": self.realm,
                "service": self.SERVICE,
                "issuer": self.ISSUER,
                "rootcertbundle": str(self.cert),
            }
        }

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/token", self._token)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def sign(self, scope: str) -> str:
        _, repo, actions = scope.split(":", 2)
        now = int(time.time())
        claims = {
            "iss": self.ISSUER,
            "sub": "",
            "aud": self.SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": base64.urlsafe_b64encode(os.urandom(12)).decode(),
            "access": [{"type": "repository", "name": repo, "actions": actions.split(",")}],
        }
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing.encode(), check=True, capture_output=True,
        ).stdout  # fmt: skip
        return f"{signing}.{_b64(sig)}"

    async def _token(self, request: web.Request) -> web.Response:
        self.requests.append(
            dict(request.query) | {"auth": request.headers.get("Authorization", "")}
        )
        scope = request.query.get("scope", "")
        if request.query.get("service") != self.SERVICE or not scope.startswith("repository:"):
            return web.json_response({"error": "bad request"}, status=400)
        token = await asyncio.to_thread(self.sign, scope)
        return web.json_response({"token": token, "expires_in": 300})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def htpasswd(path: Path, user: str, password: str) -> dict[str, Any]:
    """A bcrypt htpasswd file (apache2-utils) and the registry auth section using it."""
    if shutil.which("htpasswd") is None:
        pytest.skip("htpasswd is not installed (Debian package apache2-utils)")
    out = subprocess.run(
        ["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True
    ).stdout
    path.write_text(out)
    return {"htpasswd": {"realm": "rexecd-test", "path": str(path)}}


# ------------------------------------------------------------------ interruptions


class CutProxy:
    """127.0.0.1:port -> the registry. ``hold_after(n)``: the first connection whose
    responses pass ``n`` bytes stops forwarding and sets ``held``; ``drop()`` then closes
    it. Request heads are recorded (to see Range requests)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.heads: list[bytes] = []
        self.held = asyncio.Event()
        self._hold_after: int | None = None
        self._release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def hold_after(self, n: int) -> None:
        self._hold_after = n

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", self.port)

    async def close(self) -> None:
        self._release.set()
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def drop(self) -> None:
        """Close the held connection (both ways), as a registry that died would."""
        self._release.set()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.append(up_w)

        async def upstream() -> None:
            while data := await reader.read(65536):
                self.heads.append(data[:512])
                up_w.write(data)
                await up_w.drain()

        async def downstream() -> None:
            sent = 0
            while data := await up_r.read(65536):
                if self._hold_after is not None and sent + len(data) > self._hold_after:
                    cut = self._hold_after - sent
                    writer.write(data[:cut])
                    await writer.drain()
                    self._hold_after = None
                    self.held.set()
                    await self._release.wait()
                    return
                writer.write(data)
                await writer.drain()
                sent += len(data)

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        for w in (writer, up_w):
            w.close()

    def ranges(self) -> list[str]:
        out = []
        for head in self.heads:
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"range:"):
                    out.append(line.split(b":", 1)[1].strip().decode())
        return out
