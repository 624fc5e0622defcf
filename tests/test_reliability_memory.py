"""Memory and disk stay bounded on hostile inputs that pass every other check (issue 22, point 3).

Each input goes through ``service.data.prepare`` (what the worker runs before training: resolve,
extract, decode into the cache) in its own fresh process, and that process's peak RSS
(``ru_maxrss``) is compared with a benign dataset's of the same kind. To pay torch's import once,
one driver process imports it and then forks a child per input: every child starts from the same
memory, so the difference between two children is what their inputs cost.

Before the fix, on these machines: a .tar.gz declaring a 96 MiB GNU long name took ~1 GB over
the benign tar and gave a 96 MiB error line; a 6000x6000 16-bit RGBA PNG ~1.5 GB; a 450 MB .npz
of zeros (0.5 MB on disk) ~1 GB (loaded whole); a zip of zeros refused after extraction left its
whole extraction in the cache. What the stand-in does not model: a pod's cgroup limit (the
children are not killed at a limit, they are measured) and other decode-pool sizes (the driver
sees the machine's cores).
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from service.errors import MAX_MESSAGE_CHARS
from tests.data_factory import make_imagefolder
from tests.fixtures.faults import run

# A hostile input may cost at most this much peak RSS over the benign dataset of its kind.
MARGIN_BYTES = 256 << 20
GOOD = {"train": {"a": 4, "b": 4}, "test": {"a": 2, "b": 2}}

DRIVER = """
import json, os, resource, sys
from pathlib import Path
from service.data.dataset import prepare
from service.data import decode
from tests.specs import spec_for
decode.import_codecs()
cases = json.loads(sys.argv[1])
results = {}
for name, (uri, dataset, cache) in cases.items():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            prepare(spec_for(uri, **dataset), Path(cache))
            outcome = ""
        except Exception as e:
            outcome = type(e).__name__ + ": " + str(e)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        os.write(w, json.dumps([peak, outcome]).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 20):
        data += chunk
    _, status = os.waitpid(pid, 0)
    peak, outcome = json.loads(data) if data else (0, "")
    results[name] = {"status": status, "peak": peak, "outcome": outcome}
print(json.dumps(results))
"""


def _tar_gz(path: Path, root: Path, long_name_bytes: int = 0) -> Path:
    """``root`` as a .tar.gz; with ``long_name_bytes``, first a GNU long-name header of that
    size (streamed: never held in memory here)."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as gz:
        if long_name_bytes:
            head = tarfile.TarInfo("././@LongLink")
            head.type, head.size = tarfile.GNUTYPE_LONGNAME, long_name_bytes
            gz.write(head.tobuf(format=tarfile.GNU_FORMAT))
            piece = b"a" * (1 << 20)
            for i in range(0, long_name_bytes, len(piece)):
                gz.write(piece[: min(len(piece), long_name_bytes - i)])
            gz.write(b"\0" * (-long_name_bytes % 512))
            member = tarfile.TarInfo("x")
            gz.write(member.tobuf(format=tarfile.GNU_FORMAT))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            tf.add(root, arcname="d")
        gz.write(buf.getvalue())
    return path


def _huge_png(side: int = 6000) -> bytes:
    """A ``side`` x ``side`` 16-bit RGBA PNG of zeros (288 MB decoded, ~0.3 MB encoded)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    z = zlib.compressobj(9)
    row = b"\0" * (1 + side * 8)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _npz(path: Path, n: int, side: int) -> Path:
    images = np.zeros((n, side, side, 3), dtype=np.uint8)  # calloc'd: costs this process ~0
    labels = np.arange(n, dtype=np.int64) % 2
    np.savez_compressed(path, images=images, labels=labels)
    return path


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("hostile")
    good = make_imagefolder(tmp / "good", GOOD)
    png = make_imagefolder(tmp / "png", GOOD)
    (png / "train/a/huge.png").write_bytes(_huge_png())
    zeros = tmp / "zeros.zip"
    with zipfile.ZipFile(zeros, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(good.rglob("*.png")):
            zf.write(f, f"d/{f.relative_to(good)}")
        with zf.open("d/train/a/zeros.png", "w", force_zip64=True) as out:
            for _ in range(128):
                out.write(b"\0" * (1 << 20))
    cases = {
        "tar-benign": (str(_tar_gz(tmp / "good.tar.gz", good)), {}),
        "tar-long-name": (str(_tar_gz(tmp / "long.tar.gz", good, 96 << 20)), {}),
        "png-benign": (str(good), {}),
        "png-6000-rgba16": (str(png), {}),
        "npz-benign": (str(_npz(tmp / "good.npz", 64, 16)), {"test_fraction": 0.25}),
        "npz-zeros": (str(_npz(tmp / "zeros.npz", 150, 1000)), {"test_fraction": 0.25}),
        "zip-zeros": (str(zeros), {}),
    }
    args = {k: (uri, ds, str(tmp / f"cache-{k}")) for k, (uri, ds) in cases.items()}
    code = [sys.executable, "-c", DRIVER, json.dumps(args)]
    r = run(code, tmp / "cache", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    for k, v in out.items():
        v["cache"] = Path(args[k][2])
        v["input_bytes"] = (
            sum(f.stat().st_size for f in Path(args[k][0]).rglob("*") if f.is_file())
            or Path(args[k][0]).stat().st_size
        )
    return out


@pytest.mark.parametrize(
    ("hostile", "benign"),
    [
        ("tar-long-name", "tar-benign"),
        ("png-6000-rgba16", "png-benign"),
        ("npz-zeros", "npz-benign"),
        ("zip-zeros", "tar-benign"),
    ],
)
def test_peak_memory_of_a_hostile_input_stays_near_a_benign_one(measured, hostile, benign):
    h, b = measured[hostile], measured[benign]
    assert h["status"] == 0 and b["status"] == 0, (h, b)  # no signal, no crash
    assert b["outcome"] == "", b
    over = h["peak"] - b["peak"]
    said = h["outcome"][:300]
    assert over < MARGIN_BYTES, f"{hostile}: {over / 2**20:.0f} MiB over {benign} ({said})"
    assert len(h["outcome"]) < MAX_MESSAGE_CHARS + 40, h["outcome"][:300]


def test_a_long_tar_header_is_refused_naming_the_archive(measured):
    out = measured["tar-long-name"]["outcome"]
    assert out.startswith("UserError: long.tar.gz: refusing a GNU long name of 100663296 bytes")


def test_a_huge_png_is_refused_naming_it_and_the_limit(measured):
    out = measured["png-6000-rgba16"]["outcome"]
    assert (
        "train/a/huge.png: 6000x6000 RGBA decodes to 144000000 bytes, above the per-image " in out
    )


def test_a_huge_npz_of_zeros_trains_from_rows_on_disk(measured):
    assert measured["npz-zeros"]["outcome"] == ""  # a valid dataset: prepared, not refused
    assert measured["npz-zeros"]["input_bytes"] < 2 << 20


def test_a_refused_archive_leaves_nothing_extracted(measured):
    z = measured["zip-zeros"]
    assert "train/a/zeros.png: a file of more than 67108864 bytes" in z["outcome"], z["outcome"]
    left = sum(f.stat().st_size for f in z["cache"].rglob("*") if f.is_file())
    assert left < 1 << 20, f"{left} bytes left in the cache"
    assert not (z["cache"] / "extracted").exists() or not any((z["cache"] / "extracted").iterdir())
