"""How fast a backbone trains, and what a cell costs besides training: the budget's inputs.

Training speed, first that applies:

1. **Calibrated**: ``backbones budget --calibrate`` measured it on this GPU model and stored the
   table at ``<output.uri>/.cache/throughput/<device>.json`` (``save_table``/``load_tables``);
   an estimate uses a table whose device name matches the reference GPU (``matches``).
2. **timm's training benchmark** (``throughput.json``, package data): images/s of each model
   relative to ResNet-50 on one RTX 3090 with AMP, anchored to the reference GPU's ResNet-50
   figure. Measured speed, so a Swin-T or RegNetY costs what it runs at, not what its GMACs say.
3. **GMACs**: the catalog's forward GMACs against ResNet-50's (the budget's older rule), for a
   model in neither; ``validate`` and ``budget`` say which models fell back.

Every figure scales with pixels from the size it was measured at to the dataset's image size,
and is capped by the reference GPU's ceiling for tiny models.

A cell also pays **overhead**: process start and imports, dataset fetch and decode, model build
and weights, the micro-batch probe, compile warm-up and uploads (``OVERHEAD_SECONDS``, a
documented default; a calibration's measured build time and finished cells' measured wall
replace it where known). Evaluation is counted with training (each epoch's validation and the
test pass). Torch-free: ``validate`` calls it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import time
from importlib import resources

# Seconds one cell's pod spends outside its epochs, by phase: assumptions for a GPU node with the
# image already pulled, a dataset of a few thousand images on S3 and ImageNet weights from the
# Hub; replaced by measured figures when known (docs/performance.md "What a cell costs").
OVERHEAD_SECONDS = {
    "start": 20.0,  # process start, imports, CUDA context
    "fetch_decode": 60.0,  # download the dataset, decode it into the cache
    "build": 15.0,  # model build and pretrained weights
    "probe": 15.0,  # micro-batch probe ('auto' on a GPU)
    "upload": 10.0,  # checkpoints, best weights, summary
}
COMPILE_SECONDS = 60.0  # torch.compile warm-up, when protocol.compile (a cache hit costs less)

TABLE_PREFIX = ".cache/throughput/"


@functools.cache
def timm_table() -> dict:
    """The packaged benchmark: ``{"source": {...}, "anchor": "resnet50", "rows": {model:
    [train images/s, train image size]}}``."""
    return json.loads(resources.files("service.cost").joinpath("throughput.json").read_text())


def timm_ratio(model: str) -> tuple[float, int] | None:
    """(images/s relative to ResNet-50, the size it was measured at), or None if not benchmarked.
    A pretrained tag (``resnet50.a1_in1k``) trains at its architecture's speed."""
    table = timm_table()
    row = table["rows"].get(model) or table["rows"].get(model.split(".")[0])
    if row is None:
        return None
    return row[0] / table["rows"][table["anchor"]][0], int(row[1])


def timm_source() -> str:
    src = timm_table()["source"]
    return f"timm {src['file']} @ {src['commit'][:10]}"


def overhead_seconds(*, compile: bool, measured: dict | None = None) -> float:
    """One cell's seconds outside its epochs: the defaults, each phase replaced by ``measured``
    (seconds by the same phase names) where it has one."""
    phases = {**OVERHEAD_SECONDS, **({"compile": COMPILE_SECONDS} if compile else {})}
    return sum({**phases, **{k: v for k, v in (measured or {}).items() if k in phases}}.values())


# --------------------------------------------------------------------------------------------
# Calibration tables: measured on one GPU model, stored beside the runs
# --------------------------------------------------------------------------------------------


def slug(device: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower() or "device"


def save_table(store, device: str, rows: dict, *, torch_version: str) -> str:
    """Write a calibration: ``rows`` is ``{model: {"images_per_second", "image_size",
    "batch_size", "build_seconds"}}``; merged over an earlier table of the same device."""
    key = f"{TABLE_PREFIX}{slug(device)}.json"
    old = {}
    with contextlib.suppress(Exception):  # none yet, or unreadable: this one is the table
        old = json.loads(store.read_bytes(key)).get("rows", {})
    doc = {
        "device": device,
        "torch": torch_version,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": {**old, **rows},
    }
    store.write_bytes(key, json.dumps(doc, indent=2, sort_keys=True).encode())
    return key


def load_tables(store) -> list[dict]:
    """Every calibration in the store; an unreadable one is skipped (an estimate never fails)."""
    out = []
    try:
        keys = [k for k in store.list(TABLE_PREFIX) if k.endswith(".json")]
    except Exception:
        return out
    for key in keys:
        try:
            out.append(json.loads(store.read_bytes(key)))
        except Exception:
            continue
    return out


def matches(device: str, reference: str) -> bool:
    """A calibrated device is the reference GPU when its name is the reference's name, or holds
    the reference's chip (``A100-80GB`` ~ ``NVIDIA A100-SXM4-80GB``)."""
    if slug(device) == slug(reference):
        return True
    chip = reference.split("-")[0].lower()
    return bool(chip) and chip in device.lower().split() + re.split(r"[^a-z0-9]+", device.lower())


def pick_table(tables: list[dict], reference: str) -> dict | None:
    return next((t for t in tables if matches(str(t.get("device", "")), reference)), None)
