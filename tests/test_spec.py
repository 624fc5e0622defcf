"""The job spec, table-driven: each case patches a valid spec and expects one exact error line.

A line is ``<field path>: <message>``, the text `backbones validate` prints after the file name.
"""

import copy
import json

import pytest

from service.spec import FineTune, SpecError, Study, loads_spec, parse_spec
from service.spec.study import cell_name, cells_of, expand

DELETE = object()
CREDS = (
    "literal credentials are not allowed in a spec; put them in a Kubernetes Secret and name "
    "it in storage.credentials_secret"
)
DNS = (
    "must be a DNS-1123 label (lowercase letters, digits and '-', starting and ending with a "
    "letter or digit), got "
)
WEIGHTS = "must be 'none', 'timm', or a path or s3:// URI of a .safetensors file, got "

FINETUNE = {
    "apiVersion": "backbones/v1",
    "kind": "FineTune",
    "name": "eurosat-convnext",
    "backbone": {"model": "convnext_tiny", "weights": "s3://weights/convnext_tiny.safetensors"},
    "dataset": {"uri": "s3://data/eurosat/", "domain": "remote_sensing"},
    "protocol": {"recipe": "standard", "image_size": 224, "batch_size": 64},
    "output": {"uri": "s3://runs/"},
    "resources": {"gpus": 1},
    "storage": {"endpoint_url": "http://minio:9000", "credentials_secret": "backbones-s3"},
}
STUDY = {
    "apiVersion": "backbones/v1",
    "kind": "Study",
    "name": "paper",
    "backbones": [{"model": "resnet50"}, {"model": "convnext_tiny"}],
    "datasets": [
        {"uri": "s3://data/eurosat/", "domain": "remote_sensing"},
        {"uri": "s3://data/dtd.tar", "domain": "texture"},
    ],
    "seeds": [0, 1, 2],
    "train_fractions": [0.1, 1.0],
    "protocol": {"recipe": "paper"},
}


def patched(base: dict, patch: dict) -> dict:
    """A copy of ``base`` with each dotted path set (or removed with DELETE)."""
    doc = copy.deepcopy(base)
    for path, value in patch.items():
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = doc
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return doc


def problems(doc) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(doc)
    return [f"{loc}: {msg}" if loc else msg for loc, msg in info.value.problems]


def test_the_base_specs_are_valid():
    assert isinstance(parse_spec(FINETUNE), FineTune)
    assert isinstance(parse_spec(STUDY), Study)


FINETUNE_CASES = [
    # name: a DNS-1123 label of at most 63 characters (it names the Kubernetes Job)
    ({"name": "My_Run"}, f"name: {DNS}'My_Run'"),
    ({"name": "-run"}, f"name: {DNS}'-run'"),
    ({"name": "a" * 64}, "name: must be at most 63 characters, got 64"),
    ({"name": DELETE}, "name: required field is missing"),
    ({"name": 7}, "name: must be a string, got 7"),
    # positive sizes and counts
    ({"protocol.batch_size": -4}, "protocol.batch_size: must be > 0, got -4"),
    ({"protocol.batch_size": 0}, "protocol.batch_size: must be > 0, got 0"),
    ({"protocol.batch_size": 1.5}, "protocol.batch_size: must be an integer, got 1.5"),
    ({"protocol.image_size": 0}, "protocol.image_size: must be > 0, got 0"),
    ({"protocol.image_size": [448, -672]}, "protocol.image_size: must be > 0, got -672"),
    (
        {"protocol.image_size": [1, 2, 3]},
        "protocol.image_size: must be an integer or [height, width], got [1, 2, 3]",
    ),
    (
        {"protocol.image_size": "224"},
        'protocol.image_size: must be an integer or [height, width], got "224"',
    ),
    ({"protocol.max_epochs": 0}, "protocol.max_epochs: must be > 0, got 0"),
    ({"protocol.patience": -1}, "protocol.patience: must be > 0, got -1"),
    ({"protocol.seed": -1}, "protocol.seed: must be >= 0, got -1"),
    # fractions
    ({"dataset.train_fraction": 0}, "dataset.train_fraction: must be > 0, got 0"),
    ({"dataset.train_fraction": 1.5}, "dataset.train_fraction: must be <= 1, got 1.5"),
    ({"dataset.val_fraction": 1}, "dataset.val_fraction: must be < 1, got 1"),
    ({"dataset.test_fraction": 0}, "dataset.test_fraction: must be > 0, got 0"),
    # weights: none, timm, or a safetensors path / s3 URI
    ({"backbone.weights": "imagenet"}, f"backbone.weights: {WEIGHTS}'imagenet'"),
    (
        {"backbone.weights": "ckpt/model.pth"},
        f"backbone.weights: {WEIGHTS}'ckpt/model.pth' (pickle checkpoints are not loaded: "
        "convert to safetensors)",
    ),
    (
        {"backbone.weights": "https://hub/w.safetensors"},
        "backbone.weights: weights URI must be s3:// or a local path, got "
        "'https://hub/w.safetensors'",
    ),
    (
        {"backbone.weights": "s3:///w.safetensors"},
        "backbone.weights: s3:// URI needs a bucket, got 's3:///w.safetensors'",
    ),
    (
        {"backbone.model": " resnet50"},
        "backbone.model: must be a model name without surrounding spaces, got ' resnet50'",
    ),
    # URI schemes
    (
        {"dataset.uri": "gs://bucket/eurosat"},
        "dataset.uri: unsupported scheme 'gs://'; use s3://, a local path or builtin://",
    ),
    (
        {"dataset.uri": "builtin://mnist"},
        "dataset.uri: unknown builtin dataset 'mnist'; available: builtin://digits",
    ),
    ({"dataset.uri": "s3://"}, "dataset.uri: s3:// URI needs a bucket, got 's3://'"),
    ({"dataset.uri": DELETE}, "dataset.uri: required field is missing"),
    (
        {"output.uri": "gs://bucket/runs"},
        "output.uri: unsupported scheme 'gs://'; use s3:// or a local path",
    ),
    ({"output.uri": "s3://"}, "output.uri: s3:// URI needs a bucket, got 's3://'"),
    (
        {"storage.endpoint_url": "minio:9000"},
        "storage.endpoint_url: must be an http:// or https:// URL, got 'minio:9000'",
    ),
    # resources
    ({"resources.gpus": -1}, "resources.gpus: must be >= 0, got -1"),
    ({"resources.namespace": "ML_Team"}, f"resources.namespace: {DNS}'ML_Team'"),
    (
        {"resources.priority_class": "high"},
        "resources.priority_class: needs queue (a Kueue LocalQueue)",
    ),
    ({"metrics": {"port": 70000}}, "metrics.port: must be <= 65535, got 70000"),
    # literal credentials: refused, pointing at storage.credentials_secret
    ({"storage.aws_secret_access_key": "abc"}, f"storage.aws_secret_access_key: {CREDS}"),
    ({"storage.aws_access_key_id": "abc"}, f"storage.aws_access_key_id: {CREDS}"),
    ({"storage.password": "abc"}, f"storage.password: {CREDS}"),
    ({"storage.endpoint_url": "http://AK:SK@minio:9000"}, f"storage.endpoint_url: {CREDS}"),
    ({"dataset.uri": "s3://data/AKIAIOSFODNN7EXAMPLE/eurosat/"}, f"dataset.uri: {CREDS}"),
    (
        {"storage.credentials_secret": "My Secret"},
        "storage.credentials_secret: must be a Kubernetes object name (DNS-1123 subdomain), "
        "got 'My Secret'",
    ),
    # apiVersion and kind
    (
        {"apiVersion": "backbones/v2"},
        "apiVersion: unsupported 'backbones/v2'; this release reads 'backbones/v1'",
    ),
    (
        {"kind": "Finetune"},
        "kind: must be 'FineTune' or 'Study', got 'Finetune'; did you mean 'FineTune'?",
    ),
    ({"kind": ["FineTune"]}, "kind: must be 'FineTune' or 'Study', got [\"FineTune\"]"),
    ({"kind": DELETE}, "kind: required field is missing"),
    # unknown keys, with a suggestion when one is close
    (
        {"protocol.batchsize": 64},
        "protocol.batchsize: unknown field; did you mean 'protocol.batch_size'?",
    ),
    (
        {"backbone.modle": "resnet50"},
        "backbone.modle: unknown field; did you mean 'backbone.model'?",
    ),
    ({"protocl": {}}, "protocl: unknown field; did you mean 'protocol'?"),
    ({"resources.gpu": 1}, "resources.gpu: unknown field; did you mean 'resources.gpus'?"),
    ({"protocol.zzz": 1}, "protocol.zzz: unknown field"),
    ({"seeds": [0, 1]}, "seeds: unknown field in a FineTune; it belongs to kind: Study"),
    ({"protocol.a b": 1}, 'protocol."a b": unknown field'),
    # types and enums
    (
        {"protocol.recipe": "fast"},
        "protocol.recipe: must be one of 'paper', 'standard' or 'linear_probe', got 'fast'",
    ),
    ({"protocol.ema": "maybe"}, "protocol.ema: must be true or false, got 'maybe'"),
    ({"protocol": "fast"}, "protocol: must be an object, got str"),
    ({"protocol.lr": float("nan")}, "protocol.lr: must be a finite number, got nan"),
    (
        {"protocol.max_minutes": float("inf")},
        "protocol.max_minutes: must be a finite number, got inf",
    ),
]


@pytest.mark.parametrize(("patch", "line"), FINETUNE_CASES, ids=[c[1][:60] for c in FINETUNE_CASES])
def test_finetune_problem_is_one_exact_line(patch, line):
    assert problems(patched(FINETUNE, patch)) == [line]


STUDY_CASES = [
    (
        {"protocol.seed": 1},
        "protocol.seed: a Study sets its seeds with the top-level 'seeds'",
    ),
    (
        {"datasets.0.train_fraction": 0.5},
        "datasets.0.train_fraction: a Study sets fractions with 'train_fractions'",
    ),
    ({"seeds": [0, 0, 1]}, "seeds: duplicate entries 0"),
    ({"train_fractions": [0.5, 0.5]}, "train_fractions: duplicate entries 0.5"),
    ({"backbones": [{"model": "resnet50"}] * 2}, "backbones: duplicate entries resnet50"),
    (
        {"datasets": [{"uri": "s3://a/eurosat/"}, {"uri": "/data/eurosat.tar"}]},
        "datasets: duplicate entries eurosat",
    ),
    ({"seeds": []}, "seeds: must have at least 1 item(s), got 0"),
    ({"backbones": []}, "backbones: must have at least 1 item(s), got 0"),
    ({"seeds": [-1]}, "seeds.0: must be >= 0, got -1"),
    ({"train_fractions": [0]}, "train_fractions.0: must be > 0, got 0"),
    ({"train_fractions": [1.5]}, "train_fractions.0: must be <= 1, got 1.5"),
    ({"max_gpu_hours": 0}, "max_gpu_hours: must be > 0, got 0"),
    (
        {"backbones.1.weights": "best.pt"},
        f"backbones.1.weights: {WEIGHTS}'best.pt' (pickle "
        "checkpoints are not loaded: convert to safetensors)",
    ),
    (
        {"datasets.1.uri": "ftp://x/dtd"},
        "datasets.1.uri: unsupported scheme 'ftp://'; use s3://, a local path or builtin://",
    ),
    ({"backbone": {"model": "resnet50"}}, "backbone: unknown field; did you mean 'backbones'?"),
    (
        {"datasets.0.domian": "texture"},
        "datasets.0.domian: unknown field; did you mean 'datasets.0.domain'?",
    ),
    ({"datasets": DELETE}, "datasets: required field is missing"),
]


@pytest.mark.parametrize(("patch", "line"), STUDY_CASES, ids=[c[1][:60] for c in STUDY_CASES])
def test_study_problem_is_one_exact_line(patch, line):
    assert problems(patched(STUDY, patch)) == [line]


def test_every_problem_of_a_spec_is_reported_at_once():
    doc = patched(FINETUNE, {"protocol.batch_size": -4, "resources.gpus": -1, "protocol.x": 1})
    assert problems(doc) == [
        "protocol.batch_size: must be > 0, got -4",
        "protocol.x: unknown field",
        "resources.gpus: must be >= 0, got -1",
    ]


def test_a_spec_must_be_an_object():
    assert problems([FINETUNE]) == ["a spec must be a JSON object, got list"]


def test_malformed_json_reports_line_and_column():
    with pytest.raises(SpecError) as info:
        loads_spec('{\n  "kind": "FineTune",\n  "name": "x"\n  "backbone": {}\n}')
    assert info.value.problems == [
        ("", "line 4, column 3: malformed JSON: Expecting ',' delimiter")
    ]


def test_a_key_given_twice_is_refused_not_silently_overwritten():
    text = json.dumps(FINETUNE).replace('"batch_size": 64', '"batch_size": 64, "batch_size": 8')
    with pytest.raises(SpecError) as info:
        loads_spec(text)
    assert info.value.problems == [
        ("protocol.batch_size", "duplicate key (JSON readers silently keep only the last value)")
    ]


def test_json_nested_too_deeply_is_a_spec_error_not_a_crash():
    with pytest.raises(SpecError) as info:
        loads_spec("[" * 100_000)
    assert info.value.problems == [("", "malformed spec: JSON nested too deeply")]


def test_credential_errors_never_echo_the_secret():
    doc = patched(FINETUNE, {"storage.endpoint_url": "http://AK:topsecret@minio:9000"})
    assert "topsecret" not in " ".join(problems(doc))


def test_credentials_secret_is_the_reference_and_is_accepted():
    assert parse_spec(FINETUNE).storage.credentials_secret == "backbones-s3"


def test_defaults_fill_what_a_spec_leaves_out():
    spec = parse_spec(
        {
            "kind": "FineTune",
            "name": "x",
            "backbone": {"model": "resnet50"},
            "dataset": {"uri": "builtin://digits"},
        }
    )
    assert spec.api_version == "backbones/v1"
    assert spec.backbone.weights == "timm"
    assert spec.protocol.recipe == "standard" and spec.protocol.select_on == "val"
    assert spec.output.uri == "./runs" and spec.resources.gpus == 1


def test_image_size_may_be_height_and_width():
    spec = parse_spec(patched(FINETUNE, {"protocol.image_size": [448, 672]}))
    assert spec.protocol.hw == (448, 672)


def test_dataset_short_name_comes_from_the_uri_without_archive_suffix():
    names = [
        parse_spec(patched(FINETUNE, {"dataset.uri": uri})).dataset.short_name
        for uri in ("s3://data/eurosat/", "/data/DTD.tar.gz", "builtin://digits", "Galaxy10.h5")
    ]
    assert names == ["eurosat", "dtd", "digits", "galaxy10"]


def test_to_json_is_canonical_and_drops_the_schema_pointer():
    spec = parse_spec({**FINETUNE, "$schema": "./schema/finetune.schema.json"})
    data = json.loads(spec.to_json())
    assert "$schema" not in data and data["apiVersion"] == "backbones/v1"
    assert parse_spec(data) == parse_spec(FINETUNE)


def test_spec_hash_ignores_resources_but_not_the_protocol():
    base = parse_spec(FINETUNE)
    more_gpus = parse_spec(patched(FINETUNE, {"resources.gpus": 4}))
    other_lr = parse_spec(patched(FINETUNE, {"protocol.lr": 0.01}))
    assert base.spec_hash == more_gpus.spec_hash != other_lr.spec_hash


# ---- Study expansion ---------------------------------------------------------------------------


def test_expansion_order_is_dataset_backbone_fraction_seed_with_readable_run_ids():
    study = parse_spec(STUDY)
    ids = [c.run_id for c in expand(study)]
    assert len(ids) == study.n_cells == 2 * 2 * 2 * 3
    assert ids[:7] == [
        "paper/eurosat/resnet50/seed0-frac0.1",
        "paper/eurosat/resnet50/seed1-frac0.1",
        "paper/eurosat/resnet50/seed2-frac0.1",
        "paper/eurosat/resnet50/seed0-frac1.0",
        "paper/eurosat/resnet50/seed1-frac1.0",
        "paper/eurosat/resnet50/seed2-frac1.0",
        "paper/eurosat/convnext_tiny/seed0-frac0.1",
    ]
    assert ids[-1] == "paper/dtd/convnext_tiny/seed2-frac1.0"


def test_expansion_is_pure_and_stable():
    study = parse_spec(STUDY)
    before = study.model_dump()
    assert expand(study) == expand(study)
    assert study.model_dump() == before


def test_each_cell_is_a_finetune_carrying_its_seed_fraction_and_the_shared_sections():
    study = parse_spec(patched(STUDY, {"resources": {"gpus": 2}, "output": {"uri": "s3://r/"}}))
    cell = expand(study)[4]
    assert isinstance(cell, FineTune) and cell.study == "paper"
    assert (cell.protocol.seed, cell.dataset.train_fraction) == (1, 1.0)
    assert cell.protocol.recipe == "paper" and cell.resources.gpus == 2
    assert cell.output.uri == "s3://r/"


def test_cell_names_are_unique_dns_labels_even_for_long_names():
    long = patched(STUDY, {"name": "a" * 60, "backbones": [{"model": "swinv2_tiny_window8_256"}]})
    names = [c.name for c in expand(parse_spec(long))]
    assert len(set(names)) == len(names)
    assert all(len(n) <= 63 and n == n.lower() for n in names)
    assert cell_name("s", "d", "m", 0, 1.0) == "s-d-m-s0-f1-0"


def test_cells_validate_again_from_their_json():
    cells = expand(parse_spec(STUDY))
    assert len(cells) == parse_spec(STUDY).n_cells > 1
    for cell in cells:
        again = loads_spec(cell.to_json())
        assert again == cell and again.run_id == cell.run_id


def test_a_finetune_is_its_own_single_cell():
    spec = parse_spec(FINETUNE)
    assert cells_of(spec) == [spec] and spec.run_id == "eurosat-convnext"
