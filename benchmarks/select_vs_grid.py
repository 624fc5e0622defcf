"""Successive halving against the full grid, on this CPU, with timm's tiny test_* models.

What a user gets by default is what is measured: two settings, each a grid and a search
(``schedule: continue``, eta 3) of the same Study:

  default     recipe 'standard' as shipped (1 linear-warmup epoch, then cosine),
  no-warmup   the same with ``warmup_epochs: 0``,

on four offline datasets, generated or shipped by a package: scikit-learn's digits; "patches"
(12 classes of 32x32 patches of the two photos scikit-learn ships: a texture task); "shapes"
(circle / square / triangle / cross drawn at random places, sizes and colours); and
"noisy-digits" (400 digits, 20% of the train labels flipped: low data and label noise). Each
(setting, dataset) is repeated ``--reps`` times with different seeds (repetition r uses seeds
r*S .. r*S+S-1, S = ``--seeds``).

Per setting it prints: the rate of (dataset, repetition) pairs where the search's winner is the
grid's winner or not distinguishable from it (paired t-test over the seeds on the grid's test
top-1, service.stats; with fewer than 3 seeds no pair is distinguishable, and the table
says so), the mean regret in points of test top-1 (grid winner minus search winner), and the
search's epochs, training seconds and wall seconds against the grid's.

    python benchmarks/select_vs_grid.py [--reps 3] [--seeds 3] [--epochs 9] [--backbones 6]

Weights are random ('none'): no pretrained weights can be downloaded here.
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
    "test_nfnet",
    "test_byobnet",
    "test_vit",
    "test_mambaout",
]
SETTINGS = {"default": {}, "no-warmup": {"warmup_epochs": 0}}


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


def make_shapes(path: Path, per_class: int = 120, size: int = 32) -> Path:
    """4 classes of filled shapes (circle, square, triangle, cross) at random places, sizes
    and colours on a noisy background."""
    import numpy as np

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for label in range(4):
        for _ in range(per_class):
            r = rng.integers(5, 11)
            cy, cx = rng.integers(r, size - r, 2)
            dy, dx = yy - cy, xx - cx
            mask = (
                [
                    dy**2 + dx**2 <= r**2,
                    (abs(dy) <= r) & (abs(dx) <= r),
                    (dy <= r) & (dy >= -r) & (abs(dx) <= (dy + r) / 2),
                    (abs(dy) <= r // 3) | (abs(dx) <= r // 3),
                ][label]
                & (abs(dy) <= r)
                & (abs(dx) <= r)
            )
            img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            img[mask] = rng.integers(120, 256, 3)
            images.append(img)
            labels.append(label)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=np.stack(images), labels=np.array(labels, dtype=np.int64))
    return path


def make_noisy_digits(path: Path, n: int = 400, flip: float = 0.2) -> Path:
    """400 of scikit-learn's digits (8x8, upsampled by the pipeline); ``flip`` of the labels
    replaced by a random other class. The test split is carved from the same noisy labels,
    so the noise costs every backbone alike."""
    import numpy as np
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(2)
    d = load_digits()
    idx = rng.choice(len(d.target), n, replace=False)
    images = (d.images[idx] * 16).clip(0, 255).astype(np.uint8)
    labels = d.target[idx].astype(np.int64)
    flipped = rng.random(n) < flip
    labels[flipped] = (labels[flipped] + rng.integers(1, 10, flipped.sum())) % 10
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=labels)
    return path


def datasets(out: Path) -> list[dict]:
    common = {"test_fraction": 0.2, "val_fraction": 0.2}
    return [
        {"uri": "builtin://digits", **common},
        {"uri": str(make_patches(out / "data" / "patches.npz")), **common},
        {"uri": str(make_shapes(out / "data" / "shapes.npz")), **common},
        {"uri": str(make_noisy_digits(out / "data" / "noisy-digits.npz")), **common},
    ]


def study_doc(out: Path, name: str, args, setting: str, rep: int, search: dict | None) -> dict:
    doc = {
        "kind": "Study",
        "name": name,
        "backbones": [{"model": m, "weights": "none"} for m in BACKBONES[: args.backbones]],
        "datasets": datasets(out),
        "seeds": list(range(rep * args.seeds, (rep + 1) * args.seeds)),
        "protocol": {
            "image_size": 16,
            "batch_size": 64,
            "max_epochs": args.epochs,
            "device": "cpu",
            **SETTINGS[setting],
        },
        "output": {"uri": str(out / setting / f"rep{rep}" / name)},
        "metrics": {"port": 0},
    }
    if search:
        doc["search"] = search
    return doc


def run_grid(study) -> dict:
    from service.outputs.folder import RunOutputs
    from service.run.cell import run_cell
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
        out.setdefault(ds, {}).setdefault(cell.backbone.model, {})[cell.protocol.seed] = (
            outcome.summary.test.top1
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
    runner = LocalRunner(stop=threading.Event(), echo=lambda s: None, err=lambda s: None)
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


def judge(grid: dict, search: dict) -> list[dict]:
    """Per dataset: grid winner, search winner, tie or not, regret in points."""
    from service.stats import paired_test

    rows = []
    for ds, by_backbone in grid["scores"].items():
        means = {b: sum(v.values()) / len(v) for b, v in by_backbone.items()}
        best = max(means, key=lambda b: means[b])
        pick = search["state"]["winners"][f"{ds}/frac1.0"]
        test = paired_test(by_backbone[best], by_backbone[pick])
        rows.append(
            {
                "dataset": ds,
                "grid_winner": best,
                "search_winner": pick,
                "same": pick == best,
                "verdict": "same" if pick == best else test.verdict,
                "regret_points": round(100 * (means[best] - means[pick]), 2),
            }
        )
    return rows


def summarise(setting: str, reps: list[dict]) -> dict:
    pairs = [row for rep in reps for row in rep["datasets"]]
    ok = [r for r in pairs if r["verdict"] != "distinguishable"]
    same = [r for r in pairs if r["same"]]

    def ratio(key: str) -> float:
        return sum(r["search"][key] for r in reps) / sum(r["grid"][key] for r in reps)

    return {
        "setting": setting,
        "pairs": len(pairs),
        "same_winner": len(same),
        "winner_or_tie": len(ok),
        "ties_for_lack_of_evidence": sum(r["verdict"] == "not enough evidence" for r in pairs),
        "mean_regret_points": round(sum(r["regret_points"] for r in pairs) / len(pairs), 2),
        "epochs_vs_grid": round(ratio("epochs"), 3),
        "train_seconds_vs_grid": round(ratio("train_seconds"), 3),
        "wall_vs_grid": round(ratio("wall_seconds"), 3),
    }


def table(summaries: list[dict]) -> str:
    head = ("| Setting | (dataset, rep) pairs | same winner | winner or tie | mean regret (pts) "
            "| epochs | training s | wall |")  # fmt: skip
    lines = [head, "|" + " --- |" * 8]
    for s in summaries:
        lines.append(
            f"| {s['setting']} | {s['pairs']} | {s['same_winner']} | {s['winner_or_tie']} "
            f"({s['ties_for_lack_of_evidence']} for lack of evidence) | "
            f"{s['mean_regret_points']:.2f} | {s['epochs_vs_grid']:.0%} | "
            f"{s['train_seconds_vs_grid']:.0%} | {s['wall_vs_grid']:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--eta", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per study")
    ap.add_argument("--backbones", type=int, default=len(BACKBONES))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--out", type=Path, default=Path("/tmp/select_vs_grid"))
    args = ap.parse_args()
    logging.disable(logging.WARNING)

    import torch

    torch.set_num_threads(1)
    from service.spec import parse_spec

    search = {"strategy": "successive_halving", "eta": args.eta, "schedule": "continue"}
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "settings": []}
    for setting in args.settings.split(","):
        reps = []
        for rep in range(args.reps):
            grid = run_grid(parse_spec(study_doc(args.out, "grid", args, setting, rep, None)))
            res = run_search(parse_spec(study_doc(args.out, "sh", args, setting, rep, search)))
            rows = judge(grid, res)
            reps.append({"datasets": rows, "grid": grid, "search": {
                k: v for k, v in res.items() if k != "state"}})  # fmt: skip
            print(f"{setting} rep {rep}: " + "; ".join(
                f"{r['dataset']}: {r['verdict']} (regret {r['regret_points']})" for r in rows),
                flush=True)  # fmt: skip
        results["settings"].append({**summarise(setting, reps), "reps": reps})
    print(table(results["settings"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
