"""Image user resolution: ``User`` strings ("1000", "user", "user:group", "0:0") to ids,
read from the image's own /etc/passwd and /etc/group without following any link out
of a layer. For an exec the "layer" is a running container's root, which its tenant
controls: only a regular file off the kernel file systems is read (``safeopen``), so a
FIFO in place of /etc/passwd is an error, not a hang."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rexecd import _native as n
from rexecd.errors import InvalidRequest
from rexecd.runtime.safeopen import reopen_regular


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    additional_gids: list[int]
    home: str


def _read_from_layers(layers: list[Path], rel: str) -> str:
    """The file as the top-most layer that has it shows it (a lower copy is hidden)."""
    for layer in reversed(layers):
        dfd = os.open(layer, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = _open_link_followed(dfd, rel)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise InvalidRequest(f"cannot read /{rel} of the image: {exc.strerror}") from exc
        except InvalidRequest as exc:
            raise InvalidRequest(f"cannot read /{rel} of the image: {exc.message}") from exc
        finally:
            os.close(dfd)
        with os.fdopen(fd, "r", errors="replace") as f:
            return f.read(1 << 20)
    return ""


def _open_link_followed(dfd: int, rel: str) -> int:
    """``rel`` for reading, a final symlink followed (images link /etc/passwd at times)
    but resolved inside ``dfd`` like every other component."""
    resolve = n.RESOLVE_IN_ROOT | n.RESOLVE_NO_MAGICLINKS
    pfd = n.openat2(dfd, rel, os.O_PATH, 0, resolve)
    try:
        return reopen_regular(pfd, "/" + rel)
    finally:
        os.close(pfd)


def _table(text: str) -> list[list[str]]:
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def resolve_user(spec: str, layers: list[Path]) -> Identity:
    """Resolve an OCI ``User`` value against the image. Empty means root."""
    spec = spec.strip()
    if not spec:
        spec = "0"
    user, _, group = spec.partition(":")
    passwd = _table(_read_from_layers(layers, "etc/passwd"))
    groups = _table(_read_from_layers(layers, "etc/group"))
    home = "/"
    entry = None
    for row in passwd:
        if len(row) >= 7 and (row[0] == user or (user.isdigit() and row[2] == user)):
            entry = row
            break
    if user.isdigit():
        uid = int(user)
        # A numeric uid absent from passwd runs with the same numeric gid, as runc does.
        gid = int(entry[3]) if entry else uid
    elif entry is not None:
        uid = int(entry[2])
        gid = int(entry[3])
    else:
        raise InvalidRequest(f"user {user!r} not found in the image's /etc/passwd")
    if entry is not None:
        home = entry[5] or "/"
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            match = [row for row in groups if len(row) >= 3 and row[0] == group]
            if not match:
                raise InvalidRequest(f"group {group!r} not found in the image's /etc/group")
            gid = int(match[0][2])
    name = entry[0] if entry else None
    extra = sorted(
        {
            int(row[2])
            for row in groups
            if name and len(row) >= 4 and name in row[3].split(",") and row[2].isdigit()
        }
        - {gid}
    )
    return Identity(uid=uid, gid=gid, additional_gids=extra, home=home)
