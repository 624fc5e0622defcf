"""Cells packed per pod (``resources.cells_per_pod``): which cells share an Indexed Job index,
and the worker that runs them one after another in one process.

The end-to-end tests run ``python -m service.run.worker`` in fresh subprocesses with
``JOB_COMPLETION_INDEX`` set, as the pod's container does, each with an empty cache of its own
(the pod's emptyDir); the dataset is a local one, so the fetch the pod makes from S3 is not
modelled here (benchmarks/study_cost.py runs packs against SeaweedFS).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from service.cost.packs import auto_size, packs
from service.errors import EXIT_CRASH, EXIT_OK, EXIT_RETRY, EXIT_USER
from service.k8s.render import render_job
from service.run.pack import pack_exit
from service.spec import parse_spec
from service.spec.study import expand
from tests.specs import tiny_study, write_spec
from tests.trainutil import REPO, worker_env


def _study(tmp_path, k, **over):
    return tiny_study(tmp_path, {"resources": {"cells_per_pod": k}}, over)


def test_packs_hold_one_dataset_each_in_expansion_order(tmp_path):
    doc = _study(
        tmp_path,
        2,
        datasets=[{"uri": "builtin://digits"}, {"uri": "builtin://digits", "name": "d2"}],
        seeds=[0, 1, 2],
    )
    study = parse_spec(doc)
    assert packs(study) == [[0, 1], [2], [3, 4], [5]]
    cells = expand(study)
    assert all(len({cells[i].dataset.name for i in p}) == 1 for p in packs(study))


def test_one_cell_per_pod_is_the_default_and_leaves_the_spec_json_as_it_was(tmp_path):
    one = parse_spec(tiny_study(tmp_path))
    assert one.resources.cells_per_pod == 1
    assert "cells_per_pod" not in one.to_json()
    assert packs(one) == [[0], [1]]
    packed = parse_spec(_study(tmp_path, 2))
    assert json.loads(packed.to_json())["resources"]["cells_per_pod"] == 2
    # Packing is how, not what: the same hash, and the same cells.
    assert packed.spec_hash == one.spec_hash
    assert [c.to_json() for c in expand(packed)] == [c.to_json() for c in expand(one)]


@pytest.mark.parametrize("bad", [0, -1, "two", True])
def test_cells_per_pod_must_be_a_positive_integer_or_auto(tmp_path, bad):
    from service.spec import SpecError

    with pytest.raises(SpecError, match="cells_per_pod"):
        parse_spec(_study(tmp_path, bad))


def test_auto_packs_until_training_outweighs_the_pod_overhead():
    assert auto_size(10_000.0) == 1  # a long cell has its own pod
    assert auto_size(300.0) == 9  # 9 x 300 s of training per 300 s of overhead
    assert auto_size(1.0) == 16  # capped: a preempted pod redoes little


def test_the_render_has_one_completion_per_pack_and_names_the_packs(tmp_path):
    job = render_job(parse_spec(_study(tmp_path, 2, seeds=[0, 1, 2])))
    assert job["spec"]["completions"] == 2
    assert job["spec"]["parallelism"] == 2
    assert job["metadata"]["annotations"]["backbones.dev/packs"] == "0-1,2"
    plain = render_job(parse_spec(tiny_study(tmp_path)))
    assert "backbones.dev/packs" not in plain["metadata"]["annotations"]


def test_the_pack_exit_code_keeps_what_a_retry_can_still_finish():
    assert pack_exit([EXIT_OK, EXIT_OK]) == EXIT_OK
    assert pack_exit([EXIT_USER, EXIT_OK]) == EXIT_USER  # fail the index: nothing left to do
    assert pack_exit([EXIT_USER, EXIT_RETRY]) == EXIT_RETRY  # the retriable cell gets retried
    assert pack_exit([EXIT_RETRY, EXIT_CRASH, EXIT_USER]) == EXIT_CRASH  # counted: bounded


def _worker(tmp_path, doc, index, cache, **kw):
    path = write_spec(tmp_path, doc, f"{doc['name']}.json")
    env = {**worker_env(tmp_path, cache), "JOB_COMPLETION_INDEX": str(index)}
    return subprocess.Popen(
        [sys.executable, "-m", "service.run.worker", "--spec", str(path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _finish(p, timeout=600):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def _summary(runs, run_id):
    path = runs / run_id / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_a_packed_index_runs_its_cells_in_one_process_decoding_once(tmp_path):
    doc = _study(tmp_path, 3, seeds=[0, 1, 2])
    rc, out, err = _finish(_worker(tmp_path, doc, 0, tmp_path / "cache"))
    assert rc == 0, err[-3000:]
    ids = [c.run_id for c in expand(parse_spec(doc))]
    assert all(_summary(tmp_path / "runs", i) for i in ids)
    assert [line.split(":")[0] for line in out.splitlines() if "done, test top-1" in line] == ids
    # One process, one empty cache: the first cell decodes, the others find it decoded.
    assert err.count("decode done") == 1, err[-3000:]
    assert err.count("decode cached") == 2, err[-3000:]


def test_a_packed_index_with_a_bad_cell_runs_the_others_and_fails_the_index(tmp_path):
    weights = tmp_path / "bad.safetensors"
    weights.write_bytes(b"not a safetensors file")
    backbones = [
        {"model": "test_efficientnet", "weights": str(weights)},
        {"model": "test_resnet", "weights": "none"},
    ]
    doc = _study(tmp_path, 2, backbones=backbones, seeds=[0])
    rc, _, err = _finish(_worker(tmp_path, doc, 0, tmp_path / "cache"))
    bad, good = expand(parse_spec(doc))
    assert rc == EXIT_USER, err[-3000:]  # every other cell is done: FailIndex, no retry
    assert f"error: {bad.run_id}: backbone.weights: {weights}" in err
    assert "Traceback" not in err
    assert _summary(tmp_path / "runs", bad.run_id) is None
    assert _summary(tmp_path / "runs", good.run_id) is not None
    status = json.loads((tmp_path / "runs" / bad.run_id / "status.json").read_text())
    assert status["phase"] == "Failed"


def _metrics(runs, run_id):
    lines = (runs / run_id / "metrics.jsonl").read_text().splitlines()
    keep = ("epoch", "train_loss", "val_top1", "val_loss")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, lines)]


def test_a_pack_killed_in_its_second_cell_resumes_there_and_equals_an_unpacked_run(tmp_path):
    """SIGKILL (no checkpoint on the way out) once the second cell has saved its first epoch;
    the rerun skips the first cell and resumes the second from that checkpoint."""
    over = {"protocol": {"image_size": 16, "max_epochs": 3, "device": "cpu"}}
    packed = _study(tmp_path / "p", 2, **over)
    ids = [c.run_id for c in expand(parse_spec(packed))]
    runs = tmp_path / "p" / "runs"
    p = _worker(tmp_path, packed, 0, tmp_path / "c1", start_new_session=True)
    deadline = time.monotonic() + 600
    second = runs / ids[1]

    def one_epoch_saved() -> bool:
        metrics = second / "metrics.jsonl"
        saved = list((second / "checkpoints").glob("ckpt-*.pt"))
        return bool(saved) and metrics.exists() and metrics.read_text().strip() != ""

    while not one_epoch_saved() and p.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1][-3000:]
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    assert _summary(runs, ids[0]) is not None and _summary(runs, ids[1]) is None
    rc, out, err = _finish(_worker(tmp_path, packed, 0, tmp_path / "c2"))
    assert rc == 0, err[-3000:]
    assert f"{ids[0]}: already complete" in out
    assert f"{ids[1]}: Training (resumed after epoch " in out, out[-3000:]
    assert f"{ids[1]}: done" in out
    plain = tiny_study(tmp_path / "u", over)
    for i in range(2):
        rc, _, err = _finish(_worker(tmp_path, plain, i, tmp_path / f"u{i}"))
        assert rc == 0, err[-3000:]
    for run_id in ids:
        assert _metrics(runs, run_id) == _metrics(tmp_path / "u" / "runs", run_id)
        a, b = _summary(runs, run_id), _summary(tmp_path / "u" / "runs", run_id)
        assert a["test"] == b["test"]


def test_status_shows_each_cell_on_the_index_that_runs_it(tmp_path):
    """A Job as the API returns it (no pods): index 0 failed for good because one of its two
    cells had bad data, index 1 completed; status.json says which cell."""
    import datetime as dt

    from service.k8s.status import job_rows

    study = parse_spec(_study(tmp_path, 2, seeds=[0, 1, 2]))
    job = render_job(study)
    job["metadata"]["creationTimestamp"] = "2026-11-27T10:00:00Z"
    job["status"] = {"completedIndexes": "1", "failedIndexes": "0", "failed": 1}
    ids = [c.run_id for c in expand(study)]
    phases = {ids[0]: "Failed"}

    def read_status(spec, cell):
        return {"phase": phases.get(cell.run_id, "Succeeded")}

    now = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
    rows = job_rows(job, [], read_status, now)
    assert [(r.run, r.index, r.phase) for r in rows] == [
        (ids[0], 0, "Failed"),
        (ids[1], 0, "Succeeded"),  # its index failed for its neighbour's bad data
        (ids[2], 1, "Succeeded"),
    ]


def test_a_search_rung_job_packs_its_cells_too(tmp_path):
    from service.k8s.search_jobs import render_rung
    from service.run.pack import pack_of
    from service.search.plan import rung_cells
    from tests.test_search_driver import search_doc

    s = parse_spec(search_doc(tmp_path, "continue", resources={"cells_per_pod": 3}))
    cands = {"digits/frac1.0": ["m1", "m4"]}
    job = render_rung(s, 1, cands, 6, image="ghcr.io/backbones/backbones:1.0.0")
    cells = rung_cells(s, 1, cands, 6)
    assert len(cells) == 4
    assert job["spec"]["completions"] == 2 and job["spec"]["parallelism"] == 2
    assert job["metadata"]["annotations"]["backbones.dev/packs"] == "0-2,3"
    env = {
        e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    picked = [
        pack_of(s, {"BACKBONES_RUNG": env["BACKBONES_RUNG"], "JOB_COMPLETION_INDEX": str(i)})
        for i in range(2)
    ]
    assert picked == [cells[:3], cells[3:]]
