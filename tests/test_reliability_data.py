"""Hostile or broken data (issue 8, point 5), end to end through `backbones run`.

The data helper's unit tests (tests/test_archive.py, tests/test_data_prepare.py,
tests/test_data_decode.py) prove each check in isolation. Here every case goes through the whole
command a user runs, and the contract is the same for all of them: exit 2 (never retried), ONE
line on stderr naming the file or member, and nothing marked complete (no summary.json,
status.json says Failed with that same line).
"""

from __future__ import annotations

import hashlib
import io
import json
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.errors import EXIT_USER
from service.storage.local import LocalStore
from tests.data_factory import image_bytes, make_imagefolder, make_packed
from tests.fixtures.faults import tiny_spec
from tests.specs import write_spec

GOOD = {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}}


# -- builders: each returns the dataset path given to the spec -------------------------------


def _good_members() -> list[tuple[str, bytes]]:
    out, k = [], 0
    for split, per in GOOD.items():
        for cls, n in per.items():
            for i in range(n):
                k += 1
                out.append((f"d/{split}/{cls}/{i}.png", image_bytes(k)))
    return out


def _tar(tmp: Path, hostile: tarfile.TarInfo, name: str = "d.tar", mode: str = "w") -> Path:
    path = tmp / name
    with tarfile.open(path, mode) as tf:
        for member, data in _good_members():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        tf.addfile(hostile, io.BytesIO(b"x" * hostile.size) if hostile.size else None)
    return path


def _tinfo(name: str, type_: bytes = tarfile.REGTYPE, linkname: str = "", size: int = 0):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = type_, linkname, size
    return info


def _zip(tmp: Path, hostile: zipfile.ZipInfo | str, data: bytes = b"x") -> Path:
    path = tmp / "d.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for member, content in _good_members():
            zf.writestr(member, content)
        zf.writestr(hostile, data)
    return path


def _zinfo(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    return info


def _folder(tmp: Path, splits=None) -> Path:
    return make_imagefolder(tmp / "pets", splits or GOOD)


def _with_file(rel: str, data: bytes):
    def build(tmp: Path) -> Path:
        root = _folder(tmp)
        (root / rel).write_bytes(data)
        return root

    return build


def _png_bomb() -> bytes:
    """A PNG header declaring 100,000 x 100,000 pixels, in 57 bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _truncated_jpeg() -> bytes:
    data = image_bytes(7, size=(32, 32), fmt="JPEG")
    return data[: len(data) // 2]


def _empty_class(tmp: Path) -> Path:
    root = _folder(tmp)
    (root / "train/c").mkdir()
    (root / "test/c").mkdir()
    return root


def _packed_wrong_sha(tmp: Path) -> Path:
    """A pushed (packed) dataset on local disk whose manifest pins another shard content."""
    root = make_packed(tmp / "packed", GOOD)
    manifest = json.loads((root / "manifest.json").read_text())
    for shard in manifest["shards"]:
        data = (root / shard["key"]).read_bytes()
        shard["size"] = len(data)
        shard["sha256"] = hashlib.sha256(data).hexdigest()
    manifest["shards"][0]["sha256"] = hashlib.sha256(b"another shard").hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


CASES = [
    # (id, builder, the one line)
    (
        "tar-traversal",
        lambda t: _tar(t, _tinfo("d/train/../../evil.png", size=1)),
        "d.tar: refusing member 'd/train/../../evil.png': path escapes the destination ('..')",
    ),
    (
        "tar-absolute",
        lambda t: _tar(t, _tinfo("/etc/evil.png", size=1)),
        "d.tar: refusing member '/etc/evil.png': absolute path",
    ),
    (
        "tar-symlink",
        lambda t: _tar(t, _tinfo("d/train/a/pw.png", tarfile.SYMTYPE, "/etc/passwd")),
        "d.tar: refusing member 'd/train/a/pw.png': symbolic link (-> '/etc/passwd') not allowed",
    ),
    (
        "tar-hardlink",
        lambda t: _tar(t, _tinfo("d/train/a/pw.png", tarfile.LNKTYPE, "/etc/passwd")),
        "d.tar: refusing member 'd/train/a/pw.png': hard link (-> '/etc/passwd') not allowed",
    ),
    (
        "tar-char-device",
        lambda t: _tar(t, _tinfo("d/train/a/null.png", tarfile.CHRTYPE)),
        "d.tar: refusing member 'd/train/a/null.png': device or FIFO not allowed",
    ),
    (
        "tar-block-device",
        lambda t: _tar(t, _tinfo("d/train/a/sda.png", tarfile.BLKTYPE)),
        "d.tar: refusing member 'd/train/a/sda.png': device or FIFO not allowed",
    ),
    (
        "zip-traversal",
        lambda t: _zip(t, "d/../../evil.png"),
        "d.zip: refusing member 'd/../../evil.png': path escapes the destination ('..')",
    ),
    (
        "zip-symlink",
        lambda t: _zip(t, _zinfo("d/train/a/pw.png", stat.S_IFLNK | 0o777), b"/etc/passwd"),
        "d.zip: refusing member 'd/train/a/pw.png': symbolic link not allowed",
    ),
    (
        "zip-device",
        lambda t: _zip(t, _zinfo("d/train/a/null.png", stat.S_IFCHR | 0o644), b""),
        "d.zip: refusing member 'd/train/a/null.png': device or FIFO not allowed",
    ),
    (
        "image-decompression-bomb",
        _with_file("train/a/bomb.png", _png_bomb()),
        "{root}: train/a/bomb.png: refused as a decompression bomb (",  # (+ PIL's figures)
    ),
    (
        "truncated-jpeg",
        _with_file("train/b/cut.jpg", _truncated_jpeg()),
        "{root}: train/b/cut.jpg: cannot decode image: truncated or corrupt image",
    ),
    (
        "zero-byte-file",
        _with_file("test/a/empty.png", b""),
        "{root}: test/a/empty.png: empty file (0 bytes)",
    ),
    (
        "non-image-file",
        _with_file("train/a/notes.png", b"these are my notes, not a picture\n"),
        "{root}: train/a/notes.png: not an image (unrecognised file format)",
    ),
    ("empty-class", _empty_class, "{root}: class 'c' in train/ has no images"),
    (
        "single-class",
        lambda t: _folder(t, {"train": {"a": 4}, "test": {"a": 2}}),
        "{root}: train/ has a single class 'a': classification needs at least 2 classes",
    ),
    (
        "test-class-not-in-train",
        lambda t: _folder(t, {"train": {"a": 3, "b": 3, "c": 3}, "test": {"a": 1, "b": 1, "d": 1}}),
        "{root}: class 'd' in test/ is not in train/",
    ),
    (
        "class-folder-with-a-newline",  # it would forge lines in reports, logs and status
        lambda t: _folder(t, {"train": {"a": 3, "b\nc": 3}, "test": {"a": 1, "b\nc": 1}}),
        "{root}: class folder train/'b\\nc': must not contain control characters",
    ),
    (
        "packed-manifest-sha256-mismatch",
        _packed_wrong_sha,
        "{root}: shards/train-00000.tar: ",  # must name the shard and say sha256 (checked below)
    ),
]


def _run(tmp: Path, dataset: Path, cache: Path | None = None):
    spec = tiny_spec(tmp, "bad", dataset=str(dataset), epochs=1)
    r = CliRunner().invoke(
        app, ["run", str(write_spec(tmp, spec)), "--cache-dir", str(cache or tmp / "cache")]
    )
    return spec, r


def _assert_refused(spec, r, line: str) -> str:
    assert r.exit_code == EXIT_USER, r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, lines  # one line, no traceback
    assert lines[0].startswith("error: " + line), lines[0]
    store = LocalStore(f"{spec.output.uri}/{spec.run_id}")
    keys = store.list("")
    assert "summary.json" not in keys
    assert not [k for k in keys if k.startswith("checkpoints/")]
    status = json.loads(store.read_bytes("status.json"))
    assert status["phase"] == "Failed"
    assert status["error"] == lines[0].removeprefix("error: ")
    return lines[0]


@pytest.mark.parametrize(("build", "line"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_data_is_refused_in_one_line_with_exit_2_and_nothing_complete(tmp_path, build, line):
    root = build(tmp_path)
    spec, r = _run(tmp_path, root)
    got = _assert_refused(spec, r, line.format(root=root))
    if "shards/" in line:
        assert "sha256" in got  # the manifest's pin is what failed
    assert not (tmp_path / "evil.png").exists() and not Path("/etc/evil.png").exists()


@pytest.mark.integration
def test_a_pushed_dataset_whose_shard_does_not_match_its_manifest_is_refused(
    tmp_path, s3_env, s3_bucket, seaweed
):
    """The S3 path: `backbones dataset push`, then a shard changed behind the manifest's back
    (same size, one byte flipped): the run refuses it naming the shard, and caches nothing."""
    from service.data.push import push
    from service.spec import Storage

    uri = f"s3://{s3_bucket}/datasets/pets/"
    push(_folder(tmp_path), uri, Storage(endpoint_url=seaweed.endpoint))
    client = seaweed.client()
    key = "datasets/pets/shards/train-00000.tar"
    body = bytearray(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(body))

    spec = tiny_spec(
        tmp_path, "tampered", dataset=uri, epochs=1, storage={"endpoint_url": seaweed.endpoint}
    )
    cache = tmp_path / "cache"
    r = CliRunner().invoke(app, ["run", str(write_spec(tmp_path, spec)), "--cache-dir", str(cache)])
    line = _assert_refused(spec, r, f"{uri}shards/train-00000.tar: corrupt object (sha256 ")
    assert line.endswith("after 3 downloads; push the dataset again")
    assert not [p for p in cache.rglob("*.tar") if "partial" not in str(p)]
