"""The ``rexec`` command line: manage rexecd containers and open terminals on them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

# Only what a start needs: aiohttp, pydantic and the models come in with the command
# that uses them (rexec ls needs neither; see bench/cli_latency.py).
from rexecd.client.base import (
    DEFAULT_DETACH_KEYS,
    DEFAULT_HOST,
    ApiError,
    ProtocolError,
    TransportError,
    get_json,
)

if TYPE_CHECKING:
    from pydantic import BaseModel

    from rexecd.client.sdk import AsyncClient
    from rexecd.models import ContainerOut, Event, ExecResult, PortForwardOut, VolumeOut

Handler = Callable[["AsyncClient", argparse.Namespace], Awaitable[int]]


# --- output ----------------------------------------------------------------------------


def _out(text: str) -> None:
    # sys.stdout is looked up at each call so redirection (and test capture) applies.
    sys.stdout.write(text)


def _err(text: str) -> None:
    sys.stderr.write(text)


def _json_of(value: BaseModel | list[BaseModel] | dict[str, Any]) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, list):
        return [v.model_dump(mode="json", by_alias=True) for v in value]
    return value


def _print_json(value: BaseModel | list[BaseModel] | dict[str, Any]) -> None:
    _out(json.dumps(_json_of(value), indent=2) + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, with a header line."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return "\n".join(lines) + "\n"


def _show(wants_json: bool, value: BaseModel | list[BaseModel] | dict[str, Any], text: str) -> None:
    if wants_json:
        _print_json(value)
    else:
        _out(text)


def _age(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return "-"
    seconds = int(((now or datetime.now(UTC)) - when).total_seconds())
    if seconds < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _when(when: datetime | None, never: str = "never") -> str:
    return never if when is None else when.strftime("%Y-%m-%d %H:%M")


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole > 0 else "-"


CONTAINER_COLUMNS = ("NAME", "ID", "IMAGE", "STATUS", "CPU", "MEMORY", "DISK", "IP", "CREATED")


def _container_row(c: ContainerOut | Mapping[str, Any]) -> list[str]:
    d = c if isinstance(c, Mapping) else c.model_dump(mode="json", by_alias=True)
    r = d["resources"]
    return [
        d["name"],
        d["id"][:12],
        d["image"],
        d["status"],
        f"{r['cpu_shares']}m",
        f"{r['memory_mb']}M",
        f"{r['disk_mb']}M",
        d.get("ip_address") or "-",
        _age(_datetime(d.get("created_at"))),
    ]


def _datetime(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _containers_table(containers: Sequence[ContainerOut | Mapping[str, Any]]) -> str:
    return table(CONTAINER_COLUMNS, [_container_row(c) for c in containers])


# --- commands --------------------------------------------------------------------------


def _wants_json(a: argparse.Namespace) -> bool:
    return bool(getattr(a, "json", False))


async def _ls(c: AsyncClient, a: argparse.Namespace) -> int:
    result = await c.list_containers()
    _show(_wants_json(a), result, _containers_table(result.containers))
    return 0


def _ls_now(a: argparse.Namespace) -> int:
    """``rexec ls`` without the event loop, aiohttp or pydantic: one GET, one table."""
    host = getattr(a, "host", None) or os.environ.get("REXEC_HOST") or DEFAULT_HOST
    token = getattr(a, "token", None)
    token = (token if token is not None else os.environ.get("REXEC_TOKEN")) or None
    body = get_json(host, token, "/api/containers")
    if not isinstance(body, dict) or not isinstance(body.get("containers"), list):
        raise ProtocolError("unexpected answer to GET /api/containers")
    if _wants_json(a):
        _out(json.dumps(body, indent=2) + "\n")
    else:
        _out(_containers_table(body["containers"]))
    return 0


async def _inspect(c: AsyncClient, a: argparse.Namespace) -> int:
    container = await c.get(a.container)
    if _wants_json(a):
        _print_json(container)
        return 0
    data = container.model_dump(mode="json", by_alias=True)
    resources = data.pop("resources")
    rows = [[k, "-" if v is None else str(v)] for k, v in data.items()]
    rows += [[f"resources.{k}", str(v)] for k, v in resources.items()]
    _out(table(("FIELD", "VALUE"), rows))
    return 0


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected K=V, got {item!r}")
    return key, value


async def _create(c: AsyncClient, a: argparse.Namespace) -> int:
    if a.progress:
        return await _create_with_progress(c, a)
    container = await c.create(
        a.image, **_create_fields(a), wait=a.wait, wait_timeout=a.wait_timeout
    )
    return _created(a, container)


def _create_fields(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": a.name,
        "role": a.role,
        "custom_image": a.custom_image,
        "memory_mb": a.memory,
        "cpu_shares": a.cpu,
        "disk_mb": a.disk,
        "environment": dict(a.env),
    }


async def _create_with_progress(c: AsyncClient, a: argparse.Namespace) -> int:
    """Follow the creation's stages (an image pull's MB included) on a progress bar."""
    from rexecd.client.progress import ProgressBar

    bar = ProgressBar()
    container: ContainerOut | None = None
    error = None
    try:
        async for frame in c.create_stream(a.image, **_create_fields(a)):
            bar.update(frame.progress, f"{frame.stage}: {frame.message}")
            container = frame.container or container
            error = frame.error or error
    finally:
        bar.done()
    if container is None:
        _err(f"rexec: create failed: {error or 'the stream ended early'}\n")
        return 1
    return _created(a, container)


def _created(a: argparse.Namespace, container: ContainerOut) -> int:
    _show(_wants_json(a), container, _containers_table([container]))
    _warn_clamped(container)
    if container.status == "error":
        _err(f"rexec: container {container.name} failed: {container.error_message or 'error'}\n")
        return 1
    return 0


_SIZE_UNITS = {
    "memory_mb": ("memory", "MB"),
    "cpu_shares": ("cpu", "millicores"),
    "disk_mb": ("disk", "MB"),
}


def _warn_clamped(c: ContainerOut) -> None:
    """One warning line per size the daemon changed from what was asked (on stderr,
    so it shows with --json too)."""
    for cl in c.clamped or ():
        what, unit = _SIZE_UNITS.get(cl.field, (cl.field, ""))
        why = "the tier's limit" if cl.granted < cl.requested else "the minimum"
        _err(
            f"rexec: warning: {what} {cl.requested} {unit} was set to {cl.granted} {unit} ({why})\n"
        )


async def _action(c: AsyncClient, a: argparse.Namespace) -> int:
    if a.command == "start":
        result = await c.start(a.container)
    elif a.command == "stop":
        result = await c.stop(a.container, timeout=a.timeout)
    else:
        result = await c.restart(a.container)
    rows = [[result.name, result.id[:12], result.status, result.message]]
    _show(_wants_json(a), result, table(("NAME", "ID", "STATUS", "MESSAGE"), rows))
    return 0


async def _rm(c: AsyncClient, a: argparse.Namespace) -> int:
    result = await c.delete(a.container, volumes=a.volumes)
    rows = [[result.name, result.id[:12], result.message]]
    _show(_wants_json(a), result, table(("NAME", "ID", "MESSAGE"), rows))
    return 0


async def _update(c: AsyncClient, a: argparse.Namespace) -> int:
    result = await c.update_settings(
        a.container, name=a.name, memory_mb=a.memory, cpu_shares=a.cpu, disk_mb=a.disk
    )
    text = _containers_table([result.container])
    if result.restarted:
        text += "(the container was restarted to apply the change)\n"
    _show(_wants_json(a), result, text)
    _warn_clamped(result.container)
    return 0


def _exit_status(code: int) -> int:
    # A shell can only see 0-255; a negative or huge code still has to read as failure.
    return code if 0 <= code <= 255 else 1


async def _exec(c: AsyncClient, a: argparse.Namespace) -> int:
    argv = list(a.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise _UsageError("exec needs a command after the container name (rexec exec NAME -- CMD)")
    if a.interactive or a.tty:
        return await _exec_stream(c, a, argv)
    try:
        result = await c.exec(
            a.container,
            argv,
            workdir=a.workdir,
            env=[f"{k}={v}" for k, v in a.env],
            user=a.user,
            timeout_seconds=a.timeout,
        )
    except ApiError as e:
        if e.status == 504 and "stdout" in e.body:
            # Show what the command printed before the deadline, then one line on it.
            _out(str(e.body.get("stdout") or ""))
            sys.stdout.flush()
            _err(str(e.body.get("stderr") or "").removesuffix("command timed out\n"))
            # The 504 body is the partial result, not an error object: say it as one.
            from rexecd.errors import ExecTimeout

            raise ApiError(504, ExecTimeout("command timed out").to_json()) from None
        raise
    _print_exec(result, _wants_json(a))
    return _exit_status(result.exit_code)


async def _exec_stream(c: AsyncClient, a: argparse.Namespace, argv: list[str]) -> int:
    from rexecd.client.interactive import run_stream
    from rexecd.client.terminal import terminal_size

    size = terminal_size(1) or terminal_size(0) if a.tty else None
    stream = c.exec_stream(
        a.container,
        argv,
        tty=a.tty,
        size=size,
        workdir=a.workdir,
        env=[f"{k}={v}" for k, v in a.env],
        user=a.user,
        timeout_seconds=a.timeout,
    )
    async with stream:
        return await run_stream(stream, interactive=a.interactive, tty=a.tty)


def _print_exec(result: ExecResult, wants_json: bool) -> None:
    if wants_json:
        _print_json(result)
        return
    _out(result.stdout)
    sys.stdout.flush()
    _err(result.stderr)
    if result.truncated:
        _err("rexec: output truncated (1 MiB limit)\n")


async def _connect(c: AsyncClient, a: argparse.Namespace) -> int:
    from rexecd.client.terminal import attach, parse_detach_keys

    try:
        detach = parse_detach_keys(a.detach_keys)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    escape = None if a.escape_char == "none" else a.escape_char.encode()
    if escape is not None and len(escape) != 1:
        raise _UsageError("--escape-char takes one character, or 'none'")
    async with c.terminal(a.container, session=a.session, new_session=a.new_session) as term:
        return await attach(term, detach_keys=detach, escape_char=escape)


async def _cp(c: AsyncClient, a: argparse.Namespace) -> int:
    from rexecd.client import copy

    src, dst = copy.parse_endpoint(a.src), copy.parse_endpoint(a.dst)
    try:
        copy.check_pair(src, dst)
        if dst.container is not None:
            status = await copy.copy_to(c, a.src, dst)
        else:
            status = await copy.copy_from(c, src, a.dst)
    except copy.CopyError as e:
        raise _UsageError(str(e)) from None
    if _wants_json(a):
        _print_json({"source": a.src, "destination": a.dst, "exit_code": status})
    return status


async def _logs(c: AsyncClient, a: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    async for chunk in c.logs(a.container, follow=a.follow):
        if _wants_json(a):
            # One object per chunk as it comes (with -f a stream of JSON lines).
            text = chunk.decode("utf-8", "replace")
            out.write(json.dumps({"container": a.container, "data": text}).encode() + b"\n")
        else:
            out.write(chunk)
        out.flush()
    return 0


async def _stats(c: AsyncClient, a: argparse.Namespace) -> int:
    s = await c.stats(a.container)
    row = [
        a.container,
        f"{s.cpu_percent:.1f}%",
        f"{_bytes(s.memory)} / {_bytes(s.memory_limit)}",
        _percent(s.memory, s.memory_limit),
        str(s.pids),
        f"{_bytes(s.disk_usage)} / {_bytes(s.disk_limit)}",
        f"{_bytes(s.net_rx)} / {_bytes(s.net_tx)}",
        f"{_bytes(s.disk_read)} / {_bytes(s.disk_write)}",
        str(s.oom_kills),
    ]
    headers = ("NAME", "CPU", "MEMORY", "MEM%", "PIDS", "DISK", "NET RX/TX", "BLOCK R/W", "OOM")
    _show(_wants_json(a), s, table(headers, [row]))
    return 0


PORT_COLUMNS = ("ID", "HOST", "CONTAINER", "PROTOCOL", "CREATED")


def _ports_table(forwards: Sequence[PortForwardOut]) -> str:
    rows = [
        [f.id, f"{f.host}:{f.host_port}", str(f.container_port), f.protocol, _age(f.created_at)]
        for f in forwards
    ]
    return table(PORT_COLUMNS, rows)


async def _ports_ls(c: AsyncClient, a: argparse.Namespace) -> int:
    result = await c.list_port_forwards(a.container)
    _show(_wants_json(a), result, _ports_table(result.port_forwards))
    return 0


async def _ports_add(c: AsyncClient, a: argparse.Namespace) -> int:
    fwd = await c.add_port_forward(
        a.container, a.container_port, host_port=a.host_port, protocol=a.protocol
    )
    _show(_wants_json(a), fwd, _ports_table([fwd]))
    return 0


async def _ports_rm(c: AsyncClient, a: argparse.Namespace) -> int:
    result = await c.delete_port_forward(a.container, a.id)
    rows = [[result.id, str(result.host_port), result.protocol, result.message]]
    _show(_wants_json(a), result, table(("ID", "HOST PORT", "PROTOCOL", "MESSAGE"), rows))
    return 0


VOLUME_COLUMNS = ("NAME", "SIZE", "USED", "IN USE", "LAST USED", "EXPIRES")


def _volume_row(v: VolumeOut) -> list[str]:
    return [
        v.name,
        f"{v.disk_mb}M",
        "-" if v.used_bytes is None else _bytes(v.used_bytes),
        "yes" if v.in_use else "no",
        _age(v.last_used_at),
        _when(v.expires_at, "-"),
    ]


async def _volumes_ls(c: AsyncClient, a: argparse.Namespace) -> int:
    result = await c.list_volumes()
    text = table(VOLUME_COLUMNS, [_volume_row(v) for v in result.volumes])
    text += (
        f"kept: {result.kept} of {result.kept_limit} volumes, "
        f"{result.kept_mb} of {result.kept_mb_limit} MB\n"
    )
    _show(_wants_json(a), result, text)
    return 0


async def _volumes_rm(c: AsyncClient, a: argparse.Namespace) -> int:
    for name in a.names:
        result = await c.delete_volume(name)
        if _wants_json(a):
            _print_json(result)
        else:
            _out(f"{result.name}\n")
    return 0


async def _images(c: AsyncClient, a: argparse.Namespace) -> int:
    result = await c.images()
    rows = [
        [
            i.name,
            i.display_name,
            i.category,
            ",".join(i.tags),
            "yes" if i.available else "no",
        ]
        for i in result.images
    ]
    text = table(("NAME", "DISPLAY NAME", "CATEGORY", "TAGS", "AVAILABLE"), rows)
    _show(_wants_json(a), result, text)
    return 0


async def _import_image(c: AsyncClient, a: argparse.Namespace) -> int:
    result = await c.import_image(a.file, name=a.name)
    rows = [[result.name, result.digest, _bytes(result.size), str(result.layers)]]
    _show(_wants_json(a), result, table(("NAME", "DIGEST", "SIZE", "LAYERS"), rows))
    return 0


async def _roles(c: AsyncClient, a: argparse.Namespace) -> int:
    result = await c.roles()
    rows = [[r.id, r.name, str(len(r.packages)), r.description] for r in result.roles]
    _show(_wants_json(a), result, table(("ID", "NAME", "PACKAGES", "DESCRIPTION"), rows))
    return 0


async def _token_create(c: AsyncClient, a: argparse.Namespace) -> int:
    scopes = [s for s in a.scopes.split(",") if s] if a.scopes else None
    t = await c.create_token(a.name, scopes=scopes, expires_in=a.expires_in)
    rows = [[t.id, t.name, ",".join(t.scopes), _when(t.expires_at), t.token]]
    _show(_wants_json(a), t, table(("ID", "NAME", "SCOPES", "EXPIRES", "TOKEN"), rows))
    if not _wants_json(a):
        _err("rexec: store the token now, it is not shown again\n")
    return 0


async def _token_ls(c: AsyncClient, a: argparse.Namespace) -> int:
    result = await c.list_tokens()
    rows = [
        [
            t.id,
            t.name,
            t.token_prefix,
            ",".join(t.scopes),
            _when(t.expires_at),
            _when(t.created_at),
            _when(t.last_used_at),
        ]
        for t in result.tokens
    ]
    headers = ("ID", "NAME", "PREFIX", "SCOPES", "EXPIRES", "CREATED", "LAST USED")
    _show(_wants_json(a), result, table(headers, rows))
    return 0


async def _token_rm(c: AsyncClient, a: argparse.Namespace) -> int:
    result = await c.revoke_token(a.id)
    message = result.get("message") if isinstance(result.get("message"), str) else "revoked"
    _show(_wants_json(a), result, table(("ID", "MESSAGE"), [[a.id, str(message)]]))
    return 0


async def _whoami(c: AsyncClient, a: argparse.Namespace) -> int:
    v = await c.validate_token()
    rows = [[v.user_name, v.user_id, v.tier, ",".join(v.scopes), v.token_id, _when(v.expires_at)]]
    headers = ("USER", "USER ID", "TIER", "SCOPES", "TOKEN ID", "EXPIRES")
    _show(_wants_json(a), v, table(headers, rows))
    return 0


async def _health(c: AsyncClient, a: argparse.Namespace) -> int:
    h = await c.health()
    rows = [[h.status, h.version, str(h.containers_total), str(h.containers_running), h.cgroup]]
    headers = ("STATUS", "VERSION", "CONTAINERS", "RUNNING", "CGROUP")
    _show(_wants_json(a), h, table(headers, rows))
    return 0


async def _version(c: AsyncClient, a: argparse.Namespace) -> int:
    v = await c.version()
    _show(_wants_json(a), v, table(("VERSION", "BUILD"), [[v.version, v.build]]))
    return 0


def _event_line(e: Event) -> str:
    stamp = e.timestamp.strftime("%Y-%m-%dT%H:%M:%SZ") if e.timestamp else "-"
    if e.type == "list":
        return f"{stamp}  list  {len(e.containers or [])} containers\n"
    if e.container is None:
        return f"{stamp}  {e.type}\n"
    return f"{stamp}  {e.type}  {e.container.name}  {e.container.status}\n"


async def _events(c: AsyncClient, a: argparse.Namespace) -> int:
    async with c.events() as stream:
        async for event in stream:
            if _wants_json(a):
                _out(json.dumps(_json_of(event)) + "\n")
            else:
                _out(_event_line(event))
            sys.stdout.flush()
    return 0


# --- parser and entry point ------------------------------------------------------------


class _UsageError(Exception):
    """A command line that parses but cannot be run; exit status 2 like argparse."""


def _common() -> argparse.ArgumentParser:
    # SUPPRESS defaults, so an option given before the command is not reset by the
    # subcommand parser, and may also be given after it.
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--host",
        default=argparse.SUPPRESS,
        help=f"unix:PATH or http://HOST:PORT (default $REXEC_HOST or {DEFAULT_HOST})",
    )
    p.add_argument("--token", default=argparse.SUPPRESS, help="API token (default $REXEC_TOKEN)")
    p.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the daemon's JSON instead of a table",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    p = argparse.ArgumentParser(
        prog="rexec", description="Manage rexecd containers.", parents=[common]
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=text, description=text)
        sp.set_defaults(func=handler)
        return sp

    def sizes(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--memory", type=int, metavar="MB", help="memory limit in MB")
        sp.add_argument("--cpu", type=int, metavar="MILLICORES", help="CPU (1000 = one core)")
        sp.add_argument("--disk", type=int, metavar="MB", help="disk quota in MB")

    command("ls", _ls, "list your containers")

    sp = command("create", _create, "create a container")
    sp.add_argument("image")
    sp.add_argument("--name", help="container name (generated when absent)")
    sp.add_argument("--role", help="role to set the container up for (see rexec roles)")
    sizes(sp)
    sp.add_argument("-e", "--env", action="append", default=[], type=_key_value, metavar="K=V")
    sp.add_argument("--custom-image", metavar="REF", help="the image, when IMAGE is custom")
    sp.add_argument("--wait", action="store_true", help="wait until it is running")
    sp.add_argument("--wait-timeout", type=float, default=300.0, metavar="S")
    sp.add_argument(
        "--progress", action="store_true", help="wait, showing each stage (and pull) on a bar"
    )

    command("inspect", _inspect, "show one container").add_argument("container")
    command("start", _action, "start a container").add_argument("container")
    sp = command("stop", _action, "stop a container")
    sp.add_argument("container")
    sp.add_argument("--timeout", type=float, metavar="S", help="grace before SIGKILL")
    command("restart", _action, "restart a container").add_argument("container")
    sp = command("rm", _rm, "delete a container")
    sp.add_argument("container")
    sp.add_argument("--volumes", action="store_true", help="also delete its /home/user volume")
    sp = command("update", _update, "rename or resize a container")
    sp.add_argument("container")
    sp.add_argument("--name", help="new name")
    sizes(sp)

    sp = command("exec", _exec, "run a command in a container and exit with its status")
    sp.add_argument("container")
    sp.add_argument("-w", "--workdir")
    sp.add_argument("-u", "--user")
    sp.add_argument("-e", "--env", action="append", default=[], type=_key_value, metavar="K=V")
    sp.add_argument(
        "--timeout",
        type=int,
        metavar="S",
        help="deadline (default 60, max 300; none with -i/-t unless given)",
    )
    sp.add_argument(
        "-i", "--interactive", action="store_true", help="stream stdin into the command"
    )
    sp.add_argument("-t", "--tty", action="store_true", help="run the command on a PTY")
    # The command is cut off the line by _split_exec before argparse sees it.
    sp.add_argument("cmd", nargs="*", metavar="-- CMD")
    p.set_defaults(exec_parser=sp)

    sp = command("connect", _connect, "open an interactive terminal in a container")
    sp.add_argument("container")
    sp.add_argument("--session", metavar="ID", help="session to open or take over")
    sp.add_argument("--new-session", action="store_true", help="always start a fresh shell")
    sp.add_argument(
        "--detach-keys",
        metavar="KEYS",
        default=os.environ.get("REXEC_DETACH_KEYS", DEFAULT_DETACH_KEYS),
        help="keys that detach and leave the session running "
        f"(default $REXEC_DETACH_KEYS or {DEFAULT_DETACH_KEYS}; '' disables)",
    )
    sp.add_argument(
        "-e",
        "--escape-char",
        metavar="CHAR",
        default="~",
        help="ssh-style escape at the start of a line: CHAR. disconnects (default ~; 'none')",
    )

    sp = command("cp", _cp, "copy files or directories between here and a container")
    sp.add_argument("src", metavar="SRC", help="a local path, or NAME:PATH")
    sp.add_argument("dst", metavar="DST", help="NAME:PATH, or a local path")

    sp = command("logs", _logs, "show a container's init and role-install output")
    sp.add_argument("container")
    sp.add_argument("-f", "--follow", action="store_true", help="keep printing new output")

    command("stats", _stats, "show a container's resource usage").add_argument("container")
    command("images", _images, "list the images you can create containers from")
    sp = command("import-image", _import_image, "import an OCI or docker-archive tarball")
    sp.add_argument("file")
    sp.add_argument("--name", metavar="NAME:TAG")
    command("roles", _roles, "list the container roles")
    command("events", _events, "follow container events until interrupted")
    command("health", _health, "show the daemon's health")
    command("version", _version, "show the daemon's version")
    command("whoami", _whoami, "show who the token belongs to")

    ports = sub.add_parser(
        "ports", parents=[common], help="forward host loopback ports to a container"
    )
    psub = ports.add_subparsers(dest="ports_command", required=True, metavar="COMMAND")
    sp = psub.add_parser("ls", parents=[common], help="list a container's port forwards")
    sp.add_argument("container")
    sp.set_defaults(func=_ports_ls)
    sp = psub.add_parser(
        "add", parents=[common], help="forward 127.0.0.1:HOST_PORT to a container's port"
    )
    sp.add_argument("container")
    sp.add_argument("container_port", type=int, metavar="CONTAINER_PORT")
    sp.add_argument(
        "--host-port", type=int, metavar="PORT", help="host port (default: the daemon picks one)"
    )
    sp.add_argument("--protocol", choices=("tcp", "udp"), default="tcp")
    sp.set_defaults(func=_ports_add)
    sp = psub.add_parser("rm", parents=[common], help="remove a port forward")
    sp.add_argument("container")
    sp.add_argument("id")
    sp.set_defaults(func=_ports_rm)

    volumes = sub.add_parser(
        "volumes", parents=[common], help="list or delete your kept /home/user volumes"
    )
    vsub = volumes.add_subparsers(dest="volumes_command", required=True, metavar="COMMAND")
    vsub.add_parser("ls", parents=[common], help="list your volumes").set_defaults(func=_volumes_ls)
    sp = vsub.add_parser("rm", parents=[common], help="delete kept volumes and their data")
    sp.add_argument("names", nargs="+", metavar="NAME")
    sp.set_defaults(func=_volumes_rm)

    tokens = sub.add_parser("tokens", parents=[common], help="manage API tokens")
    tsub = tokens.add_subparsers(dest="tokens_command", required=True, metavar="COMMAND")
    sp = tsub.add_parser("create", parents=[common], help="create a token")
    sp.add_argument("name")
    sp.add_argument("--scopes", metavar="read,write,admin")
    sp.add_argument("--expires-in", type=int, metavar="DAYS")
    sp.set_defaults(func=_token_create)
    tsub.add_parser("ls", parents=[common], help="list tokens").set_defaults(func=_token_ls)
    sp = tsub.add_parser("rm", parents=[common], help="revoke a token")
    sp.add_argument("id")
    sp.set_defaults(func=_token_rm)
    return p


_MAKE_TOKEN = "make a token on the daemon's host with: rexecd token create --user NAME"


def describe_error(e: ApiError, token_given: bool = True) -> str:
    """One line for an API error: ``container not found (404)`` plus what helps next."""
    text = str(e)
    body = e.body
    if e.status == 429 and e.retry_after is not None:
        text += f", retry after {e.retry_after:g}s"
    elif e.status == 401 and not token_given:
        text += f"; set REXEC_TOKEN or pass --token ({_MAKE_TOKEN})"
    elif e.status == 401:
        text += f"; {_MAKE_TOKEN}"
    elif e.code == "exec_timeout":
        text += "; give a longer --timeout (at most 300 s), or use -i for no deadline"
    elif "limit" in body and "current" in body:
        text += f": {body['current']} of {body['limit']}"
        if "tier" in body:
            text += f" on tier {body['tier']}"
    elif isinstance(body.get("supported_images"), list):
        text += ": supported: " + ", ".join(str(i) for i in body["supported_images"])
        text += "; rexec images lists them, an admin adds one with rexec import-image FILE"
    elif isinstance(body.get("details"), list) and body["details"]:
        first = body["details"][0]
        if isinstance(first, dict) and "msg" in first:
            where = ".".join(str(p) for p in first.get("loc", ()))
            text += f": {where + ': ' if where else ''}{first['msg']}"
    return text


async def _run(client: AsyncClient, handler: Handler, a: argparse.Namespace) -> int:
    async with client:
        return await handler(client, a)


def _takes_value(parser: argparse.ArgumentParser, arg: str) -> bool | None:
    """Whether option ``arg`` consumes the next word; None when it is not an option."""
    if arg.startswith("--") and "=" in arg:
        return False
    action = parser._option_string_actions.get(arg)
    if action is not None:
        return action.nargs != 0
    if arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
        # Bundled short flags (-it), or a short option with its value attached (-uroot).
        first = parser._option_string_actions.get(arg[:2])
        return False if first is not None else None
    return None


def _split_exec(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` cut into what argparse parses and the command of ``rexec exec``.

    Options may come before and after the container name; the command starts at
    ``--`` or at the first word that is not an option (as with podman), so
    ``exec box --timeout 120 -- cmd`` and ``exec box ls -l`` both mean what they say.
    """
    exec_parser: argparse.ArgumentParser = parser.get_default("exec_parser")
    i = 0
    seen: str | None = None
    current = parser
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return (argv[:i], argv[i + 1 :]) if seen == "container" else (argv, [])
        takes = _takes_value(current, arg)
        if takes is not None:
            i += 2 if takes else 1
            continue
        if seen is None:
            if arg != "exec":
                return argv, []
            seen, current = "exec", exec_parser
        elif seen == "exec":
            seen = "container"
        else:
            return argv[:i], argv[i:]
        i += 1
    return argv, []


def _plain_ls(words: list[str]) -> argparse.Namespace | None:
    """``words`` as the namespace of a plain ``rexec ls [--json] [--host H] [--token T]``,
    or None for anything else: building the whole parser costs more than the listing."""
    a = argparse.Namespace(func=_ls, command="ls")
    seen_ls = False
    i = 0
    while i < len(words):
        word = words[i]
        key, eq, value = word.partition("=")
        if word == "ls" and not seen_ls:
            seen_ls = True
        elif word == "--json":
            a.json = True
        elif key in ("--host", "--token") and eq:
            setattr(a, key[2:], value)
        elif word in ("--host", "--token") and i + 1 < len(words):
            setattr(a, word[2:], words[i + 1])
            i += 1
        else:
            return None
        i += 1
    return a if seen_ls else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rexec``; returns the exit status (0, 1 on errors, the command's for exec)."""
    words = list(sys.argv[1:] if argv is None else argv)
    quick = _plain_ls(words)
    if quick is not None:
        try:
            return _ls_now(quick)
        except ApiError as e:
            _fail(quick, describe_error(e, token_given=_token_given(quick)), _api_extra(e))
            return 1
        except (TransportError, ProtocolError) as e:
            _fail(quick, str(e), {"code": "transport_error"})
            return 1
        except ValueError:
            pass  # a bad or an https REXEC_HOST: the full path says so, or serves it
    parser = build_parser()
    head, command_words = _split_exec(parser, words)
    a = parser.parse_args(head)
    if command_words:
        a.cmd = command_words
    token_given = _token_given(a)
    try:
        host = getattr(a, "host", None) or os.environ.get("REXEC_HOST") or DEFAULT_HOST
        if a.func is _ls and not host.startswith("https:"):
            try:
                return _ls_now(a)
            except ValueError as e:  # a bad REXEC_HOST
                parser.error(str(e))
        import asyncio

        from rexecd.client.sdk import AsyncClient

        try:
            client = AsyncClient(getattr(a, "host", None), getattr(a, "token", None))
        except ValueError as e:
            parser.error(str(e))
        token_given = client.token is not None
        return asyncio.run(_run(client, a.func, a))
    except ApiError as e:
        text = describe_error(e, token_given=token_given)
        _fail(a, text, _api_extra(e))
    except (TransportError, ProtocolError, TimeoutError) as e:
        _fail(a, str(e) or "timed out", {"code": "transport_error"})
    except _UsageError as e:
        _fail(a, str(e), {"code": "usage_error"})
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


def _token_given(a: argparse.Namespace) -> bool:
    return (getattr(a, "token", None) or os.environ.get("REXEC_TOKEN")) is not None


def _api_extra(e: ApiError) -> dict[str, Any]:
    return {"status": e.status, "code": e.code, "body": e.body}


def _fail(a: argparse.Namespace, text: str, extra: dict[str, Any]) -> None:
    """The error on stderr: one line, or with --json one JSON object (stdout stays for
    what a command prints)."""
    if _wants_json(a):
        _err(json.dumps({"error": text, **extra}) + "\n")
    else:
        _err(f"rexec: {text}\n")


if __name__ == "__main__":
    sys.exit(main())
