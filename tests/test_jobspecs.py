"""Every example in jobspecs/ is valid and points its editor at the JSON Schema."""

import json
from pathlib import Path

import pytest

from service.backbones.checks import check_models
from service.spec import FineTune, Study, load_spec

JOBSPECS = Path(__file__).resolve().parent.parent / "jobspecs"
FILES = sorted(JOBSPECS.glob("*.json"))
SCHEMA = {"FineTune": "./schema/finetune.schema.json", "Study": "./schema/study.schema.json"}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_example_spec_is_valid(path):
    spec = load_spec(path)
    assert check_models(spec) == []


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_example_spec_carries_the_schema_of_its_kind(path):
    doc = json.loads(path.read_text())
    assert doc["$schema"] == SCHEMA[doc["kind"]]
    assert (JOBSPECS / doc["$schema"]).is_file()


def test_the_examples_the_issue_asks_for_exist():
    assert {"quickstart.json", "paper-study.json", "eurosat-convnext.json"} <= {
        p.name for p in FILES
    }
    assert "medical-lowdata.json" in {p.name for p in FILES}


def test_quickstart_runs_offline_on_a_cpu():
    spec = load_spec(JOBSPECS / "quickstart.json")
    assert isinstance(spec, FineTune)
    assert spec.dataset.uri == "builtin://digits" and spec.backbone.weights == "none"
    assert spec.backbone.model.startswith("test_") and spec.output.uri == "./runs"
    assert spec.resources.gpus == 0 and spec.protocol.device == "cpu"


def test_paper_study_is_the_papers_available_backbones_on_its_datasets_from_s3():
    from service.backbones import catalog

    spec = load_spec(JOBSPECS / "paper-study.json")
    assert isinstance(spec, Study) and spec.protocol.recipe == "paper"
    paper = [e.name for e in catalog.entries() if e.paper and e.available]
    assert [b.model for b in spec.backbones] == paper
    assert all(d.uri.startswith("s3://") for d in spec.datasets)
    domains = {d.domain for d in spec.datasets}
    assert domains == {"natural", "texture", "remote_sensing", "plant", "astronomy", "medical"}
    assert spec.seeds == [0, 1, 2]
    assert spec.resources.gpus == 1 and spec.output.uri.startswith("s3://")
    assert spec.storage.endpoint_url and spec.storage.credentials_secret
    galaxy = next(d for d in spec.datasets if d.domain == "astronomy")
    assert galaxy.uri.endswith(".h5") and galaxy.labels_key == "ans"


def test_eurosat_example_fine_tunes_convnext_on_one_gpu_with_weights_from_s3():
    spec = load_spec(JOBSPECS / "eurosat-convnext.json")
    assert spec.backbone.model == "convnext_tiny" and spec.resources.gpus == 1
    assert spec.backbone.weights.startswith("s3://") and spec.protocol.recipe == "standard"


def test_medical_example_is_low_data_under_the_paper_recipe():
    spec = load_spec(JOBSPECS / "medical-lowdata.json")
    assert spec.dataset.domain == "medical" and spec.dataset.train_fraction == 0.1
    assert spec.protocol.recipe == "paper"
