"""A search's state as the report reads it: ``_search/state.json`` beside the cells (written
by service.search.driver), and the candidates its latest rung still runs.

Both the collection (which cells a search expects) and the Selection section read it.
"""

from __future__ import annotations

import json

from service.storage import NotFound, Store

STATE_KEY = "_search/state.json"


def read_state(store: Store, study: str | None) -> tuple[dict | None, str]:
    """The search state under the prefix (the study folder, or its parent); and the prefix of
    the study folder relative to ``store`` ('' or '<study>/')."""
    bases = [""] + ([f"{study}/"] if study else [])
    for base in bases:
        try:
            return json.loads(store.read_bytes(base + STATE_KEY)), base
        except NotFound:
            continue
    return None, ""


def survivors(state: dict) -> dict[str, list[str]]:
    """Group -> the candidates of the latest rung (the last rung's when the search is done)."""
    return state["rungs"][-1]["candidates"] if state.get("rungs") else {}
