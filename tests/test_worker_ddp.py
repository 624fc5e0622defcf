"""resources.gpus > 1: the worker under torchrun, one process per device, DDP (gloo on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.specs import tiny_spec, write_spec
from tests.trainutil import REPO, run_dir, summary, worker_env


def test_two_ranks_train_one_run_and_only_rank_0_writes(tmp_path):
    spec = tiny_spec(tmp_path, name="ddp", max_epochs=2)
    path = write_spec(tmp_path, spec)
    r = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "service.run.worker", "--spec", str(path),
        ],
        cwd=REPO,
        env=worker_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    s = summary(spec)
    assert s["test"]["top1"] > 0.3  # chance is 0.1; one process reaches ~0.46 here too
    env = json.loads((run_dir(spec) / "env.json").read_text())
    assert env["world_size"] == 2
    lines = (run_dir(spec) / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one writer
    status = json.loads((run_dir(spec) / "status.json").read_text())
    # The spec's batch is the global batch: steps per epoch as for one process.
    assert status["steps_per_epoch"] == s["n_train"] // 64
    assert r.stdout.count("ddp: done, test top-1") == 2  # both ranks finished the same run
