"""One reading of every dataset format: push, inspect, budget and training see the same thing.

Each awkward folder below goes through `backbones dataset push` (to a local folder),
`backbones dataset inspect --json`, the budget's count and training's ``prepare`` (on the folder
and on what push wrote); all must report the same classes, the same per-class counts per split
and, where a split is carved, the same images. The decisions are in docs/datasets.md.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.cost.budget import dataset_size
from service.data import layout, prepare
from service.data.card import card, render
from service.errors import UserError
from tests.data_factory import image_bytes, make_imagefolder
from tests.specs import spec_for

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def _junk(root: Path, class_dir: str) -> None:
    """What real folders carry: notes beside the images, OS droppings, a README."""
    (root / class_dir / "notes.txt").write_text("where these came from")
    (root / class_dir / "Thumbs.db").write_bytes(b"\0junk")
    (root / class_dir / ".DS_Store").write_bytes(b"\0junk")
    (root / class_dir / ".hidden").mkdir()
    (root / class_dir / ".hidden" / "x.png").write_bytes(image_bytes(999))
    macosx = root / "__MACOSX" / class_dir
    macosx.mkdir(parents=True)
    (macosx / "._a_000.png").write_bytes(b"\0resource fork")


def valid_alias(tmp: Path) -> Path:
    return make_imagefolder(
        tmp / "d",
        {"train": {"a": 6, "b": 5}, "valid": {"a": 2, "b": 2}, "test": {"a": 2, "b": 3}},
    )


def lacking_classes(tmp: Path) -> Path:
    return make_imagefolder(
        tmp / "d",
        {"train": {"a": 5, "b": 5, "c": 4}, "validation": {"a": 1, "c": 1}, "test": {"a": 2}},
    )


def non_image_files(tmp: Path) -> Path:
    root = make_imagefolder(tmp / "d", {"train": {"a": 5, "b": 4}, "test": {"a": 2, "b": 2}})
    _junk(root, "train/a")
    return root


def nested_top_folder(tmp: Path) -> Path:
    make_imagefolder(
        tmp / "d" / "eurosat-v2", {"train": {"a": 4, "b": 5}, "test": {"a": 2, "b": 1}}
    )
    (tmp / "d" / "README.md").write_text("the dataset is in eurosat-v2/")
    (tmp / "d" / ".DS_Store").write_bytes(b"\0junk")
    return tmp / "d"


# (builder, classes, {split: per-class counts}, files skipped as not images)
SPLIT_FOLDERS = [
    (
        valid_alias,
        ["a", "b"],
        {"train": {"a": 6, "b": 5}, "val": {"a": 2, "b": 2}, "test": {"a": 2, "b": 3}},
        [],
    ),
    (
        lacking_classes,
        ["a", "b", "c"],
        {
            "train": {"a": 5, "b": 5, "c": 4},
            "val": {"a": 1, "b": 0, "c": 1},
            "test": {"a": 2, "b": 0, "c": 0},
        },
        [],
    ),
    (
        non_image_files,
        ["a", "b"],
        {"train": {"a": 5, "b": 4}, "test": {"a": 2, "b": 2}},
        ["train/a/notes.txt"],
    ),
    (
        nested_top_folder,
        ["a", "b"],
        {"train": {"a": 4, "b": 5}, "test": {"a": 2, "b": 1}},
        [],
    ),
]


def _push(src: Path, out: Path, *args: str) -> tuple[dict, str]:
    r = CliRunner().invoke(app, ["dataset", "push", str(src), str(out), *args])
    assert r.exit_code == 0, r.output
    return json.loads((out / "manifest.json").read_text()), r.stdout


def _inspect(src: Path) -> dict:
    r = CliRunner().invoke(app, ["dataset", "inspect", str(src), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _trained(uri: Path, cache: Path, **dataset) -> tuple[list[str], dict, object]:
    """What training sees: classes and per-class counts, train+val pooled when val is carved."""
    p = prepare(spec_for(uri, **dataset), cache)

    def per(*splits) -> dict:
        counts = [sum(c) for c in zip(*(s.per_class(len(p.classes)) for s in splits), strict=True)]
        return dict(zip(p.classes, counts, strict=True))

    if p.val_source == "val/":
        seen = {"train": per(p.train), "val": per(p.val), "test": per(p.test)}
    else:
        seen = {"train": per(p.train, p.val), "test": per(p.test)}
    return p.classes, seen, p


@pytest.mark.parametrize(
    ("build", "classes", "counts", "skipped"),
    SPLIT_FOLDERS,
    ids=[c[0].__name__.replace("_", "-") for c in SPLIT_FOLDERS],
)
def test_push_inspect_budget_and_training_see_the_same_folder(
    tmp_path, build, classes, counts, skipped
):
    src = build(tmp_path)
    total = {s: sum(v.values()) for s, v in counts.items()}

    manifest, push_out = _push(src, tmp_path / "pushed")
    assert manifest["classes"] == classes
    assert {s: v["per_class"] for s, v in manifest["splits"].items()} == counts

    c = _inspect(src)
    assert c["classes"] == classes
    assert {s: v["per_class"] for s, v in c["splits"].items()} == counts

    size = dataset_size(spec_for(src).dataset)
    assert size.source == "counted (ImageFolder)"
    assert (size.train, size.val, size.test, size.classes) == (
        total["train"],
        total.get("val"),
        total["test"],
        len(classes),
    )

    # Training, on the folder itself and on what push made of it.
    runs = [_trained(uri, tmp_path / "cache") for uri in (src, tmp_path / "pushed")]
    assert len(runs) == 2
    for got_classes, seen, _ in runs:
        assert got_classes == classes
        assert seen == counts

    # A file that is not an image is skipped everywhere, and said so by each tool.
    folder_notes = runs[0][2].notes
    if skipped:
        (note,) = [n for n in folder_notes if n.startswith("skipped ")]
        assert note.startswith(f"skipped {len(skipped)} file(s) that are not images in a class")
        assert note.endswith(f", e.g. {skipped[0]}")
        assert note in push_out.splitlines()
        assert c["notes"] == [note]
        assert f"  note: {note}" in render(card(src))
    else:
        assert not [n for n in folder_notes if n.startswith("skipped ")]
        assert c["notes"] == []


def test_a_class_folder_tree_is_carved_the_same_by_push_and_by_training(tmp_path):
    src = make_imagefolder(tmp_path / "d", {"": {"a": 8, "b": 6, "c": 5}})
    _junk(src, "b")
    manifest, _ = _push(src, tmp_path / "pushed", "--test-fraction", "0.25")
    classes, seen, p = _trained(src, tmp_path / "cache", test_fraction=0.25)
    assert classes == manifest["classes"] == ["a", "b", "c"]
    # 0.25 per class, rounded half up: 8 -> 2, 6 -> 2 (1.5), 5 -> 1 (1.25)
    expected = {"train": {"a": 6, "b": 4, "c": 4}, "test": {"a": 2, "b": 2, "c": 1}}
    assert seen == expected
    assert {s: v["per_class"] for s, v in manifest["splits"].items()} == expected
    with tarfile.open(tmp_path / "pushed" / "shards" / "test-00000.tar") as tar:
        pushed_test = sorted(tar.getnames())
    assert pushed_test == sorted(p.test.refs)  # the very same images, not just as many

    c = _inspect(src)
    assert c["splits"] == {
        "all": {
            "count": 19,
            "per_class": {"a": 8, "b": 6, "c": 5},
            "missing_classes": [],
            "imbalance": 1.6,
        }
    }
    size = dataset_size(spec_for(src, test_fraction=0.25).dataset)
    assert (size.train, size.test, size.classes) == (14, 5, 3)


# Errors: one message, the same from push, inspect and training; the budget does not count.
BROKEN = [
    (
        "empty-class",
        lambda t: _mkdir(
            make_imagefolder(t / "d", {"train": {"a": 3, "b": 3}, "test": {"a": 1}}), "train/c"
        ),
        "class 'c' in train/ has no images",
    ),
    (
        "class-of-only-notes",
        lambda t: _write(
            make_imagefolder(t / "d", {"train": {"a": 3, "b": 3}, "test": {"a": 1}}),
            "train/c/labels.csv",
        ),
        "class 'c' in train/ has no images (only files without an image suffix, e.g. labels.csv)",
    ),
    (
        "val-class-not-in-train",
        lambda t: make_imagefolder(
            t / "d", {"train": {"a": 3, "b": 3}, "valid": {"a": 1, "x": 1}, "test": {"a": 1}}
        ),
        "class 'x' in valid/ is not in train/",
    ),
    (
        "two-val-folders",
        lambda t: make_imagefolder(
            t / "d", {"train": {"a": 3, "b": 3}, "val": {"a": 1}, "valid": {"b": 1}}
        ),
        "both val/ and valid/ hold the val split; keep one",
    ),
    (
        "single-class",
        lambda t: make_imagefolder(t / "d", {"train": {"a": 3}, "test": {"a": 1}}),
        "train/ has a single class 'a': classification needs at least 2 classes",
    ),
]


def _mkdir(root: Path, rel: str) -> Path:
    (root / rel).mkdir(parents=True)
    return root


def _write(root: Path, rel: str) -> Path:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text("file,label\n")
    return root


@pytest.mark.parametrize(("build", "message"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_a_broken_folder_is_refused_alike_by_push_inspect_and_training(tmp_path, build, message):
    src = build(tmp_path)
    line = f"{src}: {message}"
    for command in (
        ["dataset", "push", str(src), str(tmp_path / "out")],
        ["dataset", "inspect", str(src)],
    ):
        r = CliRunner().invoke(app, command)
        assert (r.exit_code, r.stderr) == (2, f"error: {line}\n"), command
    with pytest.raises(UserError) as e:
        prepare(spec_for(src), tmp_path / "cache")
    assert str(e.value) == line
    assert dataset_size(spec_for(src).dataset).source != "counted (ImageFolder)"


def test_a_dataset_pushed_by_the_previous_release_still_trains(tmp_path):
    """backbones 0.1.0 carved this folder's splits with its own splitter (random.Random); the
    manifest is read unchanged, so its splits stay what that release wrote."""
    old = shutil.copytree(FIXTURES / "packed-v1-release-0.1.0", tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    assert (manifest["format"], manifest["created_by"]) == (
        "backbones-packed/v1",
        "backbones 0.1.0",
    )
    classes, seen, p = _trained(old, tmp_path / "cache")
    assert classes == ["ant", "bee"]
    assert seen == {s: v["per_class"] for s, v in manifest["splits"].items()}
    assert p.val_source == "val/" and p.source_kind == "packed"
    c = card(old)
    assert {s: v["per_class"] for s, v in c["splits"].items()} == seen
    size = dataset_size(spec_for(old).dataset)
    assert (size.source, size.train, size.val, size.test) == ("manifest", 8, 2, 4)


def test_split_names_in_any_case_and_subfolders_of_a_class_belong_to_it(tmp_path):
    src = make_imagefolder(tmp_path / "d", {"Train": {"a": 2, "b": 2}, "TEST": {"a": 1, "b": 1}})
    (src / "Train/a/more").mkdir()
    (src / "Train/a/more/x.png").write_bytes(image_bytes(5))
    found = layout.scan(src)
    assert found.folders == {"train": "Train", "test": "TEST"}
    assert found.per_class("train") == {"a": 3, "b": 2}
    assert [found.rel(p) for p in found.splits["train"]["a"]] == [
        "Train/a/a_000.png",
        "Train/a/a_001.png",
        "Train/a/more/x.png",
    ]
    _push(src, tmp_path / "pushed")
    with tarfile.open(tmp_path / "pushed" / "shards" / "train-00000.tar") as tar:
        assert "a/more__x.png" in tar.getnames()
    assert dataset_size(spec_for(src).dataset).train == 5


def test_an_s3_imagefolder_prefix_is_fetched_by_the_same_image_rule(monkeypatch, tmp_path):
    """fetch downloads only the objects the layout calls images (suffix, no junk)."""
    from service.storage import fetch

    keys = ["train/a/x.JPG", "train/a/notes.txt", "__MACOSX/train/a/._x.png", "train/.b/y.png"]
    assert [k for k in keys if layout.is_image(k)] == ["train/a/x.JPG"]

    class Store:
        uri, prefix, bucket, max_concurrency = "s3://b/d/", "d", "b", 1

        def list_objects(self):
            return [{"key": k, "size": 1, "etag": "e"} for k in keys]

    got = []
    monkeypatch.setattr(fetch, "_download", lambda store, key, path, size: got.append(key) or 1)
    monkeypatch.setattr(fetch.os, "replace", lambda a, b: None)
    fetch._fetch_folder(Store(), tmp_path, None)
    assert got == ["train/a/x.JPG"]
