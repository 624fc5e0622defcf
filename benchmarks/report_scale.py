"""How long `backbones report` takes over a study of 1,000 finished cells.

Writes synthetic summaries (10 datasets × 20 backbones × 5 seeds, the workers' layout plus a
status.json and a few checkpoint files per cell, as real outputs have) into a temporary folder,
then times, in one run:

  (a) the whole `backbones report URI --out DIR` command in a fresh process (imports included),
  (b) each phase in-process: collect (list + read, thread pool), statistics and tables, plots,
      writing the four files,
  (c) collect with one thread against the pool, side by side (the ratio matters on S3, where
      every read is a round trip; on a local disk it is small).

    python benchmarks/report_scale.py [--datasets 10] [--backbones 20] [--seeds 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.outputs.contract import RunFacts, RunStatus, RunSummary, TestMetrics

DOMAINS = ["natural", "texture", "remote_sensing", "plant", "astronomy", "medical"]


def _summary(run, dataset, domain, backbone, seed, top1, gmacs, b) -> RunSummary:
    """A cell's summary, built as the trainer builds it (service.outputs.contract)."""
    facts = RunFacts(
        run_id=run, name=run.replace("/", "-"), study="scale", spec_hash=None,
        backbone=backbone, weights="none", dataset=dataset, domain=domain, recipe="standard",
        seed=seed, train_fraction=1.0, select_on="val", classes=[str(i) for i in range(10)],
        n_train=1000, n_val=100, n_test=500, params=int(1e6 * (1 + b)), gmacs=gmacs,
    )  # fmt: skip
    test = TestMetrics(
        top1=top1, top5=None, macro_f1=top1 - 0.02, per_class_recall=[top1] * 10,
        confusion_matrix=[[1] * 10 for _ in range(10)],
    )  # fmt: skip
    return RunSummary.build(
        facts, test=test, best_epoch=1, epochs_run=1, best_val_top1=top1,
        stop_reason="max_epochs", train_seconds=600 * gmacs, gpu_hours=600 * gmacs / 3600,
        images_per_second=2000 / gmacs, peak_memory_bytes=1 << 30, device="cpu", num_gpus=0,
        attempts=1, micro_batch=64, accumulation_steps=1, remediations=[],
        finished_at="2026-11-27T00:00:00Z",
    )  # fmt: skip


def write_study(root: Path, datasets: int, backbones: int, seeds: int) -> int:
    rng = random.Random(0)
    n = 0
    for d in range(datasets):
        dataset, domain = f"ds{d:02d}", DOMAINS[d % len(DOMAINS)]
        for b in range(backbones):
            backbone = f"net{b:02d}"
            gmacs = 0.2 + 0.4 * b
            for seed in range(seeds):
                run = f"scale/{dataset}/{backbone}/seed{seed}-frac1.0"
                cell = root / run
                (cell / "checkpoints").mkdir(parents=True)
                top1 = min(0.99, 0.6 + 0.01 * b + 0.02 * d + rng.gauss(0, 0.01))
                summary = _summary(run, dataset, domain, backbone, seed, top1, gmacs, b)
                (cell / "summary.json").write_text(json.dumps(summary.to_dict()))
                status = RunStatus(run_id=run, phase="Succeeded")
                (cell / "status.json").write_text(json.dumps(status.to_dict()))
                (cell / "spec.json").write_text("{}")
                (cell / "metrics.jsonl").write_text("{}\n")
                (cell / "checkpoints" / "ckpt-00001.pt").write_bytes(b"x")
                n += 1
    return n


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", type=int, default=10)
    ap.add_argument("--backbones", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--keep", type=Path, help="Write the data and report here and keep them.")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="report-scale-")) if args.keep is None else args.keep
    root, out = tmp / "runs", tmp / "report"
    try:
        n = write_study(root, args.datasets, args.backbones, args.seeds)
        print(f"{n} summaries under {root}")

        cmd = [sys.executable, "-c", "from service.cli import main; main()", "report"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc, t_cli = timed(
            lambda: subprocess.run(
                [*cmd, str(root), "--out", str(out)], capture_output=True, text=True
            )
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        print(f"(a) backbones report, fresh process:  {t_cli:6.2f} s wall, {cpu:.2f} s CPU")
        load = os.getloadavg()[0]
        print(f"    (goal < 5 s; load average now {load:.1f} on {os.cpu_count()} CPUs)")

        from service.report import writer
        from service.report.collect import collect
        from service.report.plots import fractions_png, pareto_png
        from service.report.tables import build

        col, t_collect = timed(lambda: collect(str(root)))
        report, t_build = timed(lambda: build(col))

        def figures():
            figs = {"pareto.png": pareto_png(report), "fractions.png": fractions_png(report)}
            return {k: v for k, v in figs.items() if v}

        figs, t_plots = timed(figures)
        _, t_write = timed(lambda: writer.write(report, out, figs))
        total = t_collect + t_build + t_plots + t_write
        print(f"(b) in-process total:                  {total:6.2f} s")
        print(f"      collect (list + read, pool)      {t_collect:6.2f} s")
        print(f"      statistics and tables            {t_build:6.2f} s")
        print(f"      plots                            {t_plots:6.2f} s")
        print(f"      write csv/json/md/html           {t_write:6.2f} s")
        _, t_serial = timed(lambda: collect(str(root), workers=1))
        _, t_pool = timed(lambda: collect(str(root)))
        print(
            f"(c) collect, 1 thread {t_serial:.2f} s vs pool {t_pool:.2f} s: "
            f"{t_serial / t_pool:.2f}x"
        )
        assert len(col.done) == n, (len(col.done), n)
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
