"""Successive halving against the full grid, on this CPU, with timm's tiny test_* models.

Runs, on two offline datasets (scikit-learn's digits, and "patches": 12-class 32x32 patches of
the two photos scikit-learn ships, a texture-like task), 6 backbones × 2 seeds:

  (a) the grid: every cell with the full protocol,
  (b) the search with ``schedule: restart`` (each rung a complete short schedule),
  (c) the search with ``schedule: continue`` (each rung continues the previous rung's
      checkpoint under the full run's schedule),
  (d) optionally the k-NN proxy (``--proxy K``) in front of (b),

and prints per dataset the grid's winner (mean test top-1 over seeds, as the report ranks),
the search's winner, whether the grid's winner reached the search's last two rungs, Kendall's
tau of the search's ranking (rung reached, then score there) and of the proxy's against the
grid's, and the compute ratio: training seconds (the sum of epoch_seconds in metrics.jsonl,
i.e. optimizer steps only), epochs trained, and wall seconds including each cell's start-up.

    python benchmarks/select_vs_grid.py [--epochs 6] [--eta 3] [--proxy 3] [--out DIR]

Weights are random ('none'): no pretrained weights can be downloaded here, so the proxy
scores random features; figures are from one run on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BACKBONES = [
    "test_resnet",
    "test_efficientnet",
    "test_vit",
    "test_byobnet",
    "test_nfnet",
    "test_mambaout",
]


def make_patches(path: Path, per_class: int = 150, size: int = 32) -> Path:
    """12 classes: which of 6 regions (2 x 3) of china.jpg or flower.jpg a patch comes from."""
    import numpy as np
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    images, labels = [], []
    label = 0
    for photo in load_sample_images().images:  # 427 x 640 x 3 each
        h, w = photo.shape[0] // 2, photo.shape[1] // 3
        for i in range(2):
            for j in range(3):
                for _ in range(per_class):
                    y = i * h + rng.integers(0, h - size)
                    x = j * w + rng.integers(0, w - size)
                    images.append(photo[y : y + size, x : x + size])
                    labels.append(label)
                label += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=np.stack(images), labels=np.array(labels, dtype=np.int64))
    return path


def study_doc(out: Path, name: str, epochs: int, search: dict | None, patches: Path) -> dict:
    doc = {
        "kind": "Study",
        "name": name,
        "backbones": [{"model": m, "weights": "none"} for m in BACKBONES],
        "datasets": [
            {"uri": "builtin://digits", "test_fraction": 0.2, "val_fraction": 0.2},
            {"uri": str(patches), "test_fraction": 0.2, "val_fraction": 0.2},
        ],
        "seeds": [0, 1],
        "protocol": {
            "image_size": 16,
            "batch_size": 64,
            "max_epochs": epochs,
            "warmup_epochs": 0,
            "device": "cpu",
        },
        "output": {"uri": str(out / name)},
        "metrics": {"port": 0},
    }
    if search:
        doc["search"] = search
    return doc


def run_grid(study) -> dict:
    from service.run.cell import run_cell
    from service.run.outputs import RunOutputs
    from service.spec.study import expand
    from service.storage import open_store

    t0 = time.perf_counter()
    out: dict[str, dict[str, list]] = {}
    seconds = epochs = 0.0
    for cell in expand(study):
        outcome = run_cell(cell, stop=threading.Event())
        records = RunOutputs(open_store(cell.output.uri).child(cell.run_id)).metrics()
        seconds += sum(r["epoch_seconds"] for r in records)
        epochs += len(records)
        ds = cell.dataset.short_name
        out.setdefault(ds, {}).setdefault(cell.backbone.model, []).append(
            (outcome.summary.test.top1, outcome.summary.best_val_top1)
        )
    return {
        "scores": out,
        "train_seconds": seconds,
        "epochs": epochs,
        "wall_seconds": time.perf_counter() - t0,
    }


def run_search(study) -> dict:
    from service.search.driver import Driver, LocalRunner

    t0 = time.perf_counter()
    runner = LocalRunner(stop=threading.Event(), echo=lambda s: None, err=print)
    state = Driver(study, runner, echo=lambda s: None).run()
    seconds = sum(
        res["seconds"]
        for rung in state["rungs"]
        for group in rung["results"].values()
        for res in group.values()
    )
    epochs = sum(
        res["epochs"]
        for rung in state["rungs"]
        for group in rung["results"].values()
        for res in group.values()
    )
    proxy_seconds = sum(g["seconds"] for g in (state["proxy"] or {}).values())
    return {
        "state": state,
        "train_seconds": seconds,
        "proxy_seconds": proxy_seconds,
        "epochs": epochs,
        "wall_seconds": time.perf_counter() - t0,
    }


def search_ranking(state: dict, group: str) -> list[str]:
    """Best first: the rung a candidate reached, then its mean validation score there."""
    reached: dict[str, tuple[int, float]] = {}
    for rung in state["rungs"]:
        for b, res in rung["results"].get(group, {}).items():
            reached[b] = (rung["rung"], res["mean"] if res["mean"] is not None else -1)
    ranked = sorted(reached, key=lambda b: (-reached[b][0], -reached[b][1]))
    if state["proxy"]:
        pruned = state["proxy"][group]["scores"]
        ranked += sorted((b for b in pruned if b not in reached), key=lambda b: -pruned[b])
    return ranked


def kendall(a: list[str], b: list[str]) -> float:
    from scipy.stats import kendalltau

    common = [x for x in a if x in b]
    return float(kendalltau([a.index(x) for x in common], [b.index(x) for x in common]).statistic)


def compare(grid: dict, search: dict, label: str) -> dict:
    state = search["state"]
    rows = {}
    for ds, by_backbone in grid["scores"].items():
        group = f"{ds}/frac1.0"
        means = {b: sum(t for t, _ in v) / len(v) for b, v in by_backbone.items()}
        grid_rank = sorted(means, key=lambda b: -means[b])
        winner = grid_rank[0]
        last_two = set()
        for rung in state["rungs"][-2:]:
            last_two |= set(rung["candidates"][group])
        ranking = search_ranking(state, group)
        row = {
            "grid_winner": winner,
            "grid_test_top1": round(means[winner], 4),
            "search_winner": state["winners"][group],
            "search_winner_grid_test_top1": round(means[state["winners"][group]], 4),
            "same_winner": state["winners"][group] == winner,
            "grid_winner_in_last_two_rungs": winner in last_two,
            "kendall_tau_search": round(kendall(ranking, grid_rank), 3),
        }
        if state["proxy"]:
            px = state["proxy"][group]["scores"]
            row["kendall_tau_proxy"] = round(
                kendall(sorted(px, key=lambda b: -px[b]), grid_rank), 3
            )
        rows[ds] = row
    ratio = {
        "train_seconds": round(
            (search["train_seconds"] + search["proxy_seconds"]) / grid["train_seconds"], 3
        ),
        "epochs": round(search["epochs"] / grid["epochs"], 3),
        "wall_seconds": round(search["wall_seconds"] / grid["wall_seconds"], 3),
    }
    print(f"\n== {label}: compute vs grid: {ratio}")
    for ds, row in rows.items():
        print(f"  {ds}: {row}")
    return {"ratio": ratio, "datasets": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--eta", type=int, default=3)
    ap.add_argument("--proxy", type=int, default=0, help="also run restart with a k-NN proxy")
    ap.add_argument("--out", type=Path, default=Path("/tmp/select_vs_grid"))
    ap.add_argument("--only", default="grid,restart,continue")
    args = ap.parse_args()
    logging.disable(logging.WARNING)

    import torch

    torch.set_num_threads(1)
    from service.spec import parse_spec

    patches = make_patches(args.out / "data" / "patches.npz")
    only = args.only.split(",")
    results: dict = {"epochs": args.epochs, "eta": args.eta, "backbones": BACKBONES}
    grid = run_grid(parse_spec(study_doc(args.out, "grid", args.epochs, None, patches)))
    results["grid"] = {k: v for k, v in grid.items()}
    print(
        f"grid: {grid['epochs']:.0f} epochs, {grid['train_seconds']:.1f} s training, "
        f"{grid['wall_seconds']:.1f} s wall"
    )
    variants = [s for s in ("restart", "continue") if s in only]
    if args.proxy:
        variants.append("restart+proxy")
    for variant in variants:
        search = {"strategy": "successive_halving", "eta": args.eta}
        search["schedule"] = variant.split("+")[0]
        if variant.endswith("proxy"):
            search["proxy"] = {"method": "knn", "keep": args.proxy}
        name = variant.replace("+", "-")
        doc = study_doc(args.out, f"sh-{name}", args.epochs, search, patches)
        res = run_search(parse_spec(doc))
        print(
            f"{variant}: {res['epochs']:.0f} epochs, {res['train_seconds']:.1f} s training "
            f"(+{res['proxy_seconds']:.1f} s proxy), {res['wall_seconds']:.1f} s wall"
        )
        results[variant] = {**compare(grid, res, variant), "run": {
            k: v for k, v in res.items() if k != "state"}}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
