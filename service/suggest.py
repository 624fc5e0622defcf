"""'Did you mean ...?' for typos in keys and names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_matches(
    word: str, candidates: Iterable[str], n: int = 1, cutoff: float = 0.75
) -> list[str]:
    """Closest candidates, compared case-insensitively and ignoring '_' vs '-'."""
    norm = {c.lower().replace("-", "_"): c for c in candidates}
    hits = difflib.get_close_matches(word.lower().replace("-", "_"), list(norm), n=n, cutoff=cutoff)
    return [norm[h] for h in hits]


def did_you_mean(
    word: str, candidates: Iterable[str], *, prefix: str = "", quote: bool = True
) -> str:
    """``"; did you mean 'x'?"`` or ``""`` when nothing is close."""
    hits = close_matches(word, candidates)
    if not hits:
        return ""
    return f"; did you mean '{prefix}{hits[0]}'?" if quote else f"; did you mean {prefix}{hits[0]}?"
