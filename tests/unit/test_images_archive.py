"""Image archive import: OCI image-layout and docker-archive, every compression, digest
and diff_id checks, image selection and config parsing (no root needed)."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import tarfile
from pathlib import Path
from typing import Any

import pytest

from rexecd.config import UnpackLimits
from rexecd.errors import ImageError, ImageTooLarge, UnsupportedImage
from rexecd.runtime.images import ImageStore
from rexecd.runtime.images.manifest import host_arch
from tests.unit.fakes.images import (
    INDEX,
    MANIFEST,
    SIMPLE,
    Bomb,
    blob_path,
    compress,
    descriptor,
    digest,
    docker_archive,
    layer,
    oci_archive,
    oci_manifest,
    outer_tar,
    reg,
)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store", durable=False)


def write(tmp_path: Path, data: bytes, name: str = "image.tar") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def check_simple(store: ImageStore, ref: str = "test:latest") -> None:
    rec = store.get(ref)
    (top,) = store.layer_paths(rec)
    assert (top / "etc/hello").read_bytes() == b"hello\n"
    assert (top / "bin").readlink() == Path("usr/bin")


@pytest.mark.parametrize("compression", ["gzip", "zstd", "tar"])
def test_oci_layout_every_compression(store: ImageStore, tmp_path: Path, compression: str) -> None:
    rec = store.import_archive(write(tmp_path, oci_archive([SIMPLE], compression)))
    assert (rec.name, rec.tag, rec.ref) == ("test", "latest", "test:latest")
    assert rec.layers == [digest(SIMPLE)]
    assert rec.size == len(compress(SIMPLE, compression))
    check_simple(store)


@pytest.mark.parametrize("compression", ["gzip", "zstd", "tar"])
@pytest.mark.parametrize("digest_paths", [False, True])
def test_docker_archive_every_compression(
    store: ImageStore, tmp_path: Path, compression: str, digest_paths: bool
) -> None:
    data = docker_archive([SIMPLE], compression, digest_paths=digest_paths)
    rec = store.import_archive(write(tmp_path, data))
    assert rec.ref == "test:latest"
    assert rec.layers == [digest(SIMPLE)]
    check_simple(store)


def _members(data: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            f = tar.extractfile(m)
            if f is not None:
                out[m.name] = f.read()
    return out


def test_docker_archive_digest_is_config_digest(store: ImageStore, tmp_path: Path) -> None:
    data = docker_archive([SIMPLE])
    cfg = next(v for k, v in _members(data).items() if k.endswith(".json") and len(k) == 69)
    rec = store.import_archive(write(tmp_path, data))
    assert rec.digest == digest(cfg)


def test_multi_layer_order_and_stream_source(store: ImageStore) -> None:
    layers = [layer(reg(f"f{i}", str(i).encode())) for i in range(3)]
    rec = store.import_archive(io.BytesIO(oci_archive(layers)))
    assert rec.layers == [digest(x) for x in layers]
    paths = store.layer_paths(rec)
    assert [(p / f"f{i}").read_text() for i, p in enumerate(paths)] == ["0", "1", "2"]


class _Pipe(io.RawIOBase):
    """A non-seekable source, like a request body."""

    def __init__(self, data: bytes) -> None:
        self._src = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        chunk = self._src.read(min(len(b), 1000))
        b[: len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("outer", ["tar", "gzip", "zstd"])
def test_unseekable_or_compressed_outer_archive(
    store: ImageStore, tmp_path: Path, outer: str
) -> None:
    data = compress(oci_archive([SIMPLE]), outer)
    store.import_archive(io.BufferedReader(_Pipe(data)))
    check_simple(store)
    store.import_archive(write(tmp_path, data), name="again")
    check_simple(store, "again")
    assert list((store.root / "tmp").iterdir()) == []


def test_outer_member_symlink_is_followed(store: ImageStore, tmp_path: Path) -> None:
    # docker save stores a repeated layer once and symlinks the other <id>/layer.tar.
    blob = compress(SIMPLE, "tar")
    config = json.dumps(
        {"os": "linux", "rootfs": {"type": "layers", "diff_ids": [digest(SIMPLE)] * 2}}
    ).encode()
    cfg_name = digest(config)[7:] + ".json"
    manifest = [
        {"Config": cfg_name, "RepoTags": ["dup:1"], "Layers": ["a/layer.tar", "b/layer.tar"]}
    ]
    files = {"a/layer.tar": blob, cfg_name: config, "manifest.json": json.dumps(manifest).encode()}
    data = outer_tar(files, links={"b/layer.tar": "../a/layer.tar"})
    rec = store.import_archive(write(tmp_path, data))
    assert rec.ref == "dup:1" and len(rec.layers) == 2
    assert len(list(store.layers_dir.iterdir())) == 1


def test_multi_member_gzip_layer(store: ImageStore, tmp_path: Path) -> None:
    half = len(SIMPLE) // 2
    blob = gzip.compress(SIMPLE[:half]) + gzip.compress(SIMPLE[half:])

    def swap(files: dict[str, bytes | None]) -> None:
        _replace_blob(files, compress(SIMPLE, "gzip"), blob)

    store.import_archive(write(tmp_path, oci_archive([SIMPLE], tamper=swap)))
    check_simple(store)


def _find(files: dict[str, bytes | None], key: str) -> str:
    """The blob whose JSON object has ``key`` (the manifest: "layers"; config: "rootfs")."""
    for name, data in files.items():
        if name.startswith("blobs/") and data and data[:1] == b"{" and key in json.loads(data):
            return name
    raise KeyError(key)


def _replace_blob(files: dict[str, bytes | None], old: bytes, new: bytes) -> None:
    """Swap a layer blob and fix the manifest and index digests that name it."""
    del files[blob_path(old)]
    files[blob_path(new)] = new
    man_name = _find(files, "layers")
    doc = json.loads(files[man_name] or b"")
    for d in doc["layers"]:
        if d["digest"] == digest(old):
            d["digest"], d["size"] = digest(new), len(new)
    new_man = json.dumps(doc).encode()
    del files[man_name]
    files[blob_path(new_man)] = new_man
    index = json.loads(files["index.json"] or b"")
    index["manifests"][0].update(digest=digest(new_man), size=len(new_man))
    files["index.json"] = json.dumps(index).encode()


# --- digests ----------------------------------------------------------------------------


def test_layer_blob_digest_mismatch_names_blob(store: ImageStore, tmp_path: Path) -> None:
    good = compress(SIMPLE, "gzip")
    evil = compress(layer(reg("etc/hello", b"evil!\n")), "gzip")

    def swap(files: dict[str, bytes | None]) -> None:
        files[blob_path(good)] = evil  # same name, other bytes

    def fix_size(files: dict[str, bytes | None]) -> None:
        swap(files)
        man_name = _find(files, "layers")
        doc = json.loads(files[man_name] or b"")
        doc["layers"][0]["size"] = len(evil)
        files[man_name] = json.dumps(doc).encode()  # manifest now mismatches too

    with pytest.raises(ImageError, match=blob_path(good)):
        store.import_archive(write(tmp_path, oci_archive([SIMPLE], tamper=swap)))
    with pytest.raises(ImageError, match="digest mismatch"):
        store.import_archive(write(tmp_path, oci_archive([SIMPLE], tamper=fix_size)))
    assert store.list() == []
    assert list(store.layers_dir.iterdir()) == [] and list(store.tmp_dir.iterdir()) == []


def test_layer_blob_digest_mismatch_same_size(store: ImageStore, tmp_path: Path) -> None:
    good = compress(SIMPLE, "tar")
    evil = compress(SIMPLE.replace(b"hello\n", b"HELLO\n"), "tar")
    assert len(evil) == len(good)

    def swap(files: dict[str, bytes | None]) -> None:
        files[blob_path(good)] = evil

    with pytest.raises(ImageError, match=rf"{blob_path(good)}.*digest mismatch"):
        store.import_archive(write(tmp_path, oci_archive([SIMPLE], "tar", tamper=swap)))
    assert list(store.layers_dir.iterdir()) == []


def test_diff_id_mismatch_is_refused(store: ImageStore, tmp_path: Path) -> None:
    other = layer(reg("x", b"x"))
    data = docker_archive([SIMPLE], "gzip", diff_ids=[digest(other)])
    with pytest.raises(ImageError, match=r"layer\.tar.*diff_id.*digest mismatch"):
        store.import_archive(write(tmp_path, data))
    assert list(store.layers_dir.iterdir()) == []


def test_config_and_manifest_digests_checked(store: ImageStore, tmp_path: Path) -> None:
    def bad_config(files: dict[str, bytes | None]) -> None:
        name = _find(files, "rootfs")
        files[name] = (files[name] or b"").replace(b"PATH=/bin", b"PATH=/evil")

    def bad_manifest(files: dict[str, bytes | None]) -> None:
        name = _find(files, "layers")
        files[name] = (files[name] or b"") + b" "

    for tamper in (bad_config, bad_manifest):
        with pytest.raises(ImageError, match=r"blob 'blobs/sha256/.*digest mismatch"):
            store.import_archive(write(tmp_path, oci_archive([SIMPLE], tamper=tamper)))


def test_missing_blob_is_named(store: ImageStore, tmp_path: Path) -> None:
    blob = compress(SIMPLE, "gzip")

    def drop(files: dict[str, bytes | None]) -> None:
        del files[blob_path(blob)]

    with pytest.raises(ImageError, match=blob_path(blob)):
        store.import_archive(write(tmp_path, oci_archive([SIMPLE], tamper=drop)))


def test_truncated_gzip_layer(store: ImageStore, tmp_path: Path) -> None:
    blob = compress(SIMPLE, "gzip")
    data = docker_archive([SIMPLE], "tar", tamper=lambda f: _set_layer(f, blob[:-20]))
    with pytest.raises(ImageError, match=r"layer\.tar"):
        store.import_archive(write(tmp_path, data))


def _set_layer(files: dict[str, bytes | None], data: bytes) -> None:
    files[next(k for k in files if k.endswith("layer.tar"))] = data


def test_xz_layer_unsupported(store: ImageStore, tmp_path: Path) -> None:
    data = docker_archive([SIMPLE], tamper=lambda f: _set_layer(f, lzma.compress(SIMPLE)))
    with pytest.raises(UnsupportedImage, match="xz"):
        store.import_archive(write(tmp_path, data))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"not a tarball at all" * 100, "not a tar archive"),
        (outer_tar({"hello": b"x"}), "neither an OCI image layout nor a docker-archive"),
        (outer_tar({"manifest.json": b"{nope"}), "not valid JSON"),
        (outer_tar({"manifest.json": b"[]"}), "non-empty list"),
        (
            outer_tar({"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": b"{}"}),
            "no manifests list",
        ),
    ],
)
def test_malformed_archives(store: ImageStore, tmp_path: Path, data: bytes, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        store.import_archive(write(tmp_path, data))


# --- names and selection ----------------------------------------------------------------


def test_name_override_and_default_tag(store: ImageStore, tmp_path: Path) -> None:
    path = write(tmp_path, oci_archive([SIMPLE], ref="busybox:1.36"))
    assert store.import_archive(path).ref == "busybox:1.36"
    assert store.import_archive(path, name="mine").ref == "mine:latest"
    assert store.import_archive(path, name="reg.example:5000/team/mine:v2").ref == (
        "reg.example:5000/team/mine:v2"
    )
    assert {r.ref for r in store.list()} == {
        "busybox:1.36",
        "mine:latest",
        "reg.example:5000/team/mine:v2",
    }


def test_docker_hub_prefix_is_dropped(store: ImageStore, tmp_path: Path) -> None:
    data = docker_archive([SIMPLE], repo_tags=["docker.io/library/alpine:3.19"])
    assert store.import_archive(write(tmp_path, data)).ref == "alpine:3.19"


def test_tag_only_ref_name_needs_a_name(store: ImageStore, tmp_path: Path) -> None:
    path = write(tmp_path, oci_archive([SIMPLE], ref="3.19"))
    with pytest.raises(ImageError, match="give a name"):
        store.import_archive(path)
    assert store.import_archive(path, name="alpine:3.19").ref == "alpine:3.19"
    untagged = write(tmp_path, docker_archive([SIMPLE], repo_tags=[]), "untagged.tar")
    with pytest.raises(ImageError, match="give a name"):
        store.import_archive(untagged)


def test_containerd_name_annotation(store: ImageStore, tmp_path: Path) -> None:
    # Docker 25+ docker save: full name in io.containerd.image.name, tag in ref.name.
    def annotate(files: dict[str, bytes | None]) -> None:
        index = json.loads(files["index.json"] or b"")
        index["manifests"][0]["annotations"] = {
            "io.containerd.image.name": "docker.io/library/debian:bookworm",
            "org.opencontainers.image.ref.name": "bookworm",
        }
        files["index.json"] = json.dumps(index).encode()

    path = write(tmp_path, oci_archive([SIMPLE], tamper=annotate))
    assert store.import_archive(path).ref == "debian:bookworm"


def _multi_oci(tmp_path: Path, refs: list[str]) -> Path:
    files: dict[str, bytes | None] = {}
    descs = []
    for i, ref in enumerate(refs):
        man = oci_manifest(files, [layer(reg("which", ref.encode()))], cfg={"Env": [f"N={i}"]})
        ann = {"org.opencontainers.image.ref.name": ref}
        descs.append(descriptor(man, MANIFEST, annotations=ann))
    files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": descs}).encode()
    return write(tmp_path, outer_tar(files))


def test_several_images_need_a_choice(store: ImageStore, tmp_path: Path) -> None:
    path = _multi_oci(tmp_path, ["a:1", "b:2"])
    with pytest.raises(ImageError, match=r"several images \(a:1, b:2\)"):
        store.import_archive(path)
    rec = store.import_archive(path, name="b:2")
    assert rec.config.env == ["N=1"]
    assert (store.layer_paths(rec)[0] / "which").read_text() == "b:2"


def test_docker_archive_with_several_images(store: ImageStore, tmp_path: Path) -> None:
    files: dict[str, bytes | None] = dict(_members(docker_archive([SIMPLE], repo_tags=["a:1"])))
    one = json.loads(files["manifest.json"] or b"")
    files["manifest.json"] = json.dumps([*one, {**one[0], "RepoTags": ["b:2"]}]).encode()
    path = write(tmp_path, outer_tar(files))
    with pytest.raises(ImageError, match="several images"):
        store.import_archive(path)
    assert store.import_archive(path, name="b:2").ref == "b:2"


def _platform_index(tmp_path: Path, archs: list[str], attestation: bool = False) -> Path:
    files: dict[str, bytes | None] = {}
    descs = []
    for arch in archs:
        man = oci_manifest(files, [layer(reg("arch", arch.encode()))], architecture=arch)
        descs.append(descriptor(man, MANIFEST, platform={"os": "linux", "architecture": arch}))
    if attestation:
        man = oci_manifest(files, [layer(reg("attest", b""))])
        descs.insert(
            0,
            descriptor(
                man,
                MANIFEST,
                platform={"os": "unknown", "architecture": "unknown"},
                annotations={"vnd.docker.reference.type": "attestation-manifest"},
            ),
        )
    nested = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": descs}).encode()
    files[blob_path(nested)] = nested
    top = descriptor(nested, INDEX, annotations={"org.opencontainers.image.ref.name": "multi:1"})
    files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [top]}).encode()
    return write(tmp_path, outer_tar(files))


def test_nested_index_picks_host_platform(store: ImageStore, tmp_path: Path) -> None:
    here = host_arch()
    path = _platform_index(tmp_path, ["s390x", here, "riscv64"], attestation=True)
    rec = store.import_archive(path)
    assert rec.ref == "multi:1"
    assert (store.layer_paths(rec)[0] / "arch").read_text() == here


def test_nested_index_without_host_platform(store: ImageStore, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedImage, match=f"linux/{host_arch()}"):
        store.import_archive(_platform_index(tmp_path, ["s390x", "riscv64"]))


# --- config ---------------------------------------------------------------------------


def test_config_is_honoured(store: ImageStore, tmp_path: Path) -> None:
    cfg = {
        "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"],
        "Entrypoint": ["/docker-entrypoint.sh"],
        "Cmd": ["nginx", "-g", "daemon off;"],
        "WorkingDir": "/srv/www",
        "User": "101:101",
    }
    rec = store.import_archive(write(tmp_path, oci_archive([SIMPLE], cfg=cfg)))
    c = rec.config
    assert c.env == cfg["Env"] and c.entrypoint == cfg["Entrypoint"] and c.cmd == cfg["Cmd"]
    assert (c.working_dir, c.user) == ("/srv/www", "101:101")
    assert rec.created.isoformat() == "2024-05-06T07:08:09.123456+00:00"


def test_config_defaults_and_string_entrypoint(store: ImageStore, tmp_path: Path) -> None:
    rec = store.import_archive(write(tmp_path, oci_archive([SIMPLE], cfg={"Entrypoint": "/x"})))
    c = rec.config
    assert (c.env, c.entrypoint, c.cmd, c.working_dir, c.user) == ([], ["/x"], None, "/", "")


@pytest.mark.parametrize(
    ("top", "error", "match"),
    [
        ({"os": "windows"}, UnsupportedImage, "windows"),
        ({"rootfs": {"type": "layers", "diff_ids": ["md5:abc"]}}, ImageError, "sha256"),
        ({"config": {"Env": "PATH=/bin"}}, ImageError, "Env must be a list"),
    ],
)
def test_bad_configs(
    store: ImageStore, tmp_path: Path, top: dict[str, Any], error: type[Exception], match: str
) -> None:
    files: dict[str, bytes | None] = {}
    extra = dict(top)
    cfg = extra.pop("config", None)
    man = oci_manifest(files, [SIMPLE], cfg=cfg, **extra)
    files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    index = {
        "manifests": [
            descriptor(man, MANIFEST, annotations={"org.opencontainers.image.ref.name": "t:1"})
        ]
    }
    files["index.json"] = json.dumps(index).encode()
    with pytest.raises(error, match=match):
        store.import_archive(write(tmp_path, outer_tar(files)))


def test_layer_count_must_match_diff_ids(store: ImageStore, tmp_path: Path) -> None:
    data = docker_archive([SIMPLE], diff_ids=[digest(SIMPLE)] * 2)
    with pytest.raises(ImageError, match="1 layers but 2 diff_ids"):
        store.import_archive(write(tmp_path, data))


# --- images.unpack limits: bombs are refused while they stream, and leave nothing -----


def limited(tmp_path: Path, **limits: int) -> ImageStore:
    return ImageStore(
        tmp_path / "limited", durable=False, limits=UnpackLimits.model_validate(limits)
    )


def nothing_left(store: ImageStore) -> None:
    assert list(store.tmp_dir.iterdir()) == []
    assert list(store.layers_dir.iterdir()) == []
    assert store.list() == []


def too_large(store: ImageStore, src: Path | io.BufferedIOBase, **kw: Any) -> ImageTooLarge:
    with pytest.raises(ImageTooLarge) as e:
        if "rootfs" in kw:
            store.import_rootfs(src, kw["rootfs"])  # type: ignore[arg-type]
        else:
            store.import_archive(src)  # type: ignore[arg-type]
    assert (e.value.status, e.value.code) == (400, "image_too_large")
    nothing_left(store)
    return e.value


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_a_layer_bomb_is_refused_past_max_image_mb(tmp_path: Path, compression: str) -> None:
    store = limited(tmp_path, max_image_mb=2)
    bomb = layer(reg("zeros", bytes(8 << 20)))  # 8 MiB of zeros
    data = oci_archive([SIMPLE, bomb], compression)
    assert len(data) < 64 << 10  # a few KB on the wire
    err = too_large(store, write(tmp_path, data))
    assert err.extra["limit"] == "max_image_mb"
    assert "max_image_mb (2 MiB)" in err.message and "layer blob" in err.message


def test_the_layers_of_one_image_share_max_image_mb(tmp_path: Path) -> None:
    store = limited(tmp_path, max_image_mb=5)
    a, b = (layer(reg(f"f{i}", bytes(3 << 20))) for i in range(2))
    store.import_archive(write(tmp_path, oci_archive([a], ref="one:1")))
    # A second image with the same layer a unpacks only b: 3 MiB, within the limit.
    store.import_archive(write(tmp_path, oci_archive([a, b], ref="two:1")))
    fresh = limited(tmp_path / "fresh", max_image_mb=5)
    assert too_large(fresh, write(tmp_path, oci_archive([a, b]))).extra["limit"] == "max_image_mb"


def test_a_layer_past_max_layer_ratio_is_refused_but_not_an_uncompressed_one(
    tmp_path: Path,
) -> None:
    store = limited(tmp_path, max_layer_ratio=10, ratio_slack_mb=0)
    zeros = layer(reg("zeros", bytes(1 << 20)))
    err = too_large(store, write(tmp_path, oci_archive([zeros], "gzip")))
    assert err.extra["limit"] == "max_layer_ratio"
    store.import_archive(write(tmp_path, oci_archive([zeros], "tar")))
    assert store.list()[0].ref == "test:latest"


def test_a_bomb_is_stopped_while_it_streams(tmp_path: Path) -> None:
    # 2 GiB of zeros (~9 MB of gzip) as a rootfs stream, made only as far as it is
    # read: with a 4 MiB limit the unpacker must stop within its first read (1 MiB, to
    # sniff the compression) and a piece, not once it is all on disk.
    store = limited(tmp_path, max_image_mb=4)
    bomb = Bomb(2 << 30)
    err = too_large(store, bomb, rootfs="bomb:1")  # type: ignore[arg-type]
    assert err.extra["limit"] == "max_image_mb"
    assert bomb.given < 2 << 20, bomb.given


def test_a_compressed_outer_archive_is_spooled_within_the_limits(tmp_path: Path) -> None:
    store = limited(tmp_path, max_image_mb=2)
    outer = outer_tar({"junk": bytes(8 << 20), "oci-layout": b"{}"})
    assert too_large(store, write(tmp_path, compress(outer, "zstd"))).extra["limit"] == (
        "max_image_mb"
    )
    many = outer_tar({f"m{i}": b"" for i in range(50)})
    fewer = limited(tmp_path / "fewer", max_entries=20)
    assert too_large(fewer, write(tmp_path, many)).extra["limit"] == "max_entries"


def test_the_default_limits_stop_a_zstd_bomb_by_its_ratio(store: ImageStore) -> None:
    # 1 GiB of zeros is ~33 KB of zstd: past 250x beyond the first 128 MiB long before
    # the 32 GiB image limit.
    bomb = Bomb(1 << 30, "zstd")
    err = too_large(store, bomb, rootfs="zbomb:1")  # type: ignore[arg-type]
    assert err.extra["limit"] == "max_layer_ratio"
    assert "250x beyond 128 MiB" in err.message
