"""One corrupt image never takes a process down (issue 22, point 2), in fresh processes.

Before the fix a PNG whose IDAT was damaged (a flipped byte: CRC error and a corrupt zlib
stream) killed ``backbones run`` with SIGSEGV (exit -11 / 139, no file named, status.json left
at Downloading): torchvision's libpng error handler crashes instead of raising. The decoder is
native code, so only a fresh process shows it: every check here runs one.

The fuzz corpus: 200 mutated PNG, JPEG, TIFF and WebP files (seeded: bit flips, truncation, a
corrupted chunk whose CRC is recomputed so it gets past the CRC check to the decoder), next to
good images in one ImageFolder, taken through ``dataset inspect``, ``dataset push``, training's
own decode of every file and ``backbones run``. Each process: no signal, and every failure names
its file; and the three verdicts (inspect, push, training) are the same set of files, because
they are one function (``service.data.decode.decode_to_rgb``).
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.storage.local import LocalStore
from tests.data_factory import image_bytes, make_imagefolder
from tests.fixtures.faults import backbones, run, tiny_spec
from tests.specs import write_spec

FORMATS = {"PNG": "png", "JPEG": "jpg", "TIFF": "tif", "WEBP": "webp"}
PER_FORMAT = 50  # 200 files in all


def _chunks(png: bytes) -> list[tuple[int, bytes, bytes]]:
    """(offset, type, body) of every PNG chunk."""
    out, pos = [], 8
    while pos + 8 <= len(png):
        (n,) = struct.unpack(">I", png[pos : pos + 4])
        out.append((pos, png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + n]))
        pos += 12 + n
    return out


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _replace_idat(png: bytes, body: bytes) -> bytes:
    """``png`` with its (single) IDAT's body replaced, and the CRC made right for it."""
    pos, kind, old = next(c for c in _chunks(png) if c[1] == b"IDAT")
    return png[:pos] + _chunk(kind, body) + png[pos + 12 + len(old) :]


def _png(seed: int = 3) -> bytes:
    return image_bytes(seed, size=(16, 12))


def idat_crc_error() -> bytes:
    """One flipped byte inside IDAT, CRC left as it was: the crash of the issue."""
    data = bytearray(_png())
    pos = bytes(data).find(b"IDAT")
    data[pos + 6] ^= 0xFF
    return bytes(data)


def idat_corrupt_zlib() -> bytes:
    """A zlib stream with a bad block type, under a correct CRC."""
    _, _, body = next(c for c in _chunks(_png()) if c[1] == b"IDAT")
    return _replace_idat(_png(), body[:2] + bytes([body[2] | 0x06]) + body[3:])


def idat_short() -> bytes:
    """A valid zlib stream holding half the rows the header promises, under a correct CRC."""
    raw = zlib.decompress(next(c for c in _chunks(_png()) if c[1] == b"IDAT")[2])
    return _replace_idat(_png(), zlib.compress(raw[: len(raw) // 2]))


def _mutate(data: bytes, fmt: str, k: int) -> bytes:
    rng = np.random.default_rng(k)
    d = bytearray(data)
    how = k % 3
    if how == 0:  # bit flips
        for _ in range(int(rng.integers(1, 5))):
            p = int(rng.integers(8, len(d)))
            d[p] ^= 1 << int(rng.integers(0, 8))
    elif how == 1:  # truncation
        d = d[: int(rng.integers(8, len(d)))]
    elif fmt == "PNG":  # a corrupted IDAT that passes the CRC check
        body = bytearray(next(c for c in _chunks(data) if c[1] == b"IDAT")[2])
        p = int(rng.integers(0, len(body)))
        body[p : p + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        return _replace_idat(data, bytes(body))
    else:  # a run of random bytes in the middle (a damaged segment or tile)
        p, n = int(rng.integers(8, len(d))), int(rng.integers(1, 16))
        d[p : p + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return bytes(d)


def _base(fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """An ImageFolder: good images in train/ and test/, and the 200 mutated files (plus the
    three PNGs of the issue) in train/a and train/b."""
    root = make_imagefolder(
        tmp_path_factory.mktemp("fuzz") / "fuzz",
        {"train": {"a": 3, "b": 3}, "test": {"a": 2, "b": 2}},
        size=(16, 12),
    )
    k = 0
    for fmt, ext in FORMATS.items():
        for i in range(PER_FORMAT):
            k += 1
            cls = "ab"[k % 2]
            data = _mutate(_base(fmt, k), fmt, k)
            (root / "train" / cls / f"m_{fmt.lower()}_{i:02d}.{ext}").write_bytes(data)
    for make in (idat_crc_error, idat_corrupt_zlib, idat_short):
        (root / "train/a" / f"issue_{make.__name__}.png").write_bytes(make())
    return root


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _no_signal(r: subprocess.CompletedProcess) -> None:
    assert r.returncode >= 0 and r.returncode < 128, (r.returncode, r.stderr[-2000:])


# One fresh process takes the corpus through the CLI's ``dataset inspect --json`` and ``dataset
# push`` (typer's runner: the commands' own code) and through training's decode of every file
# (the function ``_decode_all`` calls). Fresh, because a crash in native code only shows there;
# one process for the three, because importing torch takes most of a process's time.
THREE_VERDICTS = """
import json, sys, tarfile
from pathlib import Path
from typer.testing import CliRunner
from service.cli import app
from service.data import decode
root, dest = Path(sys.argv[1]), Path(sys.argv[2])
inspect = CliRunner().invoke(app, ["dataset", "inspect", str(root), "--json"])
push = CliRunner().invoke(app, ["dataset", "push", str(root), str(dest)])
packed = []
for shard in sorted((dest / "shards").glob("*.tar")):
    with tarfile.open(shard) as tf:
        packed += [shard.name.split("-")[0] + "/" + m.name for m in tf.getmembers()]
decode.import_codecs()
training = {}
for rel in json.loads(sys.argv[3]):
    try:
        decode.decode((root / rel).read_bytes(), rel, (16, 16))
    except decode.Undecodable as e:
        training[rel] = str(e)
print(json.dumps({
    "inspect": [inspect.exit_code, inspect.stdout], "push": [push.exit_code, push.stdout],
    "packed": packed, "training": training,
}))
"""


@pytest.fixture(scope="module")
def verdicts(corpus, tmp_path_factory) -> dict:
    """What inspect, push and training each say is undecodable: {file: message}."""
    tmp = tmp_path_factory.mktemp("verdicts")
    files = _files(corpus)
    code = [sys.executable, "-c", THREE_VERDICTS, str(corpus), str(tmp / "pushed")]
    r = run([*code, json.dumps(files)], tmp / "cache")
    _no_signal(r)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.splitlines()[-1])
    (inspect_rc, inspect_out), (push_rc, push_out) = out["inspect"], out["push"]
    assert inspect_rc == 0 and push_rc == 0, (inspect_out, push_out)
    inspect = {u["file"]: u["error"] for u in json.loads(inspect_out)["undecodable"]}
    push = {f: "left out" for f in files if f not in set(out["packed"])}
    return {"training": out["training"], "inspect": inspect, "push": push, "stdout": push_out}


def test_the_corpus_has_both_decodable_and_undecodable_mutants(corpus, verdicts):
    bad = set(verdicts["training"])
    mutants = [f for f in _files(corpus) if "/m_" in f]
    assert len(mutants) == 4 * PER_FORMAT
    for fmt in FORMATS:  # every format has failures to report
        assert any(f"m_{fmt.lower()}_" in f for f in bad), fmt
    assert len(bad) < len(mutants)  # and some mutants still decode (a flipped pixel bit)
    for name in ("idat_crc_error", "idat_corrupt_zlib", "idat_short"):
        assert f"train/a/issue_{name}.png" in bad


def test_inspect_push_and_training_give_one_verdict(verdicts):
    assert set(verdicts["inspect"]) == set(verdicts["training"])
    assert set(verdicts["push"]) == set(verdicts["training"])
    n = len(verdicts["training"])
    assert f"left out {n} undecodable file(s): " in verdicts["stdout"]


def test_every_failure_names_its_file(verdicts):
    training, inspect = verdicts["training"], verdicts["inspect"]
    assert len(training) > 20 and len(inspect) == len(training)
    for rel, msg in training.items():
        assert msg.startswith(f"{rel}: ") and len(msg) > len(rel) + 2, msg
    for rel, msg in inspect.items():
        assert msg and training[rel].endswith(msg), (rel, msg)


def test_a_run_over_the_corpus_exits_2_naming_the_first_bad_file(corpus, verdicts, tmp_path):
    """The whole worker (``backbones worker``, the container's entry point), fresh: exit 2, one
    line naming the first undecodable file in catalog order, status.json Failed with it."""
    spec = tiny_spec(tmp_path, "fuzz", dataset=str(corpus), epochs=1)
    r = run(backbones("worker", "--spec", str(write_spec(tmp_path, spec))), tmp_path / "cache")
    _no_signal(r)
    assert r.returncode == 2, r.stderr[-2000:]
    train_a = sorted(f for f in verdicts["training"] if f.startswith("train/a/"))
    first = train_a[0]
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert errors == [f"error: {corpus}: {verdicts['training'][first]}"]
    status = json.loads(LocalStore(f"{spec.output.uri}/{spec.run_id}").read_bytes("status.json"))
    assert status["phase"] == "Failed" and first in status["error"]
