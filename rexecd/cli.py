"""The ``rexecd`` command line: the daemon, its debug runner and its admin commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rexecd import __version__
from rexecd.errors import InvalidRequest, NotFound, RexecError, RuntimeUnavailable
from rexecd.logs import setup_logging

if TYPE_CHECKING:
    from rexecd.service.store import Store

DEFAULT_STATE = Path("/var/lib/rexecd")
DEFAULT_RUN = Path("/run/rexecd")
DEFAULT_CONFIG = Path("/etc/rexecd/rexecd.yaml")


def _cmd_run(a: argparse.Namespace) -> int:
    from rexecd.service.oneshot import run_foreground

    args = list(a.cmd)
    if args and args[0] == "--":
        args = args[1:]
    return run_foreground(
        Path(a.state_dir),
        Path(a.run_dir),
        a.image,
        args,
        remove=a.rm,
        hostname=a.hostname,
        env=a.env,
        user=a.user,
        workdir=a.workdir,
        cgroup_parent=a.cgroup_parent,
    )


def _cmd_image_import(a: argparse.Namespace) -> int:
    from rexecd.runtime.images import ImageStore

    rec = ImageStore(Path(a.state_dir) / "images").import_archive(Path(a.file), name=a.name)
    print(
        json.dumps(
            {"name": rec.ref, "digest": rec.digest, "size": rec.size, "layers": len(rec.layers)}
        )
    )
    return 0


def _cmd_image_ls(a: argparse.Namespace) -> int:
    from rexecd.runtime.images import ImageStore

    recs = ImageStore(Path(a.state_dir) / "images").list()
    if a.json:
        print(json.dumps([r.model_dump(mode="json") for r in recs], indent=2))
        return 0
    print(f"{'NAME':40} {'DIGEST':20} {'LAYERS':>6} {'SIZE':>12}")
    for r in recs:
        print(f"{r.ref:40} {r.digest[7:19]:20} {len(r.layers):>6} {r.size:>12}")
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    import asyncio

    from rexecd.config import apply_overrides, load_config
    from rexecd.daemon import serve

    if os.geteuid() != 0:
        raise RuntimeUnavailable("the daemon needs root (namespaces, mounts, cgroups, networking)")
    # An explicit --config must exist; the default path is read when it is there.
    path = Path(a.config) if a.config else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    cfg = load_config(path)
    cfg = apply_overrides(
        cfg,
        state_dir=a.state_dir,
        run_dir=a.run_dir,
        listen=a.listen or None,
        subnet=a.subnet,
        bridge=a.bridge,
        nft_table=a.nft_table,
        cgroup_parent=a.cgroup_parent,
    )
    asyncio.run(serve(cfg))
    return 0


def _store(a: argparse.Namespace) -> Store:
    from rexecd.service.store import Store

    return Store(Path(a.state_dir))


def _cmd_token_create(a: argparse.Namespace) -> int:
    from rexecd.service.auth import create_token

    with _store(a) as store:
        token, _out = create_token(
            store,
            a.user,
            tier=a.tier,
            scopes=a.scopes.split(","),
            name=a.name,
            expires_in_days=a.expires_in,
        )
    print(token)
    return 0


def _cmd_token_ls(a: argparse.Namespace) -> int:
    from rexecd.service.auth import token_out

    with _store(a) as store:
        user = store.get_user_by_name(a.user)
        if user is None:
            raise NotFound(f"no user {a.user!r}")
        rows = [token_out(t) for t in store.list_tokens(user.id)]
    print(f"{'ID':36} {'NAME':16} {'PREFIX':14} {'SCOPES':18} EXPIRES")
    for t in rows:
        exp = t.expires_at.isoformat() if t.expires_at else "never"
        print(f"{t.id:36} {t.name:16} {t.token_prefix:14} {','.join(t.scopes):18} {exp}")
    return 0


def _cmd_token_revoke(a: argparse.Namespace) -> int:
    with _store(a) as store:
        tok = store.get_token(a.id)
        if tok is None or not store.revoke_token(tok.user_id, a.id):
            raise NotFound(f"no token {a.id}")
    print(f"revoked {a.id}")
    return 0


def _check_tier(tier: str) -> None:
    from rexecd.config import TIER_NAMES

    if tier not in TIER_NAMES:
        raise InvalidRequest(f"unknown tier {tier!r}: one of {', '.join(TIER_NAMES)}")


def _cmd_user_add(a: argparse.Namespace) -> int:
    _check_tier(a.tier)
    with _store(a) as store:
        user = store.create_user(a.user, a.tier)
    print(user.id)
    return 0


def _cmd_user_set_tier(a: argparse.Namespace) -> int:
    _check_tier(a.tier)
    with _store(a) as store:
        user = store.get_user_by_name(a.user)
        if user is None:
            raise NotFound(f"no user {a.user!r}")
        store.set_user_tier(user.id, a.tier)
    print(f"{a.user}: {a.tier}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rexecd", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"rexecd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def dirs(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--state-dir", default=str(DEFAULT_STATE))
        sp.add_argument("--run-dir", default=str(DEFAULT_RUN))

    srv = sub.add_parser("serve", help="run the daemon in the foreground")
    srv.add_argument("--config", help="YAML config (default: /etc/rexecd/rexecd.yaml if present)")
    srv.add_argument("--state-dir")
    srv.add_argument("--run-dir")
    srv.add_argument("--listen", action="append", metavar="unix:PATH|tcp:HOST:PORT")
    srv.add_argument("--subnet")
    srv.add_argument("--bridge")
    srv.add_argument("--nft-table", help="the daemon's own nftables table name")
    srv.add_argument(
        "--cgroup-parent", help="the cgroup containers go under (relative to the daemon's own)"
    )
    srv.set_defaults(fn=_cmd_serve)

    tok = sub.add_parser("token", help="manage API tokens")
    tsub = tok.add_subparsers(dest="token_command", required=True)
    tc = tsub.add_parser("create", help="create a token (printed alone on stdout)")
    tc.add_argument("--state-dir", default=str(DEFAULT_STATE))
    tc.add_argument("--user", required=True)
    tc.add_argument("--tier")
    tc.add_argument("--scopes", default="read,write")
    tc.add_argument("--name", default="cli")
    tc.add_argument("--expires-in", type=int, metavar="DAYS")
    tc.set_defaults(fn=_cmd_token_create)
    tl = tsub.add_parser("ls", help="list a user's tokens")
    tl.add_argument("--state-dir", default=str(DEFAULT_STATE))
    tl.add_argument("--user", required=True)
    tl.set_defaults(fn=_cmd_token_ls)
    tr = tsub.add_parser("revoke", help="revoke a token by id")
    tr.add_argument("--state-dir", default=str(DEFAULT_STATE))
    tr.add_argument("id")
    tr.set_defaults(fn=_cmd_token_revoke)

    usr = sub.add_parser("user", help="manage users")
    usub = usr.add_subparsers(dest="user_command", required=True)
    ua = usub.add_parser("add", help="add a user")
    ua.add_argument("--state-dir", default=str(DEFAULT_STATE))
    ua.add_argument("user")
    ua.add_argument("--tier", default="free")
    ua.set_defaults(fn=_cmd_user_add)
    ut = usub.add_parser("set-tier", help="change a user's tier")
    ut.add_argument("--state-dir", default=str(DEFAULT_STATE))
    ut.add_argument("user")
    ut.add_argument("tier")
    ut.set_defaults(fn=_cmd_user_set_tier)

    run = sub.add_parser("run", help="run one container in the foreground (debug)")
    dirs(run)
    run.add_argument("--rm", action="store_true", help="remove the container's data on exit")
    run.add_argument("--hostname")
    run.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    run.add_argument("-u", "--user")
    run.add_argument("-w", "--workdir")
    run.add_argument("--cgroup-parent", default="rexecd")
    run.add_argument("image")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    run.set_defaults(fn=_cmd_run)

    img = sub.add_parser("image", help="manage imported images")
    isub = img.add_subparsers(dest="image_command", required=True)
    imp = isub.add_parser("import", help="import an OCI-layout or docker-archive tarball")
    dirs(imp)
    imp.add_argument("file")
    imp.add_argument("--name", help="NAME:TAG to tag it with")
    imp.set_defaults(fn=_cmd_image_import)
    ls = isub.add_parser("ls", help="list images")
    dirs(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=_cmd_image_ls)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        code = args.fn(args)
    except RexecError as exc:
        print(f"rexecd: {exc.message}", file=sys.stderr)
        code = 125
    except PermissionError as exc:  # an admin command run as a user without access
        where = f" {exc.filename}" if exc.filename else ""
        hint = "" if os.geteuid() == 0 else " (run it as root)"
        print(f"rexecd: permission denied:{where}{hint}", file=sys.stderr)
        code = 126
    except FileNotFoundError as exc:
        print(f"rexecd: no such file: {exc.filename or exc}", file=sys.stderr)
        code = 127
    except ValueError as exc:  # ConfigError and bad arguments: say what, not a traceback
        print(f"rexecd: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
