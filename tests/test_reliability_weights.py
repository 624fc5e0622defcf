"""Weights and checkpoints are data, never code (issue 8, point 7).

Files are read only with safetensors or ``torch.load(weights_only=True)``. A pickle that would
run code when loaded — the classic ``__reduce__`` payload — is refused wherever it can enter:
as the newest checkpoint of a run, as ``backbone.weights`` disguised as a .safetensors file,
as a .pth given to ``backbones weights push``; and the spec refuses pickle weight paths.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from service.cli import app
from service.errors import EXIT_USER
from service.storage.local import LocalStore
from tests.fixtures.faults import tiny_spec
from tests.specs import write_spec
from tests.trainutil import error_lines

REPO = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this runs ``touch <marker>``: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"format": 1, "state": _Payload(marker), "model": {}}, buf)
    return buf.getvalue()


def test_the_payload_is_live_when_unpickled_unsafely(tmp_path):
    """The control: without weights_only the file does run code (so the tests below mean it)."""
    marker = tmp_path / "pwned"
    torch.load(io.BytesIO(_evil_pickle(marker)), weights_only=False)
    assert marker.exists()


def test_a_code_carrying_pickle_as_the_newest_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    spec = tiny_spec(tmp_path, "planted", epochs=1)
    store = LocalStore(f"{spec.output.uri}/{spec.run_id}")
    store.write_bytes("checkpoints/ckpt-00099-000000.pt", _evil_pickle(marker))
    r = CliRunner().invoke(
        app, ["run", str(write_spec(tmp_path, spec)), "--cache-dir", str(tmp_path / "cache")]
    )
    assert not marker.exists(), "the checkpoint's code ran"
    assert r.exit_code == EXIT_USER, (r.output, r.exception)
    lines = error_lines(r.stderr)  # the log's lines aside
    assert len(lines) == 1, lines
    assert lines == [
        f"error: {store.uri.rstrip('/')}/checkpoints/ckpt-00099-000000.pt: refused: the "
        "checkpoint holds objects other than tensors and plain containers (it was not written "
        "by backbones); delete it to start over"
    ]
    assert "summary.json" not in store.list("")
    assert json.loads(store.read_bytes("status.json"))["phase"] == "Failed"


def test_a_pickle_disguised_as_safetensors_weights_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "resnet.safetensors"
    weights.write_bytes(_evil_pickle(marker))
    spec = tiny_spec(tmp_path, "disguised", epochs=1)
    doc = json.loads(spec.to_json())
    doc["backbone"]["weights"] = str(weights)
    path = write_spec(tmp_path, doc, "disguised.json")
    r = CliRunner().invoke(app, ["run", str(path), "--cache-dir", str(tmp_path / "cache")])
    assert not marker.exists()
    assert r.exit_code == EXIT_USER, r.output
    lines = error_lines(r.stderr)  # the log's lines aside
    assert lines == [
        f"error: backbone.weights: {weights}: not a readable safetensors file "
        "(Error while deserializing header: header too large)"
    ]


def test_weights_push_of_a_code_carrying_pth_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "model.pth"
    src.write_bytes(_evil_pickle(marker))
    r = CliRunner().invoke(app, ["weights", "push", str(src), str(tmp_path / "out") + "/"])
    assert not marker.exists()
    assert r.exit_code == EXIT_USER, r.output
    assert r.stderr.strip() == (
        f"error: {src}: cannot load as a plain state dict (weights_only=True): UnpicklingError"
    )
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("weights", ["/models/resnet50.pth", "s3://models/vit.bin"])
def test_the_spec_refuses_pickle_weight_files(tmp_path, weights):
    doc = json.loads(tiny_spec(tmp_path, "pickled").to_json())
    doc["backbone"]["weights"] = weights
    path = write_spec(tmp_path, doc, "s.json")
    r = CliRunner().invoke(app, ["validate", str(path)])
    assert r.exit_code == EXIT_USER
    [line] = [x for x in r.output.splitlines() if "backbone.weights" in x]
    assert line.endswith(
        f"got {weights!r} (pickle checkpoints are not loaded: convert to safetensors)"
    )


def _calls(text: str, opening: str) -> list[str]:
    """Each ``opening...)`` call in ``text``, up to its matching parenthesis."""
    out = []
    for m in re.finditer(re.escape(opening), text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.start() : i])
    return out


def test_every_load_in_the_service_is_a_safe_one():
    """No unsafe deserialiser anywhere in service/: torch.load always with weights_only=True,
    no pickle, no numpy allow_pickle=True."""
    bad = []
    for path in sorted((REPO / "service").rglob("*.py")):
        text = path.read_text()
        for call in _calls(text, "torch.load("):
            if "weights_only=True" not in call:
                bad.append(f"{path.name}: {call}")
        for pattern in (r"\bpickle\.loads?\(", r"allow_pickle\s*=\s*True", r"\bjoblib\.load\("):
            bad += [f"{path.name}: {m[0]}" for m in re.finditer(pattern, text)]
    assert bad == []
