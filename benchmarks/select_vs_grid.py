"""Successive halving against the full grid, on this CPU, with timm's tiny test_* models.

What a user gets by default is what is measured: two settings, each a grid and a search
(``schedule: continue``, eta 3) of the same Study:

  default     recipe 'standard' as shipped (1 linear-warmup epoch, then cosine),
  no-warmup   the same with ``warmup_epochs: 0``,

on four offline datasets, generated or shipped by a package: "digits" (1000 of scikit-learn's
1797 digits); "patches" (12 classes of 32x32 patches of the two photos scikit-learn ships, 75
per class: a texture task); "shapes" (circle / square / triangle / cross drawn at random places,
sizes and colours, 120 per class); and "noisy-digits" (400 digits, 20% of the labels flipped:
low data and label noise). Each (setting, dataset) is repeated ``--reps`` times with different
seeds (repetition r uses seeds r*S .. r*S+S-1, S = ``--seeds``).

The unit of work is one (setting, repetition, dataset): its grid (every candidate x seed to
``--epochs``) trains in a pool process (``--jobs``, one torch thread each), and the ``continue``
search is replayed on the grid's own runs: a rung of ``continue`` is the beginning of the very
run the grid trains (tests/test_search_continuity.py), so its score is the grid run's best
validation top-1 within the rung's budget, and the decisions are the driver's own functions.
``--verify DATASET`` also runs the real driver on that dataset's repetition 0 and records
whether its promotions equal the replay's. One grid per pair serves both the winner and the
tie test. Each finished pair is appended to ``<out>/pairs.jsonl`` (a cut-off run keeps what it
did and resumes from it); ``--table`` prints the table of what is there.

Per setting it prints: the rate of (dataset, repetition) pairs where the search's winner is the
grid's winner or not distinguishable from it (paired t-test over the seeds on the grid's test
top-1, service.stats; with fewer than 3 seeds no pair is distinguishable, and the table
says so), the mean regret in points of test top-1 (grid winner minus search winner), and the
search's epochs and training seconds against the grid's (the grid's per-epoch seconds over the
epochs the search trains; wall time is not measured for a replayed search), then one line per
pair with the rung that cut the grid's winner.

    python benchmarks/select_vs_grid.py [--reps 3] [--seeds 3] [--epochs 9] [--backbones 6]
    python benchmarks/select_vs_grid.py --table        # what <out>/pairs.jsonl holds so far

Weights are random ('none'): no pretrained weights can be downloaded here.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
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


def make_digits(path: Path, n: int = 1000) -> Path:
    """1000 of scikit-learn's 1797 digits, clean labels (fewer images: cheaper epochs on this
    CPU, still 10 classes and ~600 train images)."""
    import numpy as np
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(3)
    d = load_digits()
    idx = rng.choice(len(d.target), n, replace=False)
    images = (d.images[idx] * 16).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=d.target[idx].astype(np.int64))
    return path


def datasets(out: Path) -> list[dict]:
    common = {"test_fraction": 0.2, "val_fraction": 0.2}
    data = out / "data"
    return [
        {"uri": str(make_digits(data / "digits.npz")), **common},
        {"uri": str(make_patches(data / "patches.npz", per_class=75)), **common},
        {"uri": str(make_shapes(data / "shapes.npz")), **common},
        {"uri": str(make_noisy_digits(data / "noisy-digits.npz")), **common},
    ]


def study_doc(out: Path, args, job: dict, name: str, search: dict | None) -> dict:
    """The Study of one (setting, repetition, dataset): all candidates, the repetition's seeds."""
    rep, setting = job["rep"], job["setting"]
    doc = {
        "kind": "Study",
        "name": name,
        "backbones": [{"model": m, "weights": "none"} for m in BACKBONES[: args.backbones]],
        "datasets": [job["data"]],
        "seeds": list(range(rep * args.seeds, (rep + 1) * args.seeds)),
        "protocol": {
            "image_size": 16,
            "batch_size": 64,
            "max_epochs": args.epochs,
            "device": "cpu",
            **SETTINGS[setting],
        },
        "output": {"uri": str(out / setting / f"rep{rep}" / job["dataset"] / name)},
        "metrics": {"port": 0},
    }
    if search:
        doc["search"] = search
    return doc


def run_grid(study) -> dict:
    """Every cell of the Study, trained to max_epochs: its test top-1 and its per-epoch
    validation top-1 and seconds (what the replayed search reads)."""
    from service.outputs.folder import RunOutputs
    from service.run.cell import run_cell
    from service.spec.study import expand
    from service.storage import open_store

    t0 = time.perf_counter()
    test: dict[str, dict[int, float]] = {}
    curves: dict[str, dict[int, list[dict]]] = {}
    billed = 0.0  # every cell's recorded wall (summary.json's cost), as a pod would bill it
    for cell in expand(study):
        outcome = run_cell(cell, stop=threading.Event())
        billed += outcome.summary.cost.billed_seconds if outcome.summary.cost else 0.0
        records = RunOutputs(open_store(cell.output.uri).child(cell.run_id)).metrics()
        m, seed = cell.backbone.model, cell.protocol.seed
        test.setdefault(m, {})[seed] = outcome.summary.test.top1
        curves.setdefault(m, {})[seed] = [
            {k: r.get(k) for k in ("epoch", "val_top1", "epoch_seconds")} for r in records
        ]
    wall = time.perf_counter() - t0
    return {"test": test, "curves": curves, "wall_seconds": wall, "billed_seconds": billed}


EXTRAS = ("all", "not-into-last", "none")


def replay_search(study, grid: dict, extras: str = "all") -> dict:
    """The ``continue`` search's decisions, replayed on the grid's own runs.

    Under ``continue`` a rung's cell is the beginning of the very run the grid trains (same
    seed, same data order, same schedule: tests/test_search_continuity.py checks that a
    candidate trained rung by rung ends with the straight run's weights and metrics), so its
    rung score is the grid run's best validation top-1 within the rung's budget. The decisions
    use the driver's own functions (rung_score, t_interval, promote, budgets); ``--verify``
    runs the real driver on one dataset and checks that the replay picks what it picks.
    ``extras`` other than "all" (the driver's rule) are counterfactuals for ``--variants``:
    "not-into-last" promotes a plain top-k into the last rung, "none" at every rung."""
    from service.search.plan import budgets, groups, promote, rung_score, survivors_per_rung
    from service.stats import t_interval

    order = [b.model for b in study.backbones]
    counts = survivors_per_rung(len(order), study.search.eta)
    epochs_per_rung = budgets(study, groups(study)[0], len(order))
    candidates, rungs, epochs, seconds, prev = order, [], 0, 0.0, 0
    for r, budget in enumerate(epochs_per_rung):
        results = {}
        for b in candidates:
            per_seed = grid["curves"][b]
            vals = [rung_score(recs, budget) for recs in per_seed.values()]
            vals = [v for v in vals if v is not None]
            iv = t_interval(vals) if vals else None
            results[b] = {
                "mean": iv.mean if iv else None,
                "low": iv.low if iv else None,
                "high": iv.high if iv else None,
            }
            for recs in per_seed.values():
                spent = [x for x in recs if prev < (x["epoch"] or 0) <= budget]
                epochs += len(spent)
                seconds += sum(x["epoch_seconds"] or 0.0 for x in spent)
        last = r + 1 == len(counts)
        keep = 1 if last else counts[r + 1]
        plain = extras == "none" or (extras == "not-into-last" and r + 2 == len(counts))
        promoted = promote(results, keep, candidates, last=last or plain)  # last: no extras
        rungs.append({"epochs": budget, "candidates": candidates, "promoted": promoted})
        candidates, prev = promoted, budget
    return {"winner": candidates[0], "rungs": rungs, "epochs": epochs, "train_seconds": seconds}


def run_search(study) -> dict:
    """The real driver, for ``--verify``."""
    from service.search.driver import Driver, LocalRunner

    runner = LocalRunner(stop=threading.Event(), echo=lambda s: None, err=lambda s: None)
    t0 = time.perf_counter()
    state = Driver(study, runner, echo=lambda s: None).run()
    # Each run's bill once, at its largest (a 'continue' run's later rungs include its earlier).
    bills: dict[str, float] = {}
    for rung in state["rungs"]:
        for by_backbone in rung["results"].values():
            for res in by_backbone.values():
                for run_id, bill in (res.get("billed") or {}).items():
                    bills[run_id] = max(bills.get(run_id, 0.0), bill["seconds"])
    return {
        "winner": next(iter(state["winners"].values())),
        "promoted": [next(iter(r["promoted"].values())) for r in state["rungs"]],
        "billed_seconds": round(sum(bills.values()), 2),
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }


def judge(grid: dict, search: dict) -> dict:
    """Grid winner (best mean test top-1), the search's, tie or not, regret in points."""
    from service.stats import paired_test

    scores = grid["test"]
    means = {b: sum(v.values()) / len(v) for b, v in scores.items()}
    best = max(means, key=lambda b: means[b])
    pick = search["winner"]
    test = paired_test(scores[best], scores[pick])
    # the rung that stopped the grid's winner (None: it reached the last rung)
    cut_at = next((i + 1 for i, r in enumerate(search["rungs"]) if best not in r["promoted"]), None)
    return {
        "grid_winner": best,
        "search_winner": pick,
        "same": pick == best,
        "verdict": "same" if pick == best else test.verdict,
        "p_value": test.p_value if pick != best else None,
        "regret_points": round(100 * (means[best] - means[pick]), 2),
        "grid_winner_cut_at_rung": cut_at if pick != best else None,
    }


def run_job(job: dict) -> dict:
    """One (setting, repetition, dataset): the grid, the replayed search, the verdict."""
    import torch

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    from service.spec import parse_spec

    args = argparse.Namespace(**job["args"])
    out = Path(args.out)
    search = {"strategy": "successive_halving", "eta": args.eta, "schedule": "continue"}
    study = parse_spec(study_doc(out, args, job, "grid", None))
    grid = run_grid(study)
    sh = replay_search(parse_spec(study_doc(out, args, job, "sh", search)), grid)
    grid_epochs = sum(len(r) for c in grid["curves"].values() for r in c.values())
    grid_seconds = sum(
        x["epoch_seconds"] or 0.0 for c in grid["curves"].values() for r in c.values() for x in r
    )
    row = {
        **{k: job[k] for k in ("setting", "rep", "dataset")},
        **judge(grid, sh),
        "rungs": sh["rungs"],
        "search_epochs": sh["epochs"],
        "grid_epochs": grid_epochs,
        "search_train_seconds": round(sh["train_seconds"], 2),
        "grid_train_seconds": round(grid_seconds, 2),
        "grid_wall_seconds": round(grid["wall_seconds"], 2),
        "grid_billed_seconds": round(grid["billed_seconds"], 2),
        "test_top1": grid["test"],
    }
    if job["verify"]:
        real = run_search(parse_spec(study_doc(out, args, job, "sh-real", search)))
        row["verify"] = {
            **real,
            "replay_agrees": real["promoted"] == [r["promoted"] for r in sh["rungs"]],
        }
    return row


def summarise(setting: str, pairs: list[dict]) -> dict:
    ok = [r for r in pairs if r["verdict"] != "distinguishable"]

    def ratio(key: str) -> float:
        return sum(r[f"search_{key}"] for r in pairs) / sum(r[f"grid_{key}"] for r in pairs)

    return {
        "setting": setting,
        "pairs": len(pairs),
        "same_winner": sum(r["same"] for r in pairs),
        "winner_or_tie": len(ok),
        "rate": len(ok) / len(pairs),
        "ties_for_lack_of_evidence": sum(r["verdict"] == "not enough evidence" for r in pairs),
        "mean_regret_points": round(sum(r["regret_points"] for r in pairs) / len(pairs), 2),
        "epochs_vs_grid": round(ratio("epochs"), 3),
        "train_seconds_vs_grid": round(ratio("train_seconds"), 3),
    }


def table(rows: list[dict]) -> str:
    head = (
        "| Setting | (dataset, rep) pairs | same winner | winner or tie | mean regret (pts) "
        "| epochs vs grid | training s vs grid |"
    )
    lines = [head, "|" + " --- |" * 7]
    for setting in SETTINGS:
        pairs = [r for r in rows if r["setting"] == setting]
        if not pairs:
            continue
        s = summarise(setting, pairs)
        lines.append(
            f"| {setting} | {s['pairs']} | {s['same_winner']} | {s['winner_or_tie']} "
            f"({s['rate']:.0%}; {s['ties_for_lack_of_evidence']} for lack of evidence) | "
            f"{s['mean_regret_points']:.2f} | {s['epochs_vs_grid']:.0%} | "
            f"{s['train_seconds_vs_grid']:.0%} |"
        )
    lines += ["", "| Setting | rep | dataset | grid winner | search winner | verdict | regret |"]
    lines.append("|" + " --- |" * 7)
    for r in sorted(rows, key=lambda r: (r["setting"], r["dataset"], r["rep"])):
        cut = r.get("grid_winner_cut_at_rung")
        lines.append(
            f"| {r['setting']} | {r['rep']} | {r['dataset']} | {r['grid_winner']} | "
            f"{r['search_winner']} | {r['verdict']}{f' (cut at rung {cut})' if cut else ''} | "
            f"{r['regret_points']:.2f} |"
        )
    return "\n".join(lines)


def variants(args, rows: list[dict]) -> str:
    """The same grids under the driver's promotion rule and two counterfactuals (``EXTRAS``):
    what the overlap-keeping extras buy and cost. Reads the grids' metrics from ``args.out``
    (run with the arguments that made them)."""
    from service.outputs.folder import RunOutputs
    from service.spec import parse_spec
    from service.spec.study import expand
    from service.storage import open_store

    out = args.out
    names = ["digits", "patches", "shapes", "noisy-digits"]
    data = dict(zip(names, datasets(out), strict=True))
    lines = [
        "| Setting | promotion extras | pairs | same winner | winner or tie | "
        "mean regret (pts) | epochs vs grid | grid winners cut |",
        "|" + " --- |" * 8,
    ]
    for setting in SETTINGS:
        pairs = [r for r in rows if r["setting"] == setting]
        grids = []
        for row in pairs:
            job = {**row, "data": data[row["dataset"]]}
            study = parse_spec(study_doc(out, args, job, "grid", None))
            curves: dict = {}
            for cell in expand(study):
                recs = RunOutputs(open_store(cell.output.uri).child(cell.run_id)).metrics()
                curves.setdefault(cell.backbone.model, {})[cell.protocol.seed] = recs
            test = {m: {int(k): v for k, v in d.items()} for m, d in row["test_top1"].items()}
            grids.append((row, {"test": test, "curves": curves}))
        for extras in EXTRAS if pairs else ():
            judged, epochs = [], 0
            for row, grid in grids:
                search = {"strategy": "successive_halving", "eta": 3, "schedule": "continue"}
                job = {**row, "data": data[row["dataset"]]}
                study = parse_spec(study_doc(out, args, job, "sh", search))
                sh = replay_search(study, grid, extras)
                judged.append({**judge(grid, sh), "dataset": row["dataset"], "rep": row["rep"]})
                epochs += sh["epochs"]
            grid_epochs = sum(r["grid_epochs"] for r in pairs)
            ok = [j for j in judged if j["verdict"] != "distinguishable"]
            missed = ", ".join(
                f"{j['dataset']} rep {j['rep']} (rung {j['grid_winner_cut_at_rung']})"
                for j in judged
                if j not in ok
            )
            lines.append(
                f"| {setting} | {extras} | {len(judged)} | {sum(j['same'] for j in judged)} | "
                f"{len(ok)} ({len(ok) / len(judged):.0%}) | "
                f"{sum(j['regret_points'] for j in judged) / len(judged):.2f} | "
                f"{epochs / grid_epochs:.0%} | {missed or '-'} |"
            )
    return "\n".join(lines)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    """Long because it is the whole command line: jobs, the pool, the partial file, the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--eta", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per repetition")
    ap.add_argument("--backbones", type=int, default=len(BACKBONES))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--jobs", type=int, default=2, help="processes (one torch thread each)")
    ap.add_argument(
        "--verify",
        default="noisy-digits",
        help="dataset whose repetition 0 also runs the real driver ('' for none)",
    )
    ap.add_argument("--table", action="store_true", help="print the table of what is done")
    ap.add_argument(
        "--variants",
        action="store_true",
        help="replay the done grids under other promotion rules (EXTRAS)",
    )
    ap.add_argument("--out", type=Path, default=Path("/tmp/select_vs_grid"))
    args = ap.parse_args()
    rows_path = args.out / "pairs.jsonl"
    if args.table:
        print(table(read_rows(rows_path)))
        return
    if args.variants:
        print(variants(args, read_rows(rows_path)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    data = datasets(args.out)
    names = ["digits", "patches", "shapes", "noisy-digits"]
    done = {(r["setting"], r["rep"], r["dataset"]) for r in read_rows(rows_path)}
    common = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    # repetition-major, settings interleaved: a run cut short still has every setting
    jobs = [
        {
            "setting": s,
            "rep": rep,
            "dataset": name,
            "data": d,
            "args": common,
            "verify": rep == 0 and name == args.verify,
        }
        for rep in range(args.reps)
        for name, d in zip(names, data, strict=True)
        for s in args.settings.split(",")
        if (s, rep, name) not in done
    ]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
        for row in pool.imap_unordered(run_job, jobs):
            with rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{row['setting']} rep {row['rep']} {row['dataset']}: {row['verdict']} "
                f"(regret {row['regret_points']}, grid wall {row['grid_wall_seconds']:.0f} s)"
                + (f" verify: {row['verify']}" if "verify" in row else ""),
                flush=True,
            )
    print(table(read_rows(rows_path)))
    print(f"wrote {rows_path}")


if __name__ == "__main__":
    main()
