"""The GPU check: every claim the CPU tests make by stand-in, run for real on one GPU, in a
budget (default 360 s: 6 minutes on one H100), with one JSON of results written as it goes.

    OUT=/some/dir bash benchmarks/gpu_check.sh          # on a GPU (the device tool sets OUT)
    bash benchmarks/gpu_check.sh --out /tmp/x --dry-run  # anywhere: plans every stage, runs none

Each stage (``STAGES``, in priority order) runs in its own process group under its own timeout
(cut to what is left of the budget); it records its figures in its own file as it goes, and the
driver merges them into ``<out>/gpu_check.json`` after every stage, so a timeout or a crash
keeps what was measured. Without CUDA (or with ``--dry-run``) every stage still runs, in plan
mode: it builds and validates its specs and commands and is recorded as skipped, with the
reason. One generated dataset (``dataset``) and one decoded cache serve every stage.
docs/gpu.md, "The GPU check", says what each figure means.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULT = "gpu_check.json"
SCHEMA = 1
# Seconds kept back from the budget for the driver itself (the last merge, process exits).
RESERVE_S = 5


@dataclass(frozen=True)
class Stage:
    name: str
    timeout_s: int
    what: str  # one line: what the stage shows


STAGES = (
    Stage("env", 30, "GPU, driver, torch and CUDA versions"),
    Stage("dataset", 30, "one generated .npz dataset, decoded once into the shared cache"),
    Stage("cuda_tests", 60, "the tests that skip without CUDA (pytest -m cuda)"),
    Stage("resume", 90, "SIGTERM and SIGKILL mid-epoch, resumed: metrics equal to a clean run"),
    Stage("oom", 45, "an out-of-memory error in training (memory fraction) remediated"),
    Stage("probe_peak", 45, "peak_memory_bytes after a probe that ran out of memory"),
    Stage("throughput_eager", 90, "the worker's images/s vs the plain-loop synthetic arm"),
    Stage("ddp", 120, "2 gloo ranks on one GPU: DDP, no_sync, compiled DDP; the real worker"),
    Stage("throughput_compiled", 150, "the same with torch.compile"),
)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class Report:
    """``<out>/gpu_check.json``, rewritten atomically after every change."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool):
        self.path = out / RESULT
        self.t0 = time.monotonic()
        self.data: dict = {
            "schema": SCHEMA,
            "started_at": _now(),
            "updated_at": _now(),
            "finished": False,
            "budget_s": budget_s,
            "elapsed_s": 0.0,
            "dry_run": dry_run,
            "stages": {
                s.name: {"status": "pending", "what": s.what, "timeout_s": s.timeout_s}
                for s in STAGES
            },
        }
        self.write()

    def stage(self, name: str, **fields) -> None:
        self.data["stages"][name].update(fields)
        self.write()

    def write(self) -> None:
        self.data["updated_at"] = _now()
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, self.path)


def run_stage(cmd: list[str], timeout_s: float, result: Path, log: Path, env: dict) -> dict:
    """Run one stage's process group under a timeout; return its record (status, reason,
    figures, seconds): what the stage wrote to ``result``, whatever became of the process."""
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and every process it started
            proc.wait()
            rc, timed_out = None, True
    rec = _read(result)
    rec["seconds"] = round(time.monotonic() - t0, 1)
    rec["log"] = str(log)
    if timed_out:
        rec["status"] = "timeout"
        rec["reason"] = f"still running after {timeout_s:.0f} s (figures so far are kept)"
    elif rc != 0 and rec.get("status") in (None, "running", "passed"):
        rec["status"] = "error"
        rec["reason"] = f"exit {rc}: {_tail(log, 1) or 'no output'}"
    elif rec.get("status") in (None, "running"):
        rec["status"] = "error"
        rec["reason"] = "the stage recorded no verdict"
    if rec["status"] not in ("passed", "skipped"):
        rec["tail"] = _tail(log, 15)
    return rec


def _read(path: Path) -> dict:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _tail(log: Path, n: int) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT)")
    ap.add_argument(
        "--work", type=Path, default=None, help="dataset, cache, runs, logs (default: a temp dir)"
    )
    ap.add_argument("--dry-run", action="store_true", help="plan every stage, run none")
    ap.add_argument("--budget-s", type=float, default=360.0, help="the whole check's seconds")
    ap.add_argument("--only", nargs="+", choices=[s.name for s in STAGES], help="these stages")
    args = ap.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or "gpu-check-out")
    out.mkdir(parents=True, exist_ok=True)
    # The dataset, its cache, the runs and the logs, shared by every stage: outside $OUT, which
    # should bring back the one JSON (the device tool returns at most 8 files from it).
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report = Report(out, args.budget_s, args.dry_run)
    report.data["work"] = str(work)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    env["BACKBONES_CACHE"] = str(work / "cache")
    dry_reason = "dry run" if args.dry_run else None
    for stage in STAGES:
        if args.only and stage.name not in args.only and stage.name != "env":
            report.stage(stage.name, status="skipped", reason="not in --only")
            continue
        left = args.budget_s - RESERVE_S - (time.monotonic() - report.t0)
        if left < 5:
            report.stage(stage.name, status="skipped", reason="the check's budget is spent")
            continue
        result = work / f"{stage.name}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, str(HERE / "gpu_check_stages.py"), stage.name]
        cmd += ["--work", str(work), "--result", str(result)]
        if dry_reason and stage.name != "env":
            cmd += ["--dry-run", dry_reason]
        report.stage(stage.name, status="running", started_at=_now())
        rec = run_stage(cmd, min(stage.timeout_s, left), result, work / f"{stage.name}.log", env)
        report.stage(stage.name, **rec)
        if stage.name == "env" and not dry_reason:
            cuda = rec.get("figures", {}).get("cuda_available")
            dry_reason = None if cuda else "no CUDA"
            report.data["dry_run"] = dry_reason is not None
    report.data["finished"] = True
    report.write()
    bad = [n for n, s in report.data["stages"].items() if s["status"] not in ("passed", "skipped")]
    print(
        f"{report.path}: "
        + ", ".join(f"{n} {s['status']}" for n, s in report.data["stages"].items())
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
