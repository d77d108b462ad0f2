"""What a create's image name resolves to, and when it may be pulled."""

from __future__ import annotations

from rexecd.config import CatalogueImage, Config
from rexecd.service import catalog


def _cfg(**custom: object) -> Config:
    cfg = Config()
    entry = CatalogueImage(
        name="custom", display_name="c", description="c", category="custom", **custom
    )
    cfg.images.catalogue = [e for e in cfg.images.catalogue if e.name != "custom"] + [entry]
    return cfg


def test_custom_is_local_only_unless_its_entry_pulls() -> None:
    r = catalog.resolve(_cfg(pull=False), "custom", "team/tool:2")
    assert (r.local, r.pull) == ("team/tool:2", None)
    r = catalog.resolve(_cfg(pull=True), "custom", "team/tool:2")
    assert r.pull == "team/tool:2"


def test_custom_pulls_only_from_the_listed_registries() -> None:
    # A tenant naming a loopback or internal registry must not make the daemon fetch
    # from it: only the registries the admin listed are pulled from.
    cfg = _cfg(pull=True)
    for ref in ("127.0.0.1:5000/x/y:1", "localhost/x:1", "10.0.0.1:80/a:1", "quay.io/x/y:1"):
        assert catalog.resolve(cfg, "custom", ref).pull is None, ref
    assert catalog.resolve(cfg, "custom", "docker.io/team/tool:2").pull is not None
    cfg = _cfg(pull=True, registries=["docker.io", "quay.io"])
    assert catalog.resolve(cfg, "custom", "quay.io/x/y:1").pull == "quay.io/x/y:1"
    assert catalog.resolve(cfg, "custom", "ghcr.io/x/y:1").pull is None
