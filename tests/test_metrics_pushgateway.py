"""Pushes to a real Pushgateway: when they happen, and how stale groups are cleaned."""

from __future__ import annotations

import re
import time

import pytest

from service.outputs.events import Progress
from service.run.metrics import PrometheusObserver, prune_pushgateway, pushed_runs
from service.spec import parse_spec
from tests.specs import finetune

pytestmark = pytest.mark.integration


def pushing(name: str, pushgateway_url: str, study: str | None = None):
    metrics = {"port": 0, "pushgateway_url": pushgateway_url}
    return parse_spec(finetune(name=name, study=study, metrics=metrics))


def pushed_value(pushgateway, name: str, run: str, **labels: str) -> float | None:
    wanted = [f'run="{run}"', *(f'{k}="{v}"' for k, v in labels.items())]
    for line in pushgateway.metrics().splitlines():
        if line.startswith(name + "{") and all(w in line for w in wanted):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
def clean(pushgateway):
    yield pushgateway
    prune_pushgateway(pushgateway.url, max_age_seconds=-1)


def observer_for(spec):
    return PrometheusObserver(spec, port=0, pushgateway_url=spec.metrics.pushgateway_url)


def test_a_phase_change_pushes_and_a_step_does_not(clean):
    spec = pushing("steps", clean.url)
    o = observer_for(spec)
    p = Progress(run_id=spec.run_id, phase="Training")
    o.on_phase(p)
    p.progress = 0.5
    o.on_step(p, seconds=0.1, wait_seconds=0.0, images=8)
    assert pushed_value(clean, "backbones_run_phase", spec.run_id, phase="Training") == 1
    assert pushed_value(clean, "backbones_progress_ratio", spec.run_id) == 0


def test_the_end_pushes_the_final_state_and_success_time(clean):
    spec = pushing("ends", clean.url)
    o = observer_for(spec)
    p = Progress(run_id=spec.run_id, phase="Training")
    o.on_phase(p)
    p.phase, p.progress = "Succeeded", 1.0
    before = time.time()
    o.on_end(p, {})
    assert pushed_value(clean, "backbones_progress_ratio", spec.run_id) == 1
    assert pushed_value(clean, "backbones_run_phase", spec.run_id, phase="Succeeded") == 1
    assert pushed_value(clean, "backbones_run_last_success_timestamp_seconds", spec.run_id) >= (
        before
    )


def test_a_study_run_id_with_slashes_is_one_group(clean):
    spec = pushing("cell", clean.url, study="s2")
    observer_for(spec).on_phase(Progress(run_id=spec.run_id))
    assert list(pushed_runs(clean.url)) == ["s2/digits/test_resnet/seed0-frac1.0"]


def test_pushed_runs_lists_each_group_with_its_push_time(clean):
    before = time.time()
    for name in ("one", "two"):
        observer_for(pushing(name, clean.url)).on_phase(Progress(run_id=name))
    runs = pushed_runs(clean.url)
    assert sorted(runs) == ["one", "two"]
    assert all(before - 1 <= t <= time.time() + 1 for t in runs.values())


def test_prune_deletes_only_groups_older_than_the_grace_period(clean):
    observer_for(pushing("old", clean.url)).on_phase(Progress(run_id="old"))
    assert prune_pushgateway(clean.url, max_age_seconds=3600) == []
    later = time.time() + 7200
    assert prune_pushgateway(clean.url, max_age_seconds=3600, now=later) == ["old"]
    assert pushed_runs(clean.url) == {}
    assert not re.search(r'run="old"', clean.metrics())
