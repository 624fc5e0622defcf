"""The stages of the GPU check (``benchmarks/gpu_check.py`` runs each in its own process):

    python benchmarks/gpu_check_stages.py STAGE --work DIR --result FILE [--dry-run REASON]

A stage writes ``{"status", "reason", "figures"}`` to ``--result`` as it goes (each figure as
soon as it is known), so a stage cut off by its timeout keeps what it measured. With
``--dry-run`` a stage builds and validates its specs and commands (``figures.plan``) and
records itself as skipped with the reason: what CI runs without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = str(Path(__file__).resolve().parent / "gpu_check_tools.py")
sys.path.insert(0, str(REPO))

N_IMAGES, N_CLASSES, SOURCE_PX = 4096, 10, 64  # the one dataset every stage trains on
# Parts of summary.json that must not depend on interruptions (timings do).
RESULT_KEYS = ("test", "best_epoch", "epochs_run", "best_val_top1", "n_train", "n_val", "n_test")
OOM_LIMIT_BYTES = 3 * 2**30  # the forced cap of the CUDA caching allocator


class Record:
    def __init__(self, path: Path, dry: str | None):
        self.path, self.dry = path, dry
        self.data: dict = {"status": "running", "reason": None, "figures": {}}
        self.save()

    def figure(self, **kw) -> None:
        self.data["figures"].update(kw)
        self.save()

    def plan(self, what: str) -> None:
        self.data["figures"].setdefault("plan", []).append(what)
        self.save()

    def verdict(self, ok: bool, reason: str | None = None) -> None:
        self.data.update(status="passed" if ok else "failed", reason=reason)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)


# -- helpers ---------------------------------------------------------------------------------


def spec_file(work: Path, name: str, *, model: str = "resnet18", **protocol) -> Path:
    """A FineTune spec on the shared dataset, validated by the real spec model."""
    from service.spec import parse_spec

    doc = {
        "kind": "FineTune",
        "name": name,
        "backbone": {"model": model, "weights": "none"},
        "dataset": {"uri": str(work / "data.npz"), "test_fraction": 0.1},
        "protocol": {
            "recipe": "standard",
            "image_size": 64,
            "batch_size": 128,
            "micro_batch": 128,
            "max_epochs": 3,
            "patience": 10,
            "warmup_epochs": 0,
            "device": "cuda",
            **protocol,
        },
        "output": {"uri": str(work / "runs" / name)},
        "metrics": {"port": 0},
    }
    parse_spec(doc)  # a bad spec fails here, in the dry run too
    path = work / f"{name}.spec.json"
    path.write_text(json.dumps(doc, indent=2))
    return path


def run_dir(spec_path: Path) -> Path:
    from service.spec import load_spec

    spec = load_spec(str(spec_path))
    return Path(spec.output.uri) / spec.run_id


def worker_cmd(spec: Path, *extra: str) -> list[str]:
    return [sys.executable, TOOLS, "worker", "--spec", str(spec), *extra]


def run(cmd: list[str], log: str, env: dict | None = None) -> int:
    print(f"$ {' '.join(cmd)}", flush=True)
    with open(log, "a") as out:
        return subprocess.run(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env
        ).returncode


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def epochs(run: Path) -> list[dict]:
    try:
        return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln]
    except OSError:
        return []


def steady_ips(run: Path) -> float | None:
    """The best per-epoch training images/s after the first epoch (warm-up, compile)."""
    rates = [e.get("images_per_second") for e in epochs(run)[1:]]
    rates = [r for r in rates if r]
    return max(rates) if rates else None


# -- stages ----------------------------------------------------------------------------------


REQUIRED = ("pydantic", "timm", "torchvision", "typer", "prometheus_client", "boto3", "numpy")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def stage_env(rec: Record, work: Path) -> None:
    import platform

    import torch

    cuda = torch.cuda.is_available()
    figures = {
        "cuda_available": cuda,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        figures.update(
            device=props.name,
            memory_bytes=props.total_memory,
            device_count=torch.cuda.device_count(),
        )
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        figures["driver"] = smi.stdout.strip() or None
    figures["missing_packages"] = [m for m in REQUIRED if not _importable(m)]
    rec.figure(**figures)
    missing = figures["missing_packages"]
    rec.verdict(not missing, f"missing: {', '.join(missing)} (carry wheels)" if missing else None)


def stage_dataset(rec: Record, work: Path) -> None:
    """4,096 textured 64 px images in 10 classes (a class tint over smooth noise), as .npz."""
    import numpy as np

    path = work / "data.npz"
    rec.plan(f"{path}: {N_IMAGES} images of {SOURCE_PX} px, {N_CLASSES} classes")
    if rec.dry:
        return
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    labels = np.arange(N_IMAGES) % N_CLASSES
    coarse = rng.random((N_IMAGES, 8, 8, 3), dtype=np.float32)
    smooth = coarse.repeat(SOURCE_PX // 8, axis=1).repeat(SOURCE_PX // 8, axis=2)
    tint = np.stack([(labels * k) % 255 for k in (37, 91, 53)], axis=1)[:, None, None, :]
    noise = rng.normal(0, 12, (N_IMAGES, SOURCE_PX, SOURCE_PX, 3))
    images = np.clip(0.6 * 255 * smooth + 0.4 * tint + noise, 0, 255).astype(np.uint8)
    np.savez(path, images=images, labels=labels)
    rec.figure(path=str(path), images=N_IMAGES, pixels=SOURCE_PX, seconds=time.perf_counter() - t0)
    rec.verdict(True)


def stage_cuda_tests(rec: Record, work: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "cuda",
        "-p",
        "no:cacheprovider",
        "--junitxml",
        str(work / "cuda_tests.xml"),
        "tests",
    ]
    rec.plan(" ".join(cmd))
    if rec.dry:
        return
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(proc.stdout[-5000:], proc.stderr[-2000:])
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    rec.figure(summary=last, exit_code=proc.returncode)
    rec.verdict(proc.returncode == 0, None if proc.returncode == 0 else last)


def stage_resume(rec: Record, work: Path) -> None:
    """A clean run beside one SIGTERMed at epoch 1 step 10 (a mid-epoch checkpoint), resumed,
    SIGKILLed at epoch 2 step 5, resumed to the end: the results must be equal, bit for bit
    (deterministic kernels, no cudnn autotuning, in both)."""
    ref = spec_file(work, "resume-ref")
    cut = spec_file(work, "resume-cut")
    log = str(work / "resume.runs.log")
    segments = [("--signal-at", "1:10:SIGTERM"), ("--signal-at", "2:5:SIGKILL"), ()]
    rec.plan(" ".join(worker_cmd(ref, "--deterministic")))
    for extra in segments:
        rec.plan(" ".join(worker_cmd(cut, "--deterministic", *extra)))
    if rec.dry:
        return
    codes = [run(worker_cmd(cut, "--deterministic", *segments[0]), log)]
    folder = run_dir(cut) / "checkpoints"
    rec.figure(checkpoints_after_sigterm=sorted(p.name for p in folder.glob("ckpt-*.pt")))
    with open(log, "a") as out:  # beside the rest: the decoded cache is written by now
        clean = subprocess.Popen(
            worker_cmd(ref, "--deterministic"), cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
    codes += [run(worker_cmd(cut, "--deterministic", *extra), log) for extra in segments[1:]]
    rec.figure(exit_codes=codes, clean_exit_code=clean.wait())
    a, b = read_json(run_dir(ref) / "summary.json"), read_json(run_dir(cut) / "summary.json")
    same = bool(a and b) and all(a.get(k) == b.get(k) for k in RESULT_KEYS)
    drop = ("images_per_second", "seconds", "epoch_seconds", "time", "eta_seconds")
    curves = [
        [{k: v for k, v in e.items() if k not in drop} for e in epochs(run_dir(s))]
        for s in (ref, cut)
    ]
    rec.figure(
        results_equal=same,
        per_epoch_metrics_equal=curves[0] == curves[1],
        test_top1=[(a.get("test") or {}).get("top1"), (b.get("test") or {}).get("top1")],
        attempts=b.get("attempts"),
    )
    ok = codes == [75, -9, 0] and same and curves[0] == curves[1]
    rec.verdict(ok, None if ok else f"exit codes {codes} (want [75, -9, 0]), results equal {same}")


def _fraction(limit: int) -> float:
    import torch

    return min(1.0, limit / torch.cuda.get_device_properties(0).total_memory)


def stage_oom(rec: Record, work: Path) -> None:
    """micro_batch 512 at 128 px under a 3 GiB cap: training runs out of memory and halves."""
    spec = spec_file(
        work, "oom", model="resnet50", image_size=128, batch_size=512, micro_batch=512, max_epochs=1
    )
    rec.plan(" ".join(worker_cmd(spec, "--memory-fraction", "<3 GiB / total>")))
    if rec.dry:
        return
    code = run(
        worker_cmd(spec, "--memory-fraction", str(_fraction(OOM_LIMIT_BYTES))),
        str(work / "oom.runs.log"),
    )
    s = read_json(run_dir(spec) / "summary.json")
    rems = s.get("remediations") or []
    rec.figure(
        exit_code=code,
        remediations=rems,
        micro_batch=s.get("micro_batch"),
        limit_bytes=OOM_LIMIT_BYTES,
        peak_memory_bytes=s.get("peak_memory_bytes"),
    )
    ok = code == 0 and len(rems) >= 1
    rec.verdict(ok, None if ok else f"exit {code}, {len(rems)} remediations (want 0, >= 1)")


def stage_probe_peak(rec: Record, work: Path) -> None:
    """micro_batch 'auto' under the same cap: the probe's first pass runs out of memory; the
    summary's peak must be training's, not that failed pass's (which reached the cap)."""
    spec = spec_file(
        work,
        "probe-peak",
        model="resnet50",
        image_size=128,
        batch_size=512,
        micro_batch="auto",
        max_epochs=1,
    )
    rec.plan(" ".join(worker_cmd(spec, "--memory-fraction", "<3 GiB / total>")))
    if rec.dry:
        return
    code = run(
        worker_cmd(spec, "--memory-fraction", str(_fraction(OOM_LIMIT_BYTES))),
        str(work / "probe_peak.runs.log"),
    )
    s = read_json(run_dir(spec) / "summary.json")
    probe = read_json(run_dir(spec) / "env.json").get("micro_batch") or {}
    peak = s.get("peak_memory_bytes") or 0
    failed = [k for k, v in (probe.get("tried") or {}).items() if v is False]
    rec.figure(
        exit_code=code,
        probe=probe,
        peak_memory_bytes=peak,
        limit_bytes=OOM_LIMIT_BYTES,
        peak_share_of_limit=round(peak / OOM_LIMIT_BYTES, 3),
    )
    ok = code == 0 and bool(failed) and peak <= 0.9 * OOM_LIMIT_BYTES
    rec.verdict(ok, None if ok else f"exit {code}, failed probe sizes {failed}, peak {peak}")


def stage_ddp(rec: Record, work: Path) -> None:
    """Plain DDP checks, then the real worker on 2 gloo ranks (micro-batches: no_sync), eager
    and compiled."""
    run_ = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = work / "ddp.plain.json"
    plain = [*run_, TOOLS, "ddp", "--result", str(out)]
    specs = {
        c: spec_file(work, f"ddp-{c}", micro_batch=32, max_epochs=2, compile=c == "compiled")
        for c in ("eager", "compiled")
    }
    rec.plan(" ".join(plain))
    for s in specs.values():
        rec.plan(" ".join([*run_, TOOLS, "worker", "--spec", str(s), "--one-gpu"]))
    if rec.dry:
        return
    log = str(work / "ddp.runs.log")
    env = {**os.environ, "BACKBONES_DIST_BACKEND": "gloo"}
    rec.figure(plain_exit_code=run(plain, log, env), plain=read_json(out))
    ok = all(
        read_json(out).get(k) is True
        for k in (
            "no_sync_grads_match_single_process",
            "grads_identical_across_ranks",
            "compiled_ddp_ranks_identical",
        )
    )
    for c, s in specs.items():
        code = run([*run_, TOOLS, "worker", "--spec", str(s), "--one-gpu"], log, env)
        d = run_dir(s)
        env_json = read_json(d / "env.json")
        rec.figure(
            **{
                f"worker_{c}": {
                    "exit_code": code,
                    "images_per_second": steady_ips(d),
                    "compile": env_json.get("compile"),
                    "world_size": env_json.get("world_size"),
                }
            }
        )
        ok = ok and code == 0
    rec.verdict(ok, None if ok else "see figures")


def _throughput(rec: Record, work: Path, compiled: bool) -> None:
    """resnet50 at 128 px, batch 256: the worker (recipe standard, then augmentation
    trivial_augment_wide) against the plain loop on the same GPU."""
    kind = "compiled" if compiled else "eager"
    common = dict(
        model="resnet50",
        image_size=128,
        batch_size=256,
        micro_batch=256,
        max_epochs=3,
        compile=compiled,
    )
    specs = {
        "standard": spec_file(work, f"tp-{kind}-standard", **common),
        "trivial_augment_wide": spec_file(
            work, f"tp-{kind}-taw", **common, augmentation="trivial_augment_wide"
        ),
    }
    synth = [
        sys.executable,
        TOOLS,
        "synthetic",
        "--model",
        "resnet50",
        "--size",
        "128",
        "--batch",
        "256",
    ] + (["--compile", "--warmup", "10"] if compiled else [])
    rec.plan(" ".join(synth))
    for s in specs.values():
        rec.plan(" ".join(worker_cmd(s)))
    if rec.dry:
        return
    proc = subprocess.run(synth, cwd=REPO, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    base = json.loads(lines[-1])["images_per_second"] if proc.returncode == 0 and lines else None
    rec.figure(synthetic_images_per_second=base)
    ok = base is not None
    for name, s in specs.items():
        code = run(worker_cmd(s), str(work / f"throughput_{kind}.runs.log"))
        ips = steady_ips(run_dir(s))
        share = round(ips / base, 3) if ips and base else None
        rec.figure(
            **{name: {"exit_code": code, "images_per_second": ips, "share_of_synthetic": share}}
        )
        ok = ok and code == 0 and ips is not None
    rec.verdict(ok, None if ok else "a run failed: see figures and the log")


STAGES = {
    "env": stage_env,
    "dataset": stage_dataset,
    "cuda_tests": stage_cuda_tests,
    "resume": stage_resume,
    "oom": stage_oom,
    "probe_peak": stage_probe_peak,
    "ddp": stage_ddp,
    "throughput_eager": lambda rec, work: _throughput(rec, work, compiled=False),
    "throughput_compiled": lambda rec, work: _throughput(rec, work, compiled=True),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=list(STAGES))
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--result", type=Path, required=True)
    ap.add_argument("--dry-run", default=None, metavar="REASON", help="plan only, say why")
    args = ap.parse_args()
    rec = Record(args.result, args.dry_run)
    STAGES[args.stage](rec, args.work)
    if args.dry_run:
        rec.data.update(status="skipped", reason=args.dry_run)
        rec.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
