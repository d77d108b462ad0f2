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

    def require_mapped(self, size: int) -> None:
        """Raises InvalidRequest when an id lies outside a user namespace that maps
        0..``size``-1: the kernel would refuse it only in the child, as a setup error."""
        for what, v in (
            ("uid", self.uid),
            ("gid", self.gid),
            *(("group", g) for g in self.additional_gids),
        ):
            if v >= size:
                raise InvalidRequest(
                    f"{what} {v} is outside the container's user namespace (ids 0-{size - 1})"
                )


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


# (uid_t)-1 is "leave unchanged" to setresuid/setresgid: asked for, it would keep
# the process root instead of running it as that id.
_MAX_ID = 0xFFFFFFFE


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _id(text: str, what: str) -> int:
    """A uid or gid written as decimal: InvalidRequest when it is not one."""
    if not _is_number(text) or int(text) > _MAX_ID:
        raise InvalidRequest(f"{what} {text!r} is not a valid id (0-{_MAX_ID})")
    return int(text)


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
        if len(row) >= 7 and (row[0] == user or (_is_number(user) and row[2] == user)):
            entry = row
            break
    if _is_number(user):
        uid = _id(user, "uid")
        # A numeric uid absent from passwd runs with the same numeric gid, as runc does.
        gid = _id(entry[3], "the image's gid") if entry else uid
    elif entry is not None:
        uid = _id(entry[2], "the image's uid")
        gid = _id(entry[3], "the image's gid")
    else:
        raise InvalidRequest(f"user {user!r} not found in the image's /etc/passwd")
    if entry is not None:
        home = entry[5] or "/"
    if group:
        if _is_number(group):
            gid = _id(group, "gid")
        else:
            match = [row for row in groups if len(row) >= 3 and row[0] == group]
            if not match:
                raise InvalidRequest(f"group {group!r} not found in the image's /etc/group")
            gid = _id(match[0][2], "the image's gid")
    name = entry[0] if entry else None
    extra = sorted(
        {
            int(row[2])
            for row in groups
            if name
            and len(row) >= 4
            and name in row[3].split(",")
            and _is_number(row[2])
            and int(row[2]) <= _MAX_ID
        }
        - {gid}
    )
    return Identity(uid=uid, gid=gid, additional_gids=extra, home=home)
