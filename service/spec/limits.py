"""What a spec can hold at most: the bounds of its numbers, and no control characters.

Past these values a run could only crash later (a seed numpy refuses, a batch no GPU holds, an
image side no decoder allocates), so the spec refuses them in one line naming the field
(docs/reliability.md, "Spec bounds").
"""

from __future__ import annotations

import json
import re
from typing import Any

# C0 controls, DEL and C1 controls: never meant in a name, a URI or a key; a NUL truncates a
# path in the C library, a newline forges a log or error line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# Upper bounds of what a run can use (docs/spec.md): a seed numpy and torch accept, sizes far
# beyond any GPU's memory, epochs beyond any budget. Past them a run would only crash later.
MAX_SEED = 2**32 - 1
MAX_BATCH = 65536
MAX_EPOCHS = 100_000
MAX_IMAGE_SIDE = 4096


def check_text(v: Any) -> None:
    """Refuse a control character in any string of ``v`` (dict keys and values, list items)."""
    if isinstance(v, str):
        if m := _CONTROL.search(v):
            raise ValueError(
                f"must not contain control characters ({m.group()!r} at {m.start()}), got "
                f"{v[:60]!r}"
            )
    elif isinstance(v, dict):
        for key, value in v.items():
            check_text(key)
            check_text(value)
    elif isinstance(v, list | tuple):
        for item in v:
            check_text(item)


def short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
