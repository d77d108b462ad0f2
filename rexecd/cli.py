"""The ``rexecd`` command line: the daemon, its debug runner and its admin commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rexecd import __version__
from rexecd.errors import ConfigError, InvalidRequest, NotFound, RexecError, RuntimeUnavailable
from rexecd.logs import setup_logging

if TYPE_CHECKING:
    from rexecd.config import Config
    from rexecd.runtime.images import ImageRecord, ImageStore
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
        seccomp=a.seccomp,
    )


def _cmd_seccomp_show(a: argparse.Namespace) -> int:
    from rexecd.config import load_config
    from rexecd.runtime import seccomp

    if a.profile:
        ref, where = a.profile, {}
    else:
        _check_tier(a.tier)
        cfg = load_config(Path(a.config) if a.config else None)
        ref, where = cfg.tiers.get(a.tier).seccomp, {"tier": a.tier}
    if a.pfc:
        profile = seccomp.load_profile(ref)
        print(seccomp.pseudo_code(profile) if profile is not None else "# unconfined: no filter")
        return 0
    print(json.dumps({**where, **seccomp.describe(ref)}, indent=2))
    return 0


def _images(a: argparse.Namespace, cfg: Config | None = None) -> ImageStore:
    from rexecd.runtime.images import ImageStore

    limits = cfg.images.unpack if cfg is not None else None
    return ImageStore(Path(a.state_dir) / "images", limits=limits)


def _print_import(rec: ImageRecord) -> None:
    print(
        json.dumps(
            {"name": rec.ref, "digest": rec.digest, "size": rec.size, "layers": len(rec.layers)}
        )
    )


def _cmd_image_import(a: argparse.Namespace) -> int:
    # The config's images.unpack limits hold for an import by hand too.
    store = _images(a, _tool_config(a))
    if a.rootfs is not None:
        if a.file is not None or not a.name:
            raise InvalidRequest("rexecd image import --rootfs FILE --name NAME:TAG (no FILE)")
        rec = store.import_rootfs(Path(a.rootfs), a.name)
    elif a.file is None:
        raise InvalidRequest("name a tarball to import (or --rootfs FILE --name NAME:TAG)")
    else:
        rec = store.import_archive(Path(a.file), name=a.name)
    _print_import(rec)
    return 0


def _cmd_image_pull(a: argparse.Namespace) -> int:
    import asyncio

    from rexecd.client.progress import ProgressBar
    from rexecd.service.registry import Puller, PullProgress

    cfg = _tool_config(a)
    bar = ProgressBar()

    def show(p: PullProgress) -> None:
        bar.update(
            p.percent,
            f"{p.reference}: {p.done / 1e6:.1f}/{p.total / 1e6:.1f} MB, "
            f"{p.layers_done}/{p.layers_total} layers",
        )

    async def pull() -> None:
        puller = Puller(cfg.registries, _images(a, cfg))
        try:
            res = await puller.pull(a.reference, a.name, None if a.quiet else show)
        finally:
            await puller.close()
            bar.done()
        rec = res.record
        print(
            json.dumps(
                {
                    "name": rec.ref,
                    "digest": rec.digest,
                    "size": rec.size,
                    "layers": len(rec.layers),
                    "source": res.source,
                    "downloaded": res.downloaded,
                    "layers_fetched": res.layers_fetched,
                    "layers_present": res.layers_present,
                    "seconds": round(res.seconds, 3),
                }
            )
        )

    asyncio.run(pull())
    return 0


def _config_path(a: argparse.Namespace) -> Path | None:
    """``--config`` (which must then exist), else the installed config when there is one;
    None: the embedded default."""
    if a.config:
        return Path(a.config)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def _tool_config(a: argparse.Namespace) -> Config:
    """The config an image command works under, loaded without the daemon's "which
    file" line: the command's output is its answer."""
    from rexecd.config import load_config

    return load_config(_config_path(a), announce=False)


def _cmd_image_ls(a: argparse.Namespace) -> int:
    store = _images(a)
    recs = store.list()
    uses = store.use_counts()
    if a.json:
        print(json.dumps([r.model_dump(mode="json") for r in recs], indent=2))
        return 0
    print(f"{'NAME':40} {'DIGEST':14} {'LAYERS':>6} {'SIZE':>12} {'CONTAINERS':>10}")
    for r in recs:
        n = uses[(r.ref, r.digest)]
        print(f"{r.ref:40} {r.digest[7:19]:14} {len(r.layers):>6} {r.size:>12} {n:>10}")
    return 0


def _cmd_image_rm(a: argparse.Namespace) -> int:
    store = _images(a)
    for ref in a.refs:
        rec = store.remove(ref)
        print(f"removed {rec.ref} ({rec.digest})")
    layers = store.gc()
    print(f"{len(layers)} layer(s) no longer used, removed")
    return 0


def _cmd_image_tag(a: argparse.Namespace) -> int:
    rec = _images(a).tag(a.source, a.target)
    print(f"{rec.ref} -> {rec.digest}")
    return 0


def _cmd_image_prune(a: argparse.Namespace) -> int:
    res = _images(a).prune(all_unused=a.all)
    for ref in res.images:
        print(f"removed {ref}")
    print(f"{len(res.layers)} layer(s) removed, {res.bytes / 1e6:.1f} MB freed")
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    import asyncio

    from rexecd.config import apply_overrides, load_config
    from rexecd.daemon import serve

    if os.geteuid() != 0:
        raise RuntimeUnavailable("the daemon needs root (namespaces, mounts, cgroups, networking)")
    cfg = load_config(_config_path(a))
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
    run.add_argument(
        "--seccomp", default="default", metavar="PROFILE", help="default, unconfined or a path"
    )
    run.add_argument("image")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    run.set_defaults(fn=_cmd_run)

    sec = sub.add_parser("seccomp", help="seccomp profiles of containers")
    ssub = sec.add_subparsers(dest="seccomp_command", required=True)
    show = ssub.add_parser(
        "show", help="print the seccomp rules a tier's containers get (JSON), or a profile's"
    )
    show.add_argument("--config", help="YAML config (default: the embedded one)")
    show.add_argument("--tier", default="free")
    show.add_argument("--profile", help="default, unconfined or a profile file (not a tier's)")
    show.add_argument(
        "--pfc", action="store_true", help="libseccomp's pseudo code of the compiled filter"
    )
    show.set_defaults(fn=_cmd_seccomp_show)

    img = sub.add_parser("image", help="manage the local images")
    isub = img.add_subparsers(dest="image_command", required=True)
    imp = isub.add_parser(
        "import", help="import an OCI-layout or docker-archive tarball, or a plain rootfs"
    )
    dirs(imp)
    imp.add_argument("file", nargs="?")
    imp.add_argument(
        "--rootfs",
        metavar="FILE",
        help="a plain root file system tarball (gzip, zstd, xz, bzip2 or none); needs --name",
    )
    imp.add_argument("--name", help="NAME:TAG to tag it with")
    imp.add_argument(
        "--config", help="YAML config for images.unpack (default: /etc/rexecd/rexecd.yaml)"
    )
    imp.set_defaults(fn=_cmd_image_import)
    pull = isub.add_parser("pull", help="pull an image from its registry (or a mirror)")
    dirs(pull)
    pull.add_argument("reference", help="[REGISTRY/]NAME[:TAG|@DIGEST]")
    pull.add_argument("--name", help="NAME:TAG to store it as (default: the reference's)")
    pull.add_argument(
        "--config", help="YAML config for registries (default: /etc/rexecd/rexecd.yaml)"
    )
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pull.set_defaults(fn=_cmd_image_pull)
    ls = isub.add_parser("ls", help="list images")
    dirs(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=_cmd_image_ls)
    rm = isub.add_parser("rm", help="remove images (not while a container uses one)")
    dirs(rm)
    rm.add_argument("refs", nargs="+", metavar="REF")
    rm.set_defaults(fn=_cmd_image_rm)
    tag = isub.add_parser("tag", help="give an image another name")
    dirs(tag)
    tag.add_argument("source")
    tag.add_argument("target")
    tag.set_defaults(fn=_cmd_image_tag)
    prune = isub.add_parser("prune", help="remove layers no image or container uses")
    dirs(prune)
    prune.add_argument("--all", action="store_true", help="also images no container uses")
    prune.set_defaults(fn=_cmd_image_prune)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        code = args.fn(args)
    except ConfigError as exc:  # a usage error like a bad argument, not a runtime one
        print(f"rexecd: {exc}", file=sys.stderr)
        code = 2
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
