"""The worker under torchrun, with CPU stand-ins for what goes wrong on a multi-GPU node.

    python -m torch.distributed.run --standalone --nproc-per-node=2 -m tests.ddp_probe \
        --spec FILE [--slow-prepare S] [--memory-report DIR]

- ``--slow-prepare S``: rank 0's dataset preparation takes S seconds longer, as a large
  dataset on slow S3 does; run it with a short ``BACKBONES_DIST_TIMEOUT_SECONDS`` to show the
  other ranks do not wait inside a collective bounded by the process group's timeout.
- ``--memory-report DIR``: each rank samples its anonymous (unshared) resident memory while
  it prepares the data, and while it builds its loaders and they serve a whole epoch of every
  split; it writes how far it rose in each window to ``DIR/rank<k>.json`` and exits 0 without
  training. Shared page cache (the memory-mapped
  decoded dataset) is not anonymous memory: it is counted once per node.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path


def anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler(threading.Thread):
    """The highest RssAnon seen, sampled every millisecond."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = anon_bytes()
        self.running = True

    def run(self):
        while self.running:
            self.peak = max(self.peak, anon_bytes())
            time.sleep(0.001)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, anon_bytes())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--slow-prepare", type=float, default=0.0)
    ap.add_argument("--memory-report", type=Path)
    args = ap.parse_args()
    # Imported up front, so the windows below measure data, not the one-time cost of imports.
    import sklearn.model_selection  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    from service.data import dataset, sources, splits  # noqa: F401
    from service.run import pipeline, worker

    rank = int(os.environ.get("RANK", "0"))
    prepare = pipeline._prepare

    growth: dict[str, int] = {}

    def window(name: str, fn):
        """Run fn; record how far anonymous memory rose above where it started."""
        sampler = PeakSampler()
        start = anon_bytes()
        sampler.start()
        try:
            return fn()
        finally:
            growth[name] = sampler.stop() - start

    def probed_prepare(*a, **kw):
        if rank == 0 and args.slow_prepare:
            time.sleep(args.slow_prepare)
        if not args.memory_report:
            return prepare(*a, **kw)
        return window("prepare", lambda: prepare(*a, **kw))

    pipeline._prepare = probed_prepare
    if args.memory_report:
        make_loaders = pipeline.make_loaders

        def probed_loaders(data, *a, **kw):
            def serve_an_epoch():
                loaders = make_loaders(data, *a, **kw)
                for loader in (loaders.train, loaders.select, loaders.test):
                    for _ in loader.epoch(0):
                        pass

            window("loaders", serve_an_epoch)
            report = {
                "rank": rank,
                "growth_bytes": growth,
                "cache_bytes": Path(data.cache_path).stat().st_size,
            }
            args.memory_report.mkdir(parents=True, exist_ok=True)
            (args.memory_report / f"rank{rank}.json").write_text(json.dumps(report))
            sys.stdout.flush()
            os._exit(0)

        pipeline.make_loaders = probed_loaders
    return worker.main(["--spec", args.spec])


if __name__ == "__main__":
    sys.exit(main())
