"""How the service hashes things, decided once: the bytes of a file, and a long name cut to a
limit without two names colliding."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 4 * 1024 * 1024  # large enough that hashing a shard is disk-bound, not call-bound


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks (a shard or weights file never sits in RAM)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def bounded_name(slug: str, *, source: str, limit: int = 63) -> str:
    """``slug`` when it fits in ``limit`` characters; else its head and 8 hex characters of
    sha256(``source``), so two long names that share a head stay distinct.

    Used for Kubernetes names and label values (63 characters, alphanumeric at both ends).
    """
    if slug and len(slug) <= limit:
        return slug
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    return f"{slug[: limit - 9].rstrip('-_.')}-{digest}".lstrip("-")
