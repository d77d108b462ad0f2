"""The daemon's SQLite state: users, tokens, containers, IP leases, volumes, forwards, events.

Concurrency: one connection, shared by every thread and serialised by one lock.
The daemon's database work is small and short, so a single writer costs nothing
measurable, and it makes every check-then-write (quota, name, IP lease) trivially
atomic inside the process. Write transactions still start with ``BEGIN
IMMEDIATE`` so they stay atomic against another process on the same file (the
``rexecd token create`` CLI while the daemon runs); ``busy_timeout`` makes that
process wait instead of failing. The API is synchronous: the service calls it
through ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from rexecd.errors import (
    Conflict,
    NotFound,
    QuotaExceeded,
    RexecError,
    RuntimeUnavailable,
    VolumeNotFound,
)
from rexecd.models import ContainerRecord, ContainerResources, utcnow

DB_NAME = "state.db"
BUSY_TIMEOUT_MS = 5000

# Each entry moves the schema one version up; never edit an entry that has shipped,
# append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE users (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            tier TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE tokens (
            id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            token_sha256 TEXT NOT NULL UNIQUE,
            token_prefix TEXT NOT NULL,
            scopes TEXT NOT NULL,
            created_at TEXT NOT NULL,
            expires_at TEXT,
            last_used_at TEXT,
            revoked INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX tokens_user ON tokens(user_id)",
        """CREATE TABLE containers (
            db_id TEXT PRIMARY KEY,
            id TEXT NOT NULL UNIQUE CHECK (length(id) = 64),
            user_id TEXT NOT NULL REFERENCES users(id),
            name TEXT NOT NULL,
            image TEXT NOT NULL,
            role TEXT,
            status TEXT NOT NULL,
            error_message TEXT,
            created_at TEXT NOT NULL,
            last_used_at TEXT,
            started_at TEXT,
            expires_at TEXT,
            resources TEXT NOT NULL,
            environment TEXT NOT NULL,
            labels TEXT NOT NULL,
            network_mode TEXT NOT NULL,
            ip_address TEXT,
            pid INTEGER,
            pid_start_time INTEGER,
            spec TEXT NOT NULL,
            UNIQUE (user_id, name)
        )""",
        """CREATE TABLE ip_leases (
            ip TEXT PRIMARY KEY,
            container_db_id TEXT NOT NULL REFERENCES containers(db_id) ON DELETE CASCADE,
            leased_at TEXT NOT NULL
        )""",
        "CREATE INDEX ip_leases_container ON ip_leases(container_db_id)",
        """CREATE TABLE volumes (
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            path TEXT NOT NULL,
            size_mb INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (user_id, name)
        )""",
        # No foreign keys: the log outlives the containers and users it mentions.
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            ts TEXT NOT NULL,
            user_id TEXT,
            container_db_id TEXT,
            type TEXT NOT NULL,
            payload TEXT NOT NULL
        )""",
        "CREATE INDEX events_user_seq ON events(user_id, seq)",
    ),
    (
        # One host port per protocol, daemon-wide: the nft map is keyed the same way.
        # A forward lives as long as the container's current run; the cascade covers
        # a delete, the service removes the rows when the container stops.
        """CREATE TABLE port_forwards (
            id TEXT PRIMARY KEY,
            container_db_id TEXT NOT NULL REFERENCES containers(db_id) ON DELETE CASCADE,
            protocol TEXT NOT NULL CHECK (protocol IN ('tcp', 'udp')),
            host_port INTEGER NOT NULL CHECK (host_port BETWEEN 1 AND 65535),
            container_port INTEGER NOT NULL CHECK (container_port BETWEEN 1 AND 65535),
            created_at TEXT NOT NULL,
            UNIQUE (protocol, host_port)
        )""",
        "CREATE INDEX port_forwards_container ON port_forwards(container_db_id)",
    ),
    (
        # When a container last had the volume: kept volumes expire and are evicted by it.
        "ALTER TABLE volumes ADD COLUMN last_used_at TEXT",
        # 1 while the volume is being removed: no container may take its name meanwhile,
        # and a removal a crash interrupted is finished at the next start-up.
        "ALTER TABLE volumes ADD COLUMN removing INTEGER NOT NULL DEFAULT 0",
        # The event log is trimmed by age.
        "CREATE INDEX events_ts ON events(ts)",
    ),
    (
        # Host id ranges of containers' user namespaces: slot k is ids base + k*size.
        # Held from the first start until the container is deleted (its files on the
        # host are owned by the range), so a slot is never shared.
        """CREATE TABLE userns_leases (
            slot INTEGER PRIMARY KEY CHECK (slot >= 0),
            container_db_id TEXT NOT NULL UNIQUE
                REFERENCES containers(db_id) ON DELETE CASCADE,
            leased_at TEXT NOT NULL
        )""",
    ),
    (
        # userns.mode user: one range shared by all containers of a user. A range now
        # has rows of its own (its owner, whether it is shared) and userns_leases says
        # which range each container holds. A range belongs to one user in both modes.
        """CREATE TABLE userns_ranges (
            slot INTEGER PRIMARY KEY CHECK (slot >= 0),
            user_id TEXT NOT NULL,
            per_user INTEGER NOT NULL CHECK (per_user IN (0, 1)),
            leased_at TEXT NOT NULL
        )""",
        "CREATE UNIQUE INDEX userns_ranges_per_user ON userns_ranges(user_id) WHERE per_user = 1",
        """INSERT INTO userns_ranges (slot, user_id, per_user, leased_at)
           SELECT l.slot, c.user_id, 0, l.leased_at
           FROM userns_leases l JOIN containers c ON c.db_id = l.container_db_id""",
        """CREATE TABLE userns_leases_v5 (
            container_db_id TEXT PRIMARY KEY
                REFERENCES containers(db_id) ON DELETE CASCADE,
            slot INTEGER NOT NULL REFERENCES userns_ranges(slot),
            leased_at TEXT NOT NULL
        )""",
        """INSERT INTO userns_leases_v5 (container_db_id, slot, leased_at)
           SELECT container_db_id, slot, leased_at FROM userns_leases""",
        "DROP TABLE userns_leases",
        "ALTER TABLE userns_leases_v5 RENAME TO userns_leases",
        "CREATE INDEX userns_leases_slot ON userns_leases(slot)",
        # The store's code keeps both rules; the database refuses a lease that breaks one
        # all the same: ids of one user are never another's, and a per-container range
        # is one container's.
        """CREATE TRIGGER userns_leases_one_owner BEFORE INSERT ON userns_leases
           WHEN (SELECT user_id FROM userns_ranges WHERE slot = NEW.slot)
                IS NOT (SELECT user_id FROM containers WHERE db_id = NEW.container_db_id)
             OR ((SELECT per_user FROM userns_ranges WHERE slot = NEW.slot) = 0
                 AND EXISTS (SELECT 1 FROM userns_leases WHERE slot = NEW.slot))
           BEGIN SELECT RAISE(ABORT, 'user namespace range held by another owner'); END""",
        # A range goes with its last lease, however that goes (a release, or the
        # cascade of a container's delete).
        """CREATE TRIGGER userns_leases_last_out AFTER DELETE ON userns_leases
           BEGIN
             DELETE FROM userns_ranges WHERE slot = OLD.slot
               AND NOT EXISTS (SELECT 1 FROM userns_leases WHERE slot = OLD.slot);
           END""",
    ),
)
# Every this many appends, append_event trims the log to its row cap in the same
# transaction, so the log is bounded between housekeeping passes too.
EVENT_PRUNE_EVERY = 64

_CONTAINER_COLUMNS = (
    "db_id", "id", "user_id", "name", "image", "role", "status", "error_message",
    "created_at", "last_used_at", "started_at", "expires_at", "resources", "environment",
    "labels", "network_mode", "ip_address", "pid", "pid_start_time", "spec",
)  # fmt: skip
_UPDATABLE = frozenset(_CONTAINER_COLUMNS) - {"db_id", "id", "user_id", "created_at"}
_JSON_COLUMNS = frozenset({"resources", "environment", "labels", "spec"})
_TIME_COLUMNS = frozenset({"created_at", "last_used_at", "started_at", "expires_at"})


# --- records ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserRecord:
    id: str
    name: str
    tier: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    user_id: str
    name: str
    token_sha256: str
    token_prefix: str
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    user_id: str
    name: str
    path: str
    size_mb: int
    created_at: datetime
    last_used_at: datetime | None = None
    removing: bool = False
    # The runtime id of the user's container of this name, if there is one (it owns
    # the volume); filled by the queries that look.
    container_id: str | None = None

    @property
    def last_used(self) -> datetime:
        return self.last_used_at or self.created_at


@dataclass(frozen=True, slots=True)
class IpLease:
    ip: IPv4Address
    container_db_id: str
    leased_at: datetime


@dataclass(frozen=True, slots=True)
class PortForwardRecord:
    id: str
    container_db_id: str
    protocol: str
    host_port: int
    container_port: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class EventRecord:
    seq: int
    ts: datetime
    user_id: str | None
    container_db_id: str | None
    type: str
    payload: dict[str, Any]


# --- encoding --------------------------------------------------------------------------


def _ts(dt: datetime) -> str:
    # Fixed width with microseconds, so text order is time order.
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ts_or_none(dt: datetime | None) -> str | None:
    return None if dt is None else _ts(dt)


def _parse_ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _parse_ts_or_none(text: str | None) -> datetime | None:
    return None if text is None else _parse_ts(text)


def _encode_column(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS:
        if isinstance(value, ContainerResources):
            value = value.model_dump()
        return json.dumps(value, sort_keys=True)
    if column in _TIME_COLUMNS:
        return _ts_or_none(value)
    return value


def _container_from_row(row: sqlite3.Row) -> ContainerRecord:
    data: dict[str, Any] = {}
    for column in _CONTAINER_COLUMNS:
        value = row[column]
        if column in _JSON_COLUMNS:
            value = json.loads(value)
        elif column in _TIME_COLUMNS:
            value = _parse_ts_or_none(value)
        data[column] = value
    return ContainerRecord.model_validate(data)


def _user_from_row(row: sqlite3.Row) -> UserRecord:
    return UserRecord(row["id"], row["name"], row["tier"], _parse_ts(row["created_at"]))


def _token_from_row(row: sqlite3.Row) -> TokenRecord:
    return TokenRecord(
        id=row["id"],
        user_id=row["user_id"],
        name=row["name"],
        token_sha256=row["token_sha256"],
        token_prefix=row["token_prefix"],
        scopes=tuple(json.loads(row["scopes"])),
        created_at=_parse_ts(row["created_at"]),
        expires_at=_parse_ts_or_none(row["expires_at"]),
        last_used_at=_parse_ts_or_none(row["last_used_at"]),
        revoked=bool(row["revoked"]),
    )


def _volume_from_row(row: sqlite3.Row, *, joined: bool = False) -> VolumeRecord:
    """``joined``: the row carries ``container_id`` from a join with containers."""
    return VolumeRecord(
        row["user_id"],
        row["name"],
        row["path"],
        row["size_mb"],
        _parse_ts(row["created_at"]),
        _parse_ts_or_none(row["last_used_at"]),
        bool(row["removing"]),
        row["container_id"] if joined else None,
    )


# A kept volume: no container of its user has its name. The (user_id, name) unique
# index of containers serves the lookup.
_NO_CONTAINER = """NOT EXISTS (SELECT 1 FROM containers c
                       WHERE c.user_id = v.user_id AND c.name = v.name)"""


def _check_not_removing(db: sqlite3.Connection, user_id: str, name: str) -> None:
    row = db.execute(
        "SELECT 1 FROM volumes WHERE user_id = ? AND name = ? AND removing = 1", (user_id, name)
    ).fetchone()
    if row is not None:
        raise Conflict(
            "the kept /home/user volume of this name is being removed: retry in a moment",
            name=name,
        )


def _forward_from_row(row: sqlite3.Row) -> PortForwardRecord:
    return PortForwardRecord(
        id=row["id"],
        container_db_id=row["container_db_id"],
        protocol=row["protocol"],
        host_port=int(row["host_port"]),
        container_port=int(row["container_port"]),
        created_at=_parse_ts(row["created_at"]),
    )


def _event_from_row(row: sqlite3.Row) -> EventRecord:
    return EventRecord(
        seq=row["seq"],
        ts=_parse_ts(row["ts"]),
        user_id=row["user_id"],
        container_db_id=row["container_db_id"],
        type=row["type"],
        payload=json.loads(row["payload"]),
    )


def _is_unique_violation(exc: sqlite3.IntegrityError) -> bool:
    return "UNIQUE constraint failed" in str(exc)


# --- the store -------------------------------------------------------------------------


class Store:
    """The state database under ``state_dir``; see the module docstring for threading."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.db_path = state_dir / DB_NAME
        if not state_dir.exists():
            state_dir.mkdir(parents=True)
            # mkdir's mode is filtered by the umask; the directory holds token hashes
            # and every container's environment, so it is made private explicitly.
            # An existing directory is left as the operator made it (it could be
            # shared); the database file itself is private either way.
            os.chmod(state_dir, 0o700)
        # Create the file ourselves so it is never world-readable, not even for a
        # moment; SQLite gives its -wal and -shm files the same mode.
        fd = os.open(self.db_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.db_path,
            isolation_level=None,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode may lose the last transactions on power loss but never
        # corrupts; reconcile at start-up rebuilds what the kernel says anyway.
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._migrate()

    # -- plumbing -------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _read(
        self, sql: str, params: tuple[Any, ...] | Mapping[str, Any] = ()
    ) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (0)")
                version = 0
            else:
                version = int(row["version"])
            if version > len(MIGRATIONS):
                raise RexecError(
                    f"{self.db_path} has schema version {version}, newer than this rexecd "
                    f"knows ({len(MIGRATIONS)}); refusing to touch it"
                )
            for statements in MIGRATIONS[version:]:
                for sql in statements:
                    db.execute(sql)
            db.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))

    def schema_version(self) -> int:
        return int(self._read("SELECT version FROM schema_version")[0]["version"])

    # -- users ----------------------------------------------------------------------

    def create_user(self, name: str, tier: str, *, now: datetime | None = None) -> UserRecord:
        user = UserRecord(str(uuid.uuid4()), name, tier, now or utcnow())
        try:
            with self._write() as db:
                db.execute(
                    "INSERT INTO users (id, name, tier, created_at) VALUES (?, ?, ?, ?)",
                    (user.id, user.name, user.tier, _ts(user.created_at)),
                )
        except sqlite3.IntegrityError as exc:
            if _is_unique_violation(exc):
                raise Conflict("user already exists", name=name) from None
            raise
        return user

    def ensure_user(self, name: str, tier: str | None, *, default_tier: str = "free") -> UserRecord:
        """The user called ``name``, created with ``tier or default_tier`` if new.

        A ``tier`` given for an existing user replaces its tier: that is how an
        operator moves a user up or down.
        """
        with self._write() as db:
            row = db.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
            if row is None:
                user = UserRecord(str(uuid.uuid4()), name, tier or default_tier, utcnow())
                db.execute(
                    "INSERT INTO users (id, name, tier, created_at) VALUES (?, ?, ?, ?)",
                    (user.id, user.name, user.tier, _ts(user.created_at)),
                )
                return user
            user = _user_from_row(row)
            if tier is not None and tier != user.tier:
                db.execute("UPDATE users SET tier = ? WHERE id = ?", (tier, user.id))
                user = UserRecord(user.id, user.name, tier, user.created_at)
            return user

    def get_user(self, user_id: str) -> UserRecord | None:
        rows = self._read("SELECT * FROM users WHERE id = ?", (user_id,))
        return _user_from_row(rows[0]) if rows else None

    def get_user_by_name(self, name: str) -> UserRecord | None:
        rows = self._read("SELECT * FROM users WHERE name = ?", (name,))
        return _user_from_row(rows[0]) if rows else None

    def list_users(self) -> list[UserRecord]:
        return [_user_from_row(r) for r in self._read("SELECT * FROM users ORDER BY name")]

    def set_user_tier(self, user_id: str, tier: str) -> None:
        with self._write() as db:
            if db.execute("UPDATE users SET tier = ? WHERE id = ?", (tier, user_id)).rowcount == 0:
                raise NotFound("user not found")

    # -- tokens ---------------------------------------------------------------------

    def insert_token(self, token: TokenRecord, *, limit: int | None = None) -> None:
        """Insert ``token``; with ``limit``, QuotaExceeded if its user already holds that
        many live tokens (neither revoked nor expired), checked in the same transaction."""
        with self._write() as db:
            if limit is not None:
                live = db.execute(
                    """SELECT count(*) FROM tokens WHERE user_id = ? AND revoked = 0
                       AND (expires_at IS NULL OR expires_at > ?)""",
                    (token.user_id, _ts(token.created_at)),
                ).fetchone()[0]
                if live >= limit:
                    raise QuotaExceeded(
                        "token limit reached: revoke tokens you no longer use",
                        current=live,
                        limit=limit,
                    )
            db.execute(
                """INSERT INTO tokens (id, user_id, name, token_sha256, token_prefix, scopes,
                       created_at, expires_at, last_used_at, revoked)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    token.id, token.user_id, token.name, token.token_sha256, token.token_prefix,
                    json.dumps(list(token.scopes)), _ts(token.created_at),
                    _ts_or_none(token.expires_at), _ts_or_none(token.last_used_at),
                    int(token.revoked),
                ),
            )  # fmt: skip

    def get_token_by_hash(self, token_sha256: str) -> tuple[TokenRecord, UserRecord] | None:
        """The token with this hash and its owner, revoked or expired ones included."""
        rows = self._read(
            """SELECT t.*, u.name AS u_name, u.tier AS u_tier, u.created_at AS u_created_at
               FROM tokens t JOIN users u ON u.id = t.user_id
               WHERE t.token_sha256 = ?""",
            (token_sha256,),
        )
        if not rows:
            return None
        row = rows[0]
        user = UserRecord(
            row["user_id"], row["u_name"], row["u_tier"], _parse_ts(row["u_created_at"])
        )
        return _token_from_row(row), user

    def get_token(self, token_id: str) -> TokenRecord | None:
        rows = self._read("SELECT * FROM tokens WHERE id = ?", (token_id,))
        return _token_from_row(rows[0]) if rows else None

    def list_tokens(self, user_id: str, *, include_revoked: bool = False) -> list[TokenRecord]:
        sql = "SELECT * FROM tokens WHERE user_id = ?"
        if not include_revoked:
            sql += " AND revoked = 0"
        rows = self._read(sql + " ORDER BY created_at DESC, rowid DESC", (user_id,))
        return [_token_from_row(r) for r in rows]

    def revoke_token(self, user_id: str, token_id: str) -> bool:
        """Revoke one of ``user_id``'s tokens; False if it has no such live token."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE tokens SET revoked = 1 WHERE id = ? AND user_id = ? AND revoked = 0",
                (token_id, user_id),
            )
            return cur.rowcount > 0

    def prune_tokens(self, expired_before: datetime) -> int:
        """Delete revoked tokens and those expired before ``expired_before`` (neither
        authenticates any more); returns how many went."""
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM tokens WHERE revoked = 1 OR (expires_at IS NOT NULL AND "
                "expires_at < ?)",
                (_ts(expired_before),),
            )
            return cur.rowcount

    def touch_token(self, token_id: str, when: datetime) -> None:
        with self._write() as db:
            db.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?", (_ts(when), token_id))

    # -- containers -----------------------------------------------------------------

    def insert_container_checked(self, rec: ContainerRecord, limit: int) -> None:
        """Insert ``rec`` if its name is free for the user and the user is below ``limit``.

        The checks and the insert are one ``BEGIN IMMEDIATE`` transaction, so two
        concurrent creates can never both pass. The name is checked first: two
        creates of one name must give one success and one 409, whatever the quota.
        """
        values = tuple(_encode_column(c, getattr(rec, c)) for c in _CONTAINER_COLUMNS)
        with self._write() as db:
            taken = db.execute(
                "SELECT 1 FROM containers WHERE user_id = ? AND name = ?", (rec.user_id, rec.name)
            ).fetchone()
            if taken is not None:
                raise Conflict("container with this name already exists", name=rec.name)
            _check_not_removing(db, rec.user_id, rec.name)
            current = db.execute(
                "SELECT count(*) FROM containers WHERE user_id = ?", (rec.user_id,)
            ).fetchone()[0]
            if current >= limit:
                row = db.execute("SELECT tier FROM users WHERE id = ?", (rec.user_id,)).fetchone()
                raise QuotaExceeded(
                    "container limit reached",
                    current=current,
                    limit=limit,
                    tier=row["tier"] if row else None,
                )
            placeholders = ", ".join("?" for _ in _CONTAINER_COLUMNS)
            db.execute(
                f"INSERT INTO containers ({', '.join(_CONTAINER_COLUMNS)}) VALUES ({placeholders})",
                values,
            )

    def get_container(self, db_id: str) -> ContainerRecord | None:
        rows = self._read("SELECT * FROM containers WHERE db_id = ?", (db_id,))
        return _container_from_row(rows[0]) if rows else None

    def get_container_by_id(self, runtime_id: str) -> ContainerRecord | None:
        rows = self._read("SELECT * FROM containers WHERE id = ?", (runtime_id,))
        return _container_from_row(rows[0]) if rows else None

    def get_container_by_name(self, user_id: str, name: str) -> ContainerRecord | None:
        rows = self._read(
            "SELECT * FROM containers WHERE user_id = ? AND name = ?", (user_id, name)
        )
        return _container_from_row(rows[0]) if rows else None

    def find_container(self, user_id: str, ref: str) -> ContainerRecord | None:
        """``user_id``'s container whose runtime id, db_id or name is ``ref`` (in that order).

        Another user's container is never returned, so the API answers 404 for it.
        """
        rows = self._read(
            """SELECT * FROM containers WHERE user_id = :user AND (id = :ref OR db_id = :ref
                   OR name = :ref)
               ORDER BY CASE WHEN id = :ref THEN 0 WHEN db_id = :ref THEN 1 ELSE 2 END
               LIMIT 1""",
            {"user": user_id, "ref": ref},
        )
        return _container_from_row(rows[0]) if rows else None

    def list_containers(self, user_id: str | None = None) -> list[ContainerRecord]:
        """Containers newest first; every user's when ``user_id`` is None (reconcile)."""
        order = " ORDER BY created_at DESC, rowid DESC"
        if user_id is None:
            rows = self._read("SELECT * FROM containers" + order)
        else:
            rows = self._read("SELECT * FROM containers WHERE user_id = ?" + order, (user_id,))
        return [_container_from_row(r) for r in rows]

    def count_containers(self, user_id: str) -> int:
        rows = self._read("SELECT count(*) AS n FROM containers WHERE user_id = ?", (user_id,))
        return int(rows[0]["n"])

    def container_counts(self) -> dict[str, int]:
        """Number of containers per status, over all users (for /health)."""
        rows = self._read("SELECT status, count(*) AS n FROM containers GROUP BY status")
        return {r["status"]: int(r["n"]) for r in rows}

    def update_container(self, db_id: str, **fields: Any) -> ContainerRecord:
        """Set ``fields`` on the container and return the new record.

        Values are validated as ``ContainerRecord`` fields first, so a bad status or a
        malformed resources object never reaches the database. Renaming onto a name
        the user already has raises Conflict.
        """
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"cannot update container fields {sorted(unknown)}")
        try:
            with self._write() as db:
                row = db.execute("SELECT * FROM containers WHERE db_id = ?", (db_id,)).fetchone()
                if row is None:
                    raise NotFound("container not found")
                current = _container_from_row(row)
                updated = ContainerRecord.model_validate({**current.model_dump(), **fields})
                if "name" in fields and updated.name != current.name:
                    _check_not_removing(db, current.user_id, updated.name)
                if fields:
                    sets = ", ".join(f"{c} = ?" for c in fields)
                    values = [_encode_column(c, getattr(updated, c)) for c in fields]
                    db.execute(f"UPDATE containers SET {sets} WHERE db_id = ?", (*values, db_id))
        except sqlite3.IntegrityError as exc:
            if _is_unique_violation(exc) and "name" in fields:
                raise Conflict(
                    "container with this name already exists", name=fields["name"]
                ) from None
            raise
        return updated

    def delete_container(self, db_id: str) -> bool:
        """Delete the record; its IP leases go with it (ON DELETE CASCADE)."""
        with self._write() as db:
            return db.execute("DELETE FROM containers WHERE db_id = ?", (db_id,)).rowcount > 0

    # -- IP leases ------------------------------------------------------------------

    def allocate_ip(self, container_db_id: str, subnet: IPv4Network) -> IPv4Address:
        """The lowest free host address of ``subnet`` for the container, leased atomically.

        The network address, the gateway (first host, the bridge) and the broadcast
        address are never handed out. A container that already holds a lease in the
        subnet gets the same address back, so a restart keeps its IP.
        """
        first = int(subnet.network_address) + 2
        last = int(subnet.broadcast_address) - 1
        with self._write() as db:
            leased: set[int] = set()
            for row in db.execute("SELECT ip, container_db_id FROM ip_leases"):
                ip = IPv4Address(row["ip"])
                if ip in subnet:
                    if row["container_db_id"] == container_db_id:
                        return ip
                    leased.add(int(ip))
            for candidate in range(first, last + 1):
                if candidate not in leased:
                    ip = IPv4Address(candidate)
                    db.execute(
                        "INSERT INTO ip_leases (ip, container_db_id, leased_at) VALUES (?, ?, ?)",
                        (str(ip), container_db_id, _ts(utcnow())),
                    )
                    return ip
        raise RuntimeUnavailable(f"no free IP address left in {subnet}", subnet=str(subnet))

    def release_ips(self, container_db_id: str) -> int:
        """Drop every lease the container holds; returns how many there were."""
        with self._write() as db:
            cur = db.execute("DELETE FROM ip_leases WHERE container_db_id = ?", (container_db_id,))
            return cur.rowcount

    def release_ip(self, ip: IPv4Address | str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM ip_leases WHERE ip = ?", (str(ip),)).rowcount > 0

    # -- user namespace id ranges ---------------------------------------------------

    def allocate_userns(self, container_db_id: str, count: int, *, per_user: bool = False) -> int:
        """The id-range slot of the container, leased atomically.

        A container that holds a range keeps it, whatever the mode was when it got it
        (its files on the host are owned by it). Else, with ``per_user``
        (``userns.mode: user``), it joins the range its owner's other containers share,
        one made the first time; else it gets a range of its own. A new range is the
        lowest free slot below ``count``; a range is only ever one user's."""
        with self._write() as db:
            row = db.execute(
                "SELECT slot FROM userns_leases WHERE container_db_id = ?", (container_db_id,)
            ).fetchone()
            if row is not None:
                return int(row["slot"])
            owner = db.execute(
                "SELECT user_id FROM containers WHERE db_id = ?", (container_db_id,)
            ).fetchone()
            if owner is None:
                raise NotFound(f"container {container_db_id} no longer exists")
            row = None
            if per_user:
                row = db.execute(
                    "SELECT slot FROM userns_ranges WHERE user_id = ? AND per_user = 1",
                    (owner["user_id"],),
                ).fetchone()
            now = _ts(utcnow())
            if row is not None:
                slot = int(row["slot"])
            else:
                slot = self._free_userns_slot(db, count)
                db.execute(
                    "INSERT INTO userns_ranges (slot, user_id, per_user, leased_at)"
                    " VALUES (?, ?, ?, ?)",
                    (slot, owner["user_id"], int(per_user), now),
                )
            db.execute(
                "INSERT INTO userns_leases (container_db_id, slot, leased_at) VALUES (?, ?, ?)",
                (container_db_id, slot, now),
            )
            return slot

    @staticmethod
    def _free_userns_slot(db: sqlite3.Connection, count: int) -> int:
        # The first gap: slot 0 if free, else one past a slot whose successor is free.
        row = db.execute(
            """SELECT 0 AS slot WHERE NOT EXISTS (SELECT 1 FROM userns_ranges WHERE slot = 0)
               UNION ALL
               SELECT a.slot + 1 FROM userns_ranges a WHERE NOT EXISTS
                 (SELECT 1 FROM userns_ranges b WHERE b.slot = a.slot + 1)
               ORDER BY slot LIMIT 1"""
        ).fetchone()
        slot = int(row["slot"])
        if slot >= count:
            raise RuntimeUnavailable(
                f"no free user namespace id range left (userns.count is {count})"
            )
        return slot

    def userns_slot(self, container_db_id: str) -> int | None:
        rows = self._read(
            "SELECT slot FROM userns_leases WHERE container_db_id = ?", (container_db_id,)
        )
        return int(rows[0]["slot"]) if rows else None

    def release_userns(self, container_db_id: str) -> bool:
        """Drop the container's lease; its range goes too unless other containers (of
        the same user, ``per_user``) still hold it. False when it held none."""
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM userns_leases WHERE container_db_id = ?", (container_db_id,)
            )
            return cur.rowcount > 0

    def list_userns_leases(self) -> dict[str, int]:
        """Slot by container db id."""
        rows = self._read("SELECT slot, container_db_id FROM userns_leases")
        return {r["container_db_id"]: int(r["slot"]) for r in rows}

    def list_userns_ranges(self) -> dict[int, tuple[str, bool]]:
        """The leased ranges: (owner's user id, shared by the user's containers) by slot."""
        rows = self._read("SELECT slot, user_id, per_user FROM userns_ranges")
        return {int(r["slot"]): (r["user_id"], bool(r["per_user"])) for r in rows}

    def list_leases(self) -> list[IpLease]:
        rows = self._read("SELECT * FROM ip_leases")
        leases = [
            IpLease(IPv4Address(r["ip"]), r["container_db_id"], _parse_ts(r["leased_at"]))
            for r in rows
        ]
        return sorted(leases, key=lambda lease: int(lease.ip))

    # -- volumes --------------------------------------------------------------------

    def upsert_volume(self, user_id: str, name: str, path: str, size_mb: int) -> VolumeRecord:
        """Record the user's volume for container name ``name`` as used now; keeps the
        first created_at."""
        now = _ts(utcnow())
        with self._write() as db:
            db.execute(
                """INSERT INTO volumes (user_id, name, path, size_mb, created_at, last_used_at)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT (user_id, name) DO UPDATE SET
                       path = excluded.path, size_mb = excluded.size_mb,
                       last_used_at = excluded.last_used_at""",
                (user_id, name, path, size_mb, now, now),
            )
            row = db.execute(
                "SELECT * FROM volumes WHERE user_id = ? AND name = ?", (user_id, name)
            ).fetchone()
        return _volume_from_row(row)

    def get_volume(self, user_id: str, name: str) -> VolumeRecord | None:
        rows = self._read("SELECT * FROM volumes WHERE user_id = ? AND name = ?", (user_id, name))
        return _volume_from_row(rows[0]) if rows else None

    def delete_volume(self, user_id: str, name: str) -> bool:
        with self._write() as db:
            cur = db.execute("DELETE FROM volumes WHERE user_id = ? AND name = ?", (user_id, name))
            return cur.rowcount > 0

    def list_volumes(self, user_id: str | None = None) -> list[VolumeRecord]:
        """Volumes by name, each with ``container_id`` set when a container owns it."""
        sql = """SELECT v.*, c.id AS container_id FROM volumes v
                 LEFT JOIN containers c ON c.user_id = v.user_id AND c.name = v.name"""
        if user_id is None:
            rows = self._read(sql + " ORDER BY v.user_id, v.name")
        else:
            rows = self._read(sql + " WHERE v.user_id = ? ORDER BY v.name", (user_id,))
        return [_volume_from_row(r, joined=True) for r in rows]

    def touch_volume(self, user_id: str, name: str, when: datetime, size_mb: int = 0) -> bool:
        """Mark the volume used at ``when`` (its container is being deleted), with at
        least ``size_mb``; False if there is no such record."""
        with self._write() as db:
            cur = db.execute(
                """UPDATE volumes SET last_used_at = ?, size_mb = max(size_mb, ?)
                   WHERE user_id = ? AND name = ?""",
                (_ts(when), size_mb, user_id, name),
            )
            return cur.rowcount > 0

    def kept_volumes(
        self, user_id: str | None = None, *, unused_since: datetime | None = None
    ) -> list[VolumeRecord]:
        """Volumes no container has (and not being removed), least recently used first;
        every user's when ``user_id`` is None, only those unused since before
        ``unused_since`` when given."""
        sql = f"SELECT v.* FROM volumes v WHERE v.removing = 0 AND {_NO_CONTAINER}"
        params: list[Any] = []
        if user_id is not None:
            sql += " AND v.user_id = ?"
            params.append(user_id)
        if unused_since is not None:
            sql += " AND coalesce(v.last_used_at, v.created_at) < ?"
            params.append(_ts(unused_since))
        sql += " ORDER BY coalesce(v.last_used_at, v.created_at), v.name"
        return [_volume_from_row(r) for r in self._read(sql, tuple(params))]

    def claim_volume(self, user_id: str, name: str) -> VolumeRecord:
        """Mark a kept volume as being removed, so no container takes its name until
        ``delete_volume``. NotFound without such a volume; Conflict when a container of
        that name exists (it owns the volume) or a removal is already under way."""
        with self._write() as db:
            row = db.execute(
                "SELECT * FROM volumes WHERE user_id = ? AND name = ?", (user_id, name)
            ).fetchone()
            if row is None:
                raise VolumeNotFound("volume not found", name=name)
            owner = db.execute(
                "SELECT name, status FROM containers WHERE user_id = ? AND name = ?",
                (user_id, name),
            ).fetchone()
            if owner is not None:
                raise Conflict(
                    f"volume is in use by container {name} ({owner['status']}): delete the "
                    "container with ?volumes=true instead",
                    name=name,
                    status=owner["status"],
                )
            if row["removing"]:
                raise Conflict("volume is already being removed", name=name)
            db.execute(
                "UPDATE volumes SET removing = 1 WHERE user_id = ? AND name = ?", (user_id, name)
            )
        return _volume_from_row(row)

    def volumes_being_removed(self) -> list[VolumeRecord]:
        """Claimed volumes whose removal has not finished (a crash interrupted it)."""
        rows = self._read("SELECT * FROM volumes WHERE removing = 1 ORDER BY user_id, name")
        return [_volume_from_row(r) for r in rows]

    # -- port forwards --------------------------------------------------------------

    def insert_port_forward(self, fwd: PortForwardRecord) -> None:
        """Record a forward; Conflict when its (protocol, host port) is recorded already."""
        try:
            with self._write() as db:
                db.execute(
                    """INSERT INTO port_forwards (id, container_db_id, protocol, host_port,
                           container_port, created_at) VALUES (?, ?, ?, ?, ?, ?)""",
                    (
                        fwd.id, fwd.container_db_id, fwd.protocol, fwd.host_port,
                        fwd.container_port, _ts(fwd.created_at),
                    ),
                )  # fmt: skip
        except sqlite3.IntegrityError as exc:
            if _is_unique_violation(exc):
                raise Conflict(
                    f"host port {fwd.host_port}/{fwd.protocol} is already forwarded",
                    host_port=fwd.host_port,
                    protocol=fwd.protocol,
                ) from None
            raise

    def get_port_forward(self, forward_id: str) -> PortForwardRecord | None:
        rows = self._read("SELECT * FROM port_forwards WHERE id = ?", (forward_id,))
        return _forward_from_row(rows[0]) if rows else None

    def list_port_forwards(self, container_db_id: str | None = None) -> list[PortForwardRecord]:
        """Forwards oldest first; every container's when ``container_db_id`` is None."""
        order = " ORDER BY created_at, rowid"
        if container_db_id is None:
            rows = self._read("SELECT * FROM port_forwards" + order)
        else:
            rows = self._read(
                "SELECT * FROM port_forwards WHERE container_db_id = ?" + order,
                (container_db_id,),
            )
        return [_forward_from_row(r) for r in rows]

    def delete_port_forward(self, forward_id: str) -> bool:
        with self._write() as db:
            cur = db.execute("DELETE FROM port_forwards WHERE id = ?", (forward_id,))
            return cur.rowcount > 0

    # -- events ---------------------------------------------------------------------

    def append_event(
        self,
        type: str,
        payload: Mapping[str, Any],
        *,
        user_id: str | None = None,
        container_db_id: str | None = None,
        ts: datetime | None = None,
        keep: int | None = None,
    ) -> int:
        """Append to the event log; returns the new sequence number. With ``keep``, the
        log is trimmed to about that many rows (every ``EVENT_PRUNE_EVERY`` appends)."""
        with self._write() as db:
            cur = db.execute(
                """INSERT INTO events (ts, user_id, container_db_id, type, payload)
                   VALUES (?, ?, ?, ?, ?)""",
                (_ts(ts or utcnow()), user_id, container_db_id, type, json.dumps(dict(payload))),
            )
            seq = cur.lastrowid
            assert seq is not None
            if keep is not None and seq % EVENT_PRUNE_EVERY == 0:
                db.execute("DELETE FROM events WHERE seq <= ?", (seq - max(keep, 0),))
        return seq

    def list_events(
        self, after_seq: int = 0, *, user_id: str | None = None, limit: int = 1000
    ) -> list[EventRecord]:
        """Events with ``seq > after_seq``, oldest first, at most ``limit`` of them."""
        if user_id is None:
            rows = self._read(
                "SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
            )
        else:
            rows = self._read(
                "SELECT * FROM events WHERE seq > ? AND user_id = ? ORDER BY seq LIMIT ?",
                (after_seq, user_id, limit),
            )
        return [_event_from_row(r) for r in rows]

    def last_event_seq(self) -> int:
        return int(self._read("SELECT coalesce(max(seq), 0) AS s FROM events")[0]["s"])

    def prune_events(self, keep: int, *, before: datetime | None = None) -> int:
        """Keep only the newest ``keep`` events, and none older than ``before`` when given;
        returns how many were dropped."""
        with self._write() as db:
            # seq only grows (AUTOINCREMENT), so "the newest keep" is a range of the key.
            dropped = db.execute(
                """DELETE FROM events
                   WHERE seq <= (SELECT coalesce(max(seq), 0) FROM events) - ?""",
                (max(keep, 0),),
            ).rowcount
            if before is not None:
                dropped += db.execute("DELETE FROM events WHERE ts < ?", (_ts(before),)).rowcount
            return dropped

    def count_events(self) -> int:
        return int(self._read("SELECT count(*) AS n FROM events")[0]["n"])
