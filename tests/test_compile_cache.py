"""torch.compile once per backbone and shape: the second cell's fresh process loads the first
cell's compiled artifacts from the output store.

Two cells of the same backbone and shape (seeds 0 and 1), each a fresh worker process with its own
empty inductor, Triton and data caches, as two pods are. Stand-ins: inductor compiles for the
CPU here (``BACKBONES_COMPILE_ON_CPU=1``; a GPU pod compiles Triton kernels, which the same
artifacts carry), and the store is a local folder, not S3 (the cache is a key of any Store).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from service.train import compile_cache
from tests.specs import tiny_spec
from tests.trainutil import run_dir, run_worker

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="inductor on the CPU needs a C compiler",
)


def _cell(tmp_path: Path, seed: int, monkeypatch) -> tuple[dict, float]:
    spec = tiny_spec(tmp_path, f"cc{seed}", compile=True, seed=seed, max_epochs=1)
    spec_path = tmp_path / f"cc{seed}.json"
    spec_path.write_text(spec.to_json())
    fresh = tmp_path / f"torch-{seed}"  # a pod's empty local caches
    for var, sub in (
        ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
        ("TRITON_CACHE_DIR", "triton"),
        ("TMPDIR", "tmp"),
    ):
        (fresh / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(fresh / sub))
    monkeypatch.setenv("BACKBONES_COMPILE_ON_CPU", "1")
    start = time.perf_counter()
    done = run_worker(tmp_path, spec_path, cache=tmp_path / f"cache-{seed}", timeout=600)
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    env = json.loads((run_dir(spec) / "env.json").read_text())
    summary = json.loads((run_dir(spec) / "summary.json").read_text())
    return {**env["compile"], "train_seconds": summary.get("train_seconds")}, wall


def test_second_cell_loads_the_first_cells_compile_cache(tmp_path, monkeypatch):
    first, first_wall = _cell(tmp_path, 0, monkeypatch)
    second, second_wall = _cell(tmp_path, 1, monkeypatch)
    assert first["used"] is True, first
    assert first["cache"] == "miss", first
    stored = list((tmp_path / "runs" / compile_cache.CACHE_PREFIX).glob("*.bin"))
    assert len(stored) == 1, stored
    assert second["cache"] == "hit", second
    # Quoted, never asserted (docs/performance.md): wall of each fresh process and its training.
    print(
        f"compile cache: first (miss) {first_wall:.1f} s wall, train {first['train_seconds']} s; "
        f"second (hit) {second_wall:.1f} s wall, train {second['train_seconds']} s"
    )


def test_a_broken_store_never_fails_a_run(caplog):
    """A store that cannot be read or written: the cache says 'error' and warns once."""

    class Broken:
        def exists(self, key):
            raise OSError("store down")

        def write_bytes(self, key, data):
            raise OSError("store down")

    key = compile_cache.cache_key(
        model="m", input_shape=(3, 8, 8), dtype="float32", torch_version="t", device="d"
    )
    cache = compile_cache.CompileCache(Broken(), key)
    assert cache.load() == "error"
    cache.save()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings


def test_the_key_names_model_shape_dtype_torch_and_device():
    base = dict(model="m", input_shape=(3, 8, 8), dtype="float32", torch_version="t", device="d")
    names = {json.dumps(compile_cache.cache_key(**base))}
    for field, other in [
        ("model", "n"),
        ("input_shape", (3, 16, 16)),
        ("dtype", "bfloat16"),
        ("torch_version", "u"),
        ("device", "e"),
    ]:
        names.add(json.dumps(compile_cache.cache_key(**{**base, field: other})))
    assert len(names) == 6
