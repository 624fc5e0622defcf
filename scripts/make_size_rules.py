"""Regenerate service/backbones/size_rules.json: which square input sizes each curated backbone
(and each tiny timm ``test_*`` model) can take, so plain ``backbones validate`` refuses an
impossible (backbone, image size) pair without importing torch.

    python scripts/make_size_rules.py            # writes the file (minutes of CPU)
    python scripts/make_size_rules.py --check    # exit 1 if the committed rules differ
    python scripts/make_size_rules.py --only test_vit   # re-probe some models, keep the rest

Each model is built on the meta device at every size in SIZES through the worker's own factory
(``factory.probe``). A model gets a rule ``{"min": M, "multiple": K}`` (a size works iff it is
at least M and a multiple of K) only when that rule predicts every probe exactly; otherwise no
rule, and only ``validate --deep`` (which builds the pair itself) can tell.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "service" / "backbones" / "size_rules.json"
SIZES = list(range(8, 129, 8))
MULTIPLES = (1, 8, 16, 32, 64)


def rule(ok: dict[int, bool]) -> dict | None:
    """The (min, multiple) rule that predicts every probe, smallest multiple first."""
    for k in MULTIPLES:
        passing = [s for s in SIZES if ok[s]]
        if not passing:
            return None
        m = min(s for s in passing if s % k == 0) if any(s % k == 0 for s in passing) else None
        if m is None:
            continue
        if all(ok[s] == (s >= m and s % k == 0) for s in SIZES):
            return {"min": m, "multiple": k}
    return None


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--only", nargs="*", help="probe these models only (others kept)")
    args = parser.parse_args()
    import timm

    from service.backbones.catalog import names
    from service.backbones.factory import catalog_source, probe

    models = sorted(timm.list_models("test_*")) + [
        n for n in names() if catalog_source(n) == "timm"
    ]
    if args.only:
        models = [m for m in models if m in args.only]
    old = json.loads(OUT.read_text())["rules"] if OUT.exists() and not args.check else {}
    rules = {}
    for name in dict.fromkeys(models):
        ok = {s: probe(name, (s, s)) is None for s in SIZES}
        rules[name] = rule(ok)
        print(name, rules[name], file=sys.stderr, flush=True)
        if not args.check:  # written after each model: a long run that stops keeps its work
            _write({**old, **rules}, timm.__version__)
    if args.check:
        return 0 if json.loads(OUT.read_text())["rules"] == rules else 1
    return 0


def _write(rules: dict, version: str) -> None:
    doc = {
        "format": "backbones-size-rules/v1",
        "generated_by": "scripts/make_size_rules.py",
        "timm": version,
        "sizes_probed": SIZES,
        # null: no simple rule predicts the probes (only `validate --deep` can tell)
        "rules": dict(sorted(rules.items())),
    }
    OUT.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
