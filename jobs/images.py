"""What an image payload is: its kind by magic bytes, its content address, its bytes.

Pure functions (no models), so the API's validation, the storage in ``jobs.models`` and the
migration that moved images out of the job row agree on one definition.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

IMAGE_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "png",
    b"\xff\xd8\xff": "jpeg",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
    b"BM": "bmp",
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
}
UNKNOWN_MEDIA_TYPE = "application/octet-stream"


def image_kind(raw: bytes) -> str | None:
    """``png``, ``jpeg``, ``gif``, ``webp``, ``bmp`` or ``tiff`` from the first bytes; None otherwise."""
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "webp"
    for magic, kind in IMAGE_MAGIC.items():
        if raw.startswith(magic):
            return kind
    return None


@dataclass(frozen=True)
class ImageBlob:
    """One decoded image: its SHA-256 (hex, the content address), media type and bytes."""

    sha256: str
    media_type: str
    data: bytes

    @classmethod
    def from_base64(cls, payload: str) -> ImageBlob:
        """The image a (validated) plain-base64 payload holds."""
        raw = base64.b64decode(payload)
        kind = image_kind(raw)
        return cls(hashlib.sha256(raw).hexdigest(), f"image/{kind}" if kind else UNKNOWN_MEDIA_TYPE, raw)


def to_base64(raw: bytes | memoryview) -> str:
    """The payload adapters send (plain base64, as the job was submitted)."""
    return base64.b64encode(raw).decode("ascii")
