"""What a 12-cell Study costs as the cluster bills it: one cell per pod vs cells packed per pod.

Starts its own SeaweedFS (``weed mini`` on 127.0.0.1, credentials configured), pushes two
generated ImageFolder datasets with ``backbones dataset push``, and runs a Study of 2 datasets x
3 small timm test backbones x 2 seeds (12 cells, outputs to the same S3) twice, each index the
way a pod runs it: a fresh ``python -m service.run.worker`` with ``JOB_COMPLETION_INDEX`` set,
an empty cache folder of its own (the pod's emptyDir) and one thread (OMP_NUM_THREADS=1):

  1. one cell per pod (``resources.cells_per_pod: 1``, the default): 12 processes
  2. packed (``resources.cells_per_pod: 6``): 2 processes, one per dataset

side by side: each packed index runs next to the unpacked pods of the same cells (packed first
on every other one), so the shared machine's load drifts onto both modes alike.

Billed seconds are each process's wall clock (pod start -> pod end, minus scheduling and image
pull, which this machine does not model). Per part: when summary.json carries the per-attempt
``cost`` record (issue 26 point 1) its parts are used; otherwise ``train`` is summary.json's
``train_seconds`` and ``other`` is the rest of the process's wall, split evenly over its cells.

Usage: python benchmarks/study_cost.py [--images 1500] [--epochs 2] [--cells-per-pod 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BACKBONES = ("test_resnet", "test_efficientnet", "test_convnext")
PARTS = ("startup", "lease_wait", "fetch", "prepare", "build", "probe", "compile", "train",
         "evaluate", "upload", "other")  # fmt: skip


def study_doc(bucket: str, endpoint: str, prefix: str, args, cells_per_pod) -> dict:
    return {
        "kind": "Study",
        "name": "cost",
        "backbones": [{"model": m, "weights": "none"} for m in BACKBONES],
        "datasets": [
            {"uri": f"s3://{bucket}/data/{d}/", "name": d, "val_fraction": 0.1}
            for d in ("alpha", "beta")
        ],
        "seeds": [0, 1],
        "protocol": {
            "image_size": args.size,
            "batch_size": 32,
            "max_epochs": args.epochs,
            "device": "cpu",
        },
        "output": {"uri": f"s3://{bucket}/{prefix}/"},
        "storage": {"endpoint_url": endpoint},
        "metrics": {"port": 0},
        "resources": {"cells_per_pod": cells_per_pod},
    }


def run_index(spec: Path, index: int, cache: Path, env: dict) -> tuple[float, int, str]:
    """One pod: a fresh worker process with an empty cache; its wall clock and exit code."""
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "service.run.worker", "--spec", str(spec), "--cache-dir",
         str(cache)],
        cwd=REPO,
        env={**env, "JOB_COMPLETION_INDEX": str(index)},
        capture_output=True,
        text=True,
    )  # fmt: skip
    return time.perf_counter() - t, r.returncode, r.stderr[-2000:]


def parts_of(summary: dict, wall_share: float) -> dict[str, float]:
    """A cell's seconds per part: its ``cost`` record when present, else train + the rest."""
    cost = summary.get("cost") or {}
    if cost.get("seconds"):
        return {k: float(cost["seconds"].get(k) or 0.0) for k in PARTS}
    train = float(summary["train_seconds"])
    return {"train": train, "other": max(0.0, wall_share - train)}


def plan_mode(name: str, doc: dict, work: Path) -> dict:
    """The mode's spec file, its Job indexes (cells per index) and the cells."""
    from service.cost.packs import packs
    from service.spec import parse_spec
    from service.spec.study import expand

    spec = parse_spec(doc)
    path = work / f"{name}.json"
    path.write_text(spec.to_json())
    prefix = doc["output"]["uri"].split("/", 3)[3]
    return {"path": path, "indexes": packs(spec), "cells": expand(spec), "prefix": prefix}


def schedule(plans: dict) -> list[tuple[str, int]]:
    """(mode, index) in the order they run: each packed index beside the unpacked indexes of
    the same cells, packed first on every other one, so a change in the machine's load falls
    on both modes alike (a cell's index is its position when unpacked)."""
    order = []
    for p, pack in enumerate(plans["packed"]["indexes"]):
        alone = [("unpacked", c) for c in pack]
        order += [("packed", p), *alone] if p % 2 else [*alone, ("packed", p)]
    return order


def run_all(plans: dict, work: Path, env: dict, client, bucket: str) -> dict:
    results = {
        name: {"pods": len(plan["indexes"]), "billed": 0.0, "parts": dict.fromkeys(PARTS, 0.0)}
        for name, plan in plans.items()
    }
    for name, i in schedule(plans):
        plan, r = plans[name], results[name]
        wall, rc, err = run_index(plan["path"], i, work / f"cache-{name}-{i}", env)
        if rc != 0:
            raise SystemExit(f"{name} index {i}: exit {rc}\n{err}")
        r["billed"] += wall
        pack = plan["indexes"][i]
        for c in pack:
            key = f"{plan['prefix']}{plan['cells'][c].run_id}/summary.json"
            summary = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
            for k, v in parts_of(summary, wall / len(pack)).items():
                r["parts"][k] += v
        print(f"  {name} index {i}: {len(pack)} cell(s), {wall:.1f} s", flush=True)
    return results


def report(name: str, r: dict) -> None:
    parts = "  ".join(f"{k} {v:.1f}" for k, v in r["parts"].items() if v)
    share = r["parts"]["train"] / r["billed"]
    print(f"{name:9s} pods {r['pods']:2d}  billed {r['billed']:7.1f} s  train share {share:5.1%}")
    print(f"          parts (s): {parts}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=1500, help="images per dataset")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--cells-per-pod", default="6", help="packed mode's cells_per_pod")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    from benchmarks.s3_fetch import make_images
    from service.data.push import push
    from service.spec import Storage
    from tests.fixtures.seaweed import SeaweedServer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    server = SeaweedServer(work / "weed").start()
    try:
        os.environ.update(server.env())
        env = {
            **os.environ,
            **server.env(),
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
        }
        storage = Storage(endpoint_url=server.endpoint)
        bucket = server.make_bucket("cost")
        for d in ("alpha", "beta"):
            make_images(work / d, args.images, args.size)
            push(work / d, f"s3://{bucket}/data/{d}/", storage)
        client = server.client()
        k = args.cells_per_pod if args.cells_per_pod == "auto" else int(args.cells_per_pod)
        plans = {
            name: plan_mode(name, study_doc(bucket, server.endpoint, f"runs-{name}", args, n), work)
            for name, n in (("unpacked", 1), ("packed", k))
        }
        results = run_all(plans, work, env, client, bucket)
        print(
            f"\n12 cells ({len(BACKBONES)} backbones x 2 datasets x 2 seeds), {args.images} "
            f"images/dataset at {args.size}px, {args.epochs} epochs, 1 thread"
        )
        for name, r in results.items():
            report(name, r)
        ratio = results["packed"]["billed"] / results["unpacked"]["billed"]
        print(f"packed / unpacked wall: {ratio:.2f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
