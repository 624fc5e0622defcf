"""safe_extract: hostile tar and zip archives are refused, naming the member; good ones extract."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from service.data.archive import safe_extract
from service.errors import UserError

LIMITS = {"max_member_bytes": 1 << 20, "max_total_bytes": 4 << 20}


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode="w") -> Path:
    with tarfile.open(path, mode) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def _info(name: str, type_: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = linkname
    return info


def _zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def _refused(archive: Path, dest: Path, message: str) -> None:
    with pytest.raises(UserError) as e:
        safe_extract(archive, dest, **LIMITS)
    assert str(e.value) == message
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir()] == [], "no temporary folder left behind"


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out" / "ds"


def test_good_tar_gz_extracts_every_file(tmp_path, dest):
    a = _tar(tmp_path / "a.tar.gz", [("ds/train/a/1.png", b"x" * 10), ("ds/b.txt", b"y")], "w:gz")
    assert safe_extract(a, dest, **LIMITS) == dest
    assert (dest / "ds/train/a/1.png").read_bytes() == b"x" * 10
    assert (dest / "ds/b.txt").read_bytes() == b"y"


def test_good_zip_extracts_every_file(tmp_path, dest):
    a = _zip(tmp_path / "a.zip", [("train/a/1.png", b"x"), ("train/", b"")])
    safe_extract(a, dest, **LIMITS)
    assert (dest / "train/a/1.png").read_bytes() == b"x"


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_of_any_compression_extracts(tmp_path, dest, mode):
    a = _tar(tmp_path / "a.tar", [("f", b"data")], mode)
    safe_extract(a, dest, **LIMITS)
    assert (dest / "f").read_bytes() == b"data"


def test_tar_absolute_path_is_refused(tmp_path, dest):
    a = _tar(tmp_path / "a.tar", [("ok", b"1"), ("/etc/evil", b"x")])
    _refused(a, dest, "a.tar: refusing member '/etc/evil': absolute path")


def test_tar_dotdot_traversal_is_refused(tmp_path, dest):
    a = _tar(tmp_path / "a.tar", [("train/../../evil", b"x")])
    _refused(
        a, dest, "a.tar: refusing member 'train/../../evil': path escapes the destination ('..')"
    )
    assert not (tmp_path / "evil").exists()


def test_tar_symlink_is_refused(tmp_path, dest):
    a = _tar(tmp_path / "a.tar", [_info("train/a/link.png", tarfile.SYMTYPE, "/etc/passwd")])
    _refused(
        a,
        dest,
        "a.tar: refusing member 'train/a/link.png': symbolic link (-> '/etc/passwd') not allowed",
    )


def test_tar_hardlink_is_refused(tmp_path, dest):
    a = _tar(tmp_path / "a.tar", [("f", b"1"), _info("g", tarfile.LNKTYPE, "f")])
    _refused(a, dest, "a.tar: refusing member 'g': hard link (-> 'f') not allowed")


@pytest.mark.parametrize("type_", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_tar_device_or_fifo_is_refused(tmp_path, dest, type_):
    a = _tar(tmp_path / "a.tar", [_info("dev/x", type_)])
    _refused(a, dest, "a.tar: refusing member 'dev/x': device or FIFO not allowed")


def test_tar_oversized_member_is_refused(tmp_path, dest):
    a = _tar(tmp_path / "a.tar", [("big.png", b"\0" * (LIMITS["max_member_bytes"] + 1))])
    _refused(
        a,
        dest,
        "a.tar: refusing member 'big.png': 1048577 bytes exceeds the per-file limit of 1048576",
    )


def test_tar_gz_bomb_beyond_total_is_refused(tmp_path, dest):
    # Five 1 MiB members of zeros: ~5 KiB compressed, 5 MiB extracted (limit 4 MiB).
    members = [(f"z{i}", b"\0" * (1 << 20)) for i in range(5)]
    a = _tar(tmp_path / "bomb.tar.gz", members, "w:gz")
    assert a.stat().st_size < 64 << 10
    _refused(
        a,
        dest,
        "bomb.tar.gz: refusing member 'z4': archive expands beyond the limit of 4194304 bytes "
        "in total",
    )


def test_zip_absolute_path_is_refused(tmp_path, dest):
    a = _zip(tmp_path / "a.zip", [("/abs/evil", b"x")])
    _refused(a, dest, "a.zip: refusing member '/abs/evil': absolute path")


def test_zip_dotdot_traversal_is_refused(tmp_path, dest):
    a = _zip(tmp_path / "a.zip", [("../evil", b"x")])
    _refused(a, dest, "a.zip: refusing member '../evil': path escapes the destination ('..')")


def test_zip_backslash_traversal_is_refused(tmp_path, dest):
    a = _zip(tmp_path / "a.zip", [("a\\..\\..\\evil", b"x")])
    _refused(
        a,
        dest,
        "a.zip: refusing member 'a\\\\..\\\\..\\\\evil': path escapes the destination ('..')",
    )


def test_zip_symlink_is_refused(tmp_path, dest):
    info = zipfile.ZipInfo("train/a/link.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    a = _zip(tmp_path / "a.zip", [(info, b"/etc/passwd")])
    _refused(a, dest, "a.zip: refusing member 'train/a/link.png': symbolic link not allowed")


def test_zip_device_is_refused(tmp_path, dest):
    info = zipfile.ZipInfo("dev/x")
    info.external_attr = (stat.S_IFCHR | 0o644) << 16
    a = _zip(tmp_path / "a.zip", [(info, b"")])
    _refused(a, dest, "a.zip: refusing member 'dev/x': device or FIFO not allowed")


def test_zip_bomb_is_refused_by_member_size(tmp_path, dest):
    a = _zip(tmp_path / "bomb.zip", [("z", b"\0" * (2 << 20))])
    assert a.stat().st_size < 64 << 10
    _refused(
        a,
        dest,
        "bomb.zip: refusing member 'z': 2097152 bytes exceeds the per-file limit of 1048576",
    )


def test_zip_with_lying_size_header_is_caught_while_streaming(tmp_path, dest):
    # The central directory claims 10 bytes; the deflate stream holds 2 MiB. Whatever the
    # reader does with the lie, nothing beyond the limits is written and the archive is refused.
    a = _zip(tmp_path / "liar.zip", [("z", b"\0" * (2 << 20))])
    raw = bytearray(a.read_bytes())
    cd = raw.rindex(b"PK\x01\x02")
    raw[cd + 24 : cd + 28] = (10).to_bytes(4, "little")  # uncompressed size in central dir
    lh = raw.index(b"PK\x03\x04")
    raw[lh + 22 : lh + 26] = (10).to_bytes(4, "little")  # and in the local header
    a.write_bytes(bytes(raw))
    with pytest.raises(UserError) as e:
        safe_extract(a, dest, **LIMITS)
    assert str(e.value).startswith("liar.zip: ")
    assert not dest.exists()


def test_not_an_archive_is_a_user_error(tmp_path, dest):
    a = tmp_path / "a.tar"
    a.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(UserError, match=r"^a\.tar: not a readable tar or zip archive"):
        safe_extract(a, dest, **LIMITS)
    assert not dest.exists()


def test_existing_destination_from_a_concurrent_extraction_is_kept(tmp_path, dest):
    dest.mkdir()
    (dest / "theirs").write_bytes(b"1")
    a = _tar(tmp_path / "a.tar", [("mine", b"2")])
    safe_extract(a, dest, **LIMITS)
    assert sorted(p.name for p in dest.iterdir()) == ["theirs"]
