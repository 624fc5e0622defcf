"""A search with a proxy on a dataset in a real S3 store (SeaweedFS), in a fresh process.

Today's main stopped at once: the proxy called ``prepare()`` on the ``s3://`` URI without
fetching it (exit 2, "must be fetched to local disk"). The proxy now fetches through the path
training uses, into the same cache, and normalises each split as training does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service.data.push import push
from service.spec import Storage
from tests.data_factory import digits_tree
from tests.specs import tiny_study, write_spec
from tests.trainutil import REPO, worker_env

pytestmark = pytest.mark.integration


def test_a_proxy_search_on_an_s3_dataset_runs_end_to_end(s3_env, tmp_path):
    """`backbones run` (the driver's local path, a fresh process) on a packed dataset pushed to
    SeaweedFS: the proxy scores every candidate, the rungs train, one winner; the dataset is
    fetched once into the cache the training cells read."""
    bucket = s3_env.make_bucket()
    dataset = f"s3://{bucket}/datasets/digits/"
    src = digits_tree(tmp_path / "digits", n=120, size=16)
    push(src, dataset, Storage(endpoint_url=s3_env.endpoint), test_fraction=0.2, val_fraction=0.2)
    doc = tiny_study(
        tmp_path,
        name="s3pick",
        backbones=[
            {"model": m, "weights": "none"}
            for m in ("test_resnet", "test_efficientnet", "test_convnext")
        ],
        datasets=[{"uri": dataset}],
        seeds=[0],
        protocol={"max_epochs": 2, "warmup_epochs": 0, "image_size": 32},
        storage={"endpoint_url": s3_env.endpoint},
        search={"strategy": "successive_halving", "eta": 2, "proxy": {"keep": 2, "k": 3}},
    )
    spec = write_spec(tmp_path, doc, "study.json")
    done = subprocess.run(
        [sys.executable, "-c", "from service.cli import main; main()", "run", str(spec)],
        cwd=REPO,
        env=worker_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    state = json.loads((tmp_path / "runs/s3pick/_search/state.json").read_text())
    (group,) = state["proxy"]
    scores = state["proxy"][group]["scores"]
    assert set(scores) == {"test_resnet", "test_efficientnet", "test_convnext"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert state["phase"] == "done" and state["winners"][group] in scores
    # One cache: the proxy's fetch is the one the training cells found (a single copy).
    fetched = [p for p in (tmp_path / "cache").rglob("manifest.json")]
    assert len(fetched) == 1, fetched


@pytest.mark.parametrize("normalize", ["none", "split"])
def test_the_proxy_normalises_each_split_as_training_does(tmp_path, monkeypatch, normalize):
    """The statistics the proxy hands its loaders are exactly ``split_stats``'s for the
    protocol's ``normalize`` (today's main used the dataset's statistics for every choice but
    'pretrained')."""
    from service.data.normalise import split_stats
    from service.search import proxy
    from service.search.plan import groups
    from service.spec import parse_spec

    doc = tiny_study(
        tmp_path,
        name="norm",
        backbones=[{"model": m, "weights": "none"} for m in ("test_resnet", "test_efficientnet")],
        seeds=[0],
        protocol={"normalize": normalize},
        search={"strategy": "successive_halving", "eta": 2, "proxy": {"keep": 1}},
    )
    study = parse_spec(doc)
    seen = []
    real = proxy.features

    def spy(model, split, batch_size, mean, std):
        seen.append((split, tuple(mean), tuple(std)))
        return real(model, split, batch_size, mean, std)

    captured = {}
    real_stats = split_stats

    def stats_spy(how, data, built):
        captured["stats"] = real_stats(how, data, built)
        captured["data"] = data
        return captured["stats"]

    monkeypatch.setattr(proxy, "features", spy)
    monkeypatch.setattr("service.data.normalise.split_stats", stats_spy)
    (group,) = groups(study)
    proxy.proxy_scores(study, group, cache_dir=tmp_path / "cache")
    stats, data = captured["stats"], captured["data"]
    want = {id(data.train): stats["train"], id(data.val): stats["val"]}
    assert seen and all((m, s) == tuple(map(tuple, want[id(split)])) for split, m, s in seen)
    if normalize != "split":
        assert stats["train"] != (data.mean, data.std)


def test_a_candidate_that_cannot_run_at_the_size_fails_alone_in_the_proxy(tmp_path):
    """test_convnext cannot take 16 px: no score (ranked last), the others are scored."""
    from service.search import proxy
    from service.search.plan import groups
    from service.spec import parse_spec

    doc = tiny_study(
        tmp_path,
        name="px",
        backbones=[{"model": m, "weights": "none"} for m in ("test_convnext", "test_resnet")],
        seeds=[0],
        search={"strategy": "successive_halving", "eta": 2, "proxy": {"keep": 1}},
    )
    study = parse_spec(doc)
    (group,) = groups(study)
    scores = proxy.proxy_scores(study, group, cache_dir=tmp_path / "cache")
    assert scores["test_convnext"] is None and 0 <= scores["test_resnet"] <= 1
