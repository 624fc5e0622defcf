"""dataset inspect: the dataset card (counts, imbalance, undecodable, duplicates, sizes)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.data.card import card, inspect_uri, render
from service.data.push import push
from service.errors import UserError
from tests.data_factory import image_bytes, make_imagefolder


@pytest.fixture
def messy(tmp_path):
    """6:2 imbalance, one undecodable file, and three kinds of duplicate."""
    splits = {"train": {"a": 6, "b": 2}, "test": {"a": 2, "b": 2}}
    src = make_imagefolder(tmp_path / "src", splits, size=(16, 16))
    shutil.copy(src / "train/a/a_000.png", src / "train/a/copy.png")  # within train
    shutil.copy(src / "train/b/b_000.png", src / "test/b/leak.png")  # train -> test leak
    shutil.copy(src / "train/a/a_001.png", src / "train/b/mislabel.png")  # two labels
    (src / "train/a/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (src / "test/a/big.png").write_bytes(image_bytes(99, (32, 32)))
    return src


def test_card_counts_and_imbalance_per_split(messy):
    c = card(messy)
    assert c["classes"] == ["a", "b"]
    assert c["splits"]["train"]["per_class"] == {"a": 8, "b": 3}
    assert c["splits"]["train"]["imbalance"] == pytest.approx(8 / 3, abs=1e-3)
    assert c["splits"]["test"]["count"] == 6


def test_card_lists_undecodable_files(messy):
    (bad,) = card(messy)["undecodable"]
    assert bad["file"] == "train/a/broken.png"


def test_card_finds_exact_duplicates_within_and_across_splits(messy):
    d = card(messy)["duplicates"]
    assert ["train/a/a_000.png", "train/a/copy.png"] in d["within_split"]
    assert ["train/b/b_000.png", "test/b/leak.png"] in d["across_splits"]
    assert ["train/a/a_001.png", "train/b/mislabel.png"] in d["conflicting_labels"]
    assert len(d["across_splits"]) == 1


def test_card_reports_size_and_mode_distribution(messy):
    c = card(messy)
    assert c["sizes"]["width"] == {"min": 16, "median": 16, "max": 32}
    assert c["sizes"]["most_common"] == {"16x16": 15, "32x32": 1}
    assert c["modes"] == {"RGB": 16}
    assert c["formats"] == {"PNG": 16}


def test_rendered_card_reads_as_text(messy):
    text = render(card(messy))
    assert "  train: 11 images, imbalance 2.67x (min 3, max 8 per class)" in text
    assert "  duplicates across splits: 1 group(s)" in text
    assert "    train/b/b_000.png = test/b/leak.png" in text
    assert "  undecodable: 1" in text


def test_a_packed_dataset_gives_the_same_card_as_its_source(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"train": {"a": 4, "b": 3}, "test": {"a": 1, "b": 2}})
    push(src, str(tmp_path / "packed"))
    packed, plain = card(tmp_path / "packed"), card(src)
    for key in ("classes", "images", "splits", "sizes", "modes", "duplicates"):
        assert packed[key] == plain[key], key


def test_a_shard_with_a_traversal_member_is_refused_naming_it(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"train": {"a": 2, "b": 1}})
    push(src, str(tmp_path / "packed"))
    shard = tmp_path / "packed/shards/train-00000.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("../../etc/evil.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(UserError) as e:
        card(tmp_path / "packed")
    assert str(e.value) == (
        "shards/train-00000.tar: member '../../etc/evil.png' is not <class>/<file> with a class "
        "listed in manifest.json"
    )


def test_cli_inspect_json(messy):
    r = CliRunner().invoke(app, ["dataset", "inspect", str(messy), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["images"] == 17


@pytest.mark.integration
def test_inspect_of_a_pushed_dataset_on_s3(s3_bucket, s3_storage, tmp_path):
    src = make_imagefolder(tmp_path / "src", {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}})
    uri = f"s3://{s3_bucket}/ds/toy/"
    push(src, uri, s3_storage)
    c = inspect_uri(uri, s3_storage, tmp_path / "cache")
    assert c["splits"]["train"]["per_class"] == {"a": 3, "b": 3}
    assert c["images"] == 8
