"""The one way the tests build a spec: a FineTune or Study document with keyword overrides.

``finetune(...)`` and ``study(...)`` return the plain dict a user writes; ``parse_spec`` turns it
into the model and ``write_spec`` into a file. Overrides lie over the defaults in order: dicts
merge key by key, anything else (a list too) replaces, and ``DELETE`` removes the key::

    finetune(ON_S3, name="q", resources={"gpus": 2}, metrics=DELETE)

``tiny_spec`` / ``tiny_study`` are runs that really train, in seconds on two cores; ``spec_for``
is a spec around a dataset, for the data tests.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from service.spec import FineTune, parse_spec

__all__ = [
    "DELETE",
    "ON_S3",
    "PAPER_OPTIONS",
    "STUDY_ON_S3",
    "TINY_PROTOCOL",
    "cluster_finetune",
    "cluster_study",
    "finetune",
    "merge",
    "spec_for",
    "study",
    "tiny_doc",
    "tiny_spec",
    "tiny_study",
    "write_spec",
]

DELETE = object()  # an override that removes the key

# test_resnet without weights on scikit-learn's digits: builds in milliseconds, offline.
FINETUNE = {
    "kind": "FineTune",
    "name": "tiny",
    "backbone": {"model": "test_resnet", "weights": "none"},
    "dataset": {"uri": "builtin://digits"},
}
STUDY = {
    "kind": "Study",
    "name": "grid",
    "backbones": [{"model": "test_resnet", "weights": "none"}],
    "datasets": [{"uri": "builtin://digits"}],
}
# A run as a cluster sees it: a real backbone, its data and outputs on S3.
ON_S3 = {
    "backbone": {"model": "resnet50"},
    "dataset": {"uri": "s3://data/eurosat/"},
    "output": {"uri": "s3://runs/"},
}
STUDY_ON_S3 = {
    "backbones": [{"model": "resnet50", "weights": "none"}],
    "datasets": [{"uri": "s3://data/eurosat/"}],
    "output": {"uri": "s3://runs/"},
}
# What trains in ~0.3 s an epoch at 16 px on one CPU thread.
TINY_PROTOCOL = {
    "recipe": "standard",
    "image_size": 16,
    "batch_size": 64,
    "max_epochs": 2,
    "warmup_epochs": 0,
    "device": "cpu",
}
# The paper's training options (its recipe, TrivialAugmentWide, per-split statistics), patience 1.
PAPER_OPTIONS = {
    "recipe": "paper",
    "patience": 1,
    "augmentation": "trivial_augment_wide",
    "normalize": "split",
}


def merge(base: dict, *layers: dict) -> dict:
    """A deep copy of ``base`` with each layer laid over it (dicts merge, ``DELETE`` removes)."""
    out = copy.deepcopy(base)
    for layer in layers:
        for key, value in layer.items():
            if value is DELETE:
                out.pop(key, None)
            elif isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def finetune(*layers: dict, **over) -> dict:
    """A FineTune document: test_resnet on builtin digits, then ``layers``, then ``over``."""
    return merge(FINETUNE, *layers, over)


def study(*layers: dict, **over) -> dict:
    """A Study document: test_resnet × builtin digits, then ``layers``, then ``over``."""
    return merge(STUDY, *layers, over)


def cluster_finetune(*layers: dict, **over) -> dict:
    """The Job the k8s tests submit: ``q``, resnet50 on S3 data, under a ServiceAccount."""
    base = finetune(ON_S3, name="q", resources={"service_account": "backbones-worker"})
    return merge(base, *layers, over)


def cluster_study(*layers: dict, **over) -> dict:
    """The Study the k8s tests submit: ``rs``, resnet50 on S3 data, four seeds (four cells)."""
    return study(STUDY_ON_S3, {"name": "rs", "seeds": [0, 1, 2, 3]}, *layers, over)


def write_spec(folder: Path, spec, fname: str | None = None) -> Path:
    """``spec`` (a document or a model) as ``folder/<fname>``, by default ``<name>.json``."""
    text = json.dumps(spec) if isinstance(spec, dict) else spec.to_json()
    name = spec["name"] if isinstance(spec, dict) else spec.name
    path = Path(folder) / (fname or f"{name}.json")
    path.write_text(text)
    return path


def tiny_spec(tmp_path: Path, name: str = "tiny", *layers: dict, **protocol) -> FineTune:
    """test_resnet on builtin digits at 16 px, batch 64, 2 epochs on the CPU, output under
    ``tmp_path/runs``: ~0.3 s an epoch here. ``layers`` override the document, keywords the
    protocol."""
    return parse_spec(tiny_doc(tmp_path, name, *layers, **protocol))


def tiny_doc(tmp_path: Path, name: str = "tiny", *layers: dict, **protocol) -> dict:
    """The document of ``tiny_spec``."""
    base = finetune(
        name=name,
        dataset={"test_fraction": 0.2},
        protocol=TINY_PROTOCOL,
        output={"uri": str(tmp_path / "runs")},
        metrics={"port": 0},
    )
    return merge(base, *layers, {"protocol": protocol})


def tiny_study(tmp_path: Path, *layers: dict, **over) -> dict:
    """A two-cell Study document (test_resnet × digits × seeds 0 and 1, one epoch)."""
    base = study(
        datasets=[{"uri": "builtin://digits", "test_fraction": 0.2}],
        seeds=[0, 1],
        protocol={"image_size": 16, "max_epochs": 1, "device": "cpu"},
        output={"uri": str(tmp_path / "runs")},
        metrics={"port": 0},
    )
    return merge(base, *layers, over)


def spec_for(uri, **dataset) -> FineTune:
    """A spec that reads ``uri`` (plus the ``dataset`` fields; ``protocol=`` for the protocol)
    at 16 px, batch 8: what the data tests hand to ``prepare``."""
    protocol = dataset.pop("protocol", {})
    return parse_spec(
        finetune(
            name="t",
            dataset={"uri": str(uri), **dataset},
            protocol={"image_size": 16, "batch_size": 8, **protocol},
        )
    )
