"""Container images: import of image tarballs into a store of safely unpacked layers."""

from __future__ import annotations

from .models import ImageConfig, ImageRecord, parse_reference
from .store import ImageStore

__all__ = ["ImageConfig", "ImageRecord", "ImageStore", "parse_reference"]
