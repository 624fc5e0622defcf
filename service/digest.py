"""How the service hashes things, decided once: the bytes of a file, a JSON value (the spec's
result fields, a search's plan), a seed derived from a run's seed and a purpose, and a long name
cut to a limit without two names colliding."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_BLOCK = 4 * 1024 * 1024  # large enough that hashing a shard is disk-bound, not call-bound


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks (a shard or weights file never sits in RAM)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def json_hash(value: Any) -> str:
    """16 hex of sha256 over ``value`` as JSON with sorted keys (json.dumps' default
    separators: every spec hash ever written was made this way, so never change them)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def derive_seed(*parts: object, bits: int = 64) -> int:
    """A seed of ``bits`` bits from ``parts`` (e.g. the run's seed, a purpose, an epoch):
    independent streams for independent purposes, equal on every machine and process."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << bits) - 1)


def bounded_name(slug: str, *, source: str, limit: int = 63) -> str:
    """``slug`` when it fits in ``limit`` characters; else its head and 8 hex characters of
    sha256(``source``), so two long names that share a head stay distinct.

    Used for Kubernetes names and label values (63 characters, alphanumeric at both ends).
    """
    if slug and len(slug) <= limit:
        return slug
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    return f"{slug[: limit - 9].rstrip('-_.')}-{digest}".lstrip("-")
