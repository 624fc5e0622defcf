"""How long until a 10,000-image dataset is on local disk and verified, from a real S3 server.

Starts its own SeaweedFS (``weed mini`` on 127.0.0.1, credentials configured), generates N small
JPEGs in an ImageFolder (train/test, 10 classes), stores them twice — packed by
``backbones dataset push`` and as one object per image — and times, side by side:

  1. packed shards via ``fetch_dataset`` (parallel GETs, sha256 verified, into a fresh cache)
  2. one object per image, fetched one after another (MD5 checked against the ETag)
  3. one object per image, 10 requests in parallel (what ``aws s3 sync`` does by default)
  4. a warm-cache start: ``fetch_dataset`` again on the same node (should download nothing)
  5. (for reference) ``fetch_dataset`` of the per-object ImageFolder prefix (parallel GETs)

Usage: python benchmarks/s3_fetch.py [--images 10000] [--size 64] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_images(root: Path, n: int, size: int, classes: int = 10) -> int:
    """N noisy-gradient JPEGs (quality 90), 80% train / 20% test, spread over ``classes``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    total = 0
    for i in range(n):
        split = "test" if (i // classes) % 5 == 0 else "train"
        cls = f"class{i % classes:02d}"
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, (xx + yy) % 256], -1)
        noise = rng.integers(0, 40, (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(
            buf, format="JPEG", quality=90
        )
        (d / f"{i:05d}.jpg").write_bytes(buf.getvalue())
        total += len(buf.getvalue())
    return total


def per_object_fetch(client, bucket: str, prefix: str, dest: Path, workers: int) -> int:
    """List, then GET every object to ``dest`` (MD5 checked against the single-part ETag)."""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [(o["Key"], o["ETag"].strip('"')) for o in page.get("Contents", [])]

    def get(item) -> int:
        key, etag = item
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        if hashlib.md5(body).hexdigest() != etag:
            raise RuntimeError(f"{key}: md5 mismatch")
        out = dest / key[len(prefix) :]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(body)
        return len(body)

    if workers == 1:
        return sum(get(k) for k in keys)
    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(get, keys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    from service.data.push import push
    from service.spec import Storage, parse_spec
    from service.storage.fetch import fetch_dataset
    from service.storage.s3 import S3Store, client_for
    from tests.fixtures.seaweed import SeaweedServer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-s3-"))
    work.mkdir(parents=True, exist_ok=True)
    server = SeaweedServer(work / "weed").start()
    try:
        os.environ.update(server.env())
        storage = Storage(endpoint_url=server.endpoint)
        bucket = server.make_bucket("bench")
        t = time.perf_counter()
        nbytes = make_images(work / "src", args.images, args.size)
        print(
            f"generated {args.images} JPEGs ({args.size}x{args.size}, "
            f"{nbytes / 2**20:.1f} MiB) in {time.perf_counter() - t:.1f} s"
        )

        t = time.perf_counter()
        result = push(work / "src", f"s3://{bucket}/packed/bench/", storage)
        n_shards = len(result.manifest["shards"])
        print(f"dataset push: {n_shards} shard(s) in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        raw = S3Store(f"s3://{bucket}/raw/bench/", storage)
        files = sorted(p for p in (work / "src").rglob("*.jpg"))
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda p: raw.upload_file(p, p.relative_to(work / "src").as_posix()), files
                )
            )
        print(f"per-object upload: {len(files)} objects in {time.perf_counter() - t:.1f} s")

        def spec(uri: str):
            return parse_spec(
                {
                    "kind": "FineTune",
                    "name": "bench",
                    "backbone": {"model": "test_resnet", "weights": "none"},
                    "dataset": {"uri": uri},
                    "storage": storage.model_dump(),
                }
            )

        class Count:
            total = 0

            def on_download(self, n: int) -> None:
                Count.total += n

        times: dict[str, float] = {}
        cache = work / "cache"

        t = time.perf_counter()
        fetch_dataset(spec(f"s3://{bucket}/packed/bench/"), cache, Count())
        times["packed"] = time.perf_counter() - t
        packed_bytes = Count.total

        client = client_for(storage)
        for name, workers in (("sequential", 1), ("parallel10", 10)):
            dest = work / f"dl-{name}"
            t = time.perf_counter()
            got = per_object_fetch(client, bucket, "raw/bench/", dest, workers)
            times[name] = time.perf_counter() - t
            assert got == nbytes, (got, nbytes)
            shutil.rmtree(dest)

        Count.total = 0
        t = time.perf_counter()
        fetch_dataset(spec(f"s3://{bucket}/packed/bench/"), cache, Count())
        times["warm"] = time.perf_counter() - t
        warm_bytes = Count.total

        t = time.perf_counter()
        fetch_dataset(spec(f"s3://{bucket}/raw/bench/"), work / "cache-folder", None)
        times["folder"] = time.perf_counter() - t

        print()
        print(f"{'time to local disk, verified':<52}{'seconds':>9}{'vs packed':>11}")
        rows = [
            ("1. packed shards (fetch_dataset)", "packed"),
            ("2. one object per image, sequential", "sequential"),
            ("3. one object per image, 10 parallel (aws s3 sync)", "parallel10"),
            ("4. warm cache (fetch_dataset again)", "warm"),
            ("5. ImageFolder prefix (fetch_dataset, 16 parallel)", "folder"),
        ]
        for label, key in rows:
            ratio = times[key] / times["packed"]
            print(f"{label:<52}{times[key]:>9.2f}{ratio:>10.1f}x")
        print()
        print(
            f"packed vs sequential per-object: {times['sequential'] / times['packed']:.1f}x "
            "faster (goal >= 10x)"
        )
        print(
            f"packed vs 10-parallel per-object: {times['parallel10'] / times['packed']:.1f}x "
            "faster (goal >= 3x)"
        )
        print(
            f"warm cache: {times['warm']:.3f} s, {warm_bytes} bytes downloaded "
            f"(cold: {packed_bytes / 2**20:.1f} MiB) (goal: 0 bytes, < 1 s)"
        )
    finally:
        server.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
