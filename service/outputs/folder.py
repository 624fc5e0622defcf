"""The layout of one run's outputs, ``<output.uri>/<run id>/``, over any Store.

    spec.json            the validated spec, as the pod parsed it
    env.json             versions, device, seeds, data and weight hashes
    status.json          phase, epoch, progress, eta, attempt (rewritten as the run goes)
    metrics.jsonl        one line per epoch
    checkpoints/         ckpt-<epoch>-<step>.pt (complete ones only: each is written atomically)
    best.safetensors     weights of the selected epoch
    summary.json         final metrics and cost figures; its presence means "done"
    retries.json         retriable stops in a row without progress (service.run.retries)
    lock.json            the lease of the worker that holds the run (service.run.lease)

These names are the whole layout: ``--force`` deletes only them (``RunOutputs.wipe``), and a
folder holding anything else is not a backbones run and is never written to or wiped
(``RunOutputs.foreign``). A checkpoint, the best weights of an epoch and ``best.safetensors``
record the spec hash that wrote them (``service.train.checkpoint``).

``summary.json`` is written last: a run without it is not complete, whatever else exists.
``summary.json`` and ``status.json`` are typed and carry a ``schema_version``: their keys, and
what a reader accepts, are in ``service.outputs.contract``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from service.outputs.contract import RunStatus, RunSummary
from service.storage import NotFound, Store

SPEC = "spec.json"
ENV = "env.json"
STATUS = "status.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
BEST = "best.safetensors"
CHECKPOINTS = "checkpoints/"
RETRIES = "retries.json"
LOCK = "lock.json"
CKPT_NAME = re.compile(r"ckpt-(\d{5})-(\d{6})\.pt$")
BEST_NAME = re.compile(r"best-(\d{5})-(\d{6})\.safetensors$")
FILES = (SPEC, ENV, STATUS, METRICS, SUMMARY, BEST, LOCK, RETRIES)


def in_layout(key: str) -> bool:
    """Is ``key`` (relative to a run folder) a file the run layout names?"""
    if key in FILES:
        return True
    name = key.removeprefix(CHECKPOINTS)
    return name != key and "/" not in name and bool(CKPT_NAME.match(name) or BEST_NAME.match(name))


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


class RunOutputs:
    """Reads and writes the files of one run. ``store`` is rooted at the run's folder."""

    def __init__(self, store: Store, spec_hash: str | None = None):
        self.store = store
        self.spec_hash = spec_hash  # of the spec that writes here; stamped on weights

    def foreign(self, limit: int = 3) -> list[str]:
        """Up to ``limit`` files here that no backbones run writes (a README, ``src/``, ``.git/``):
        a folder holding any is not a run folder, whatever its ``spec.json`` says."""
        out: list[str] = []
        for key in self.store.list(""):
            if not in_layout(key):
                out.append(key)
                if len(out) >= limit:
                    break
        return out

    def wipe(self) -> list[str]:
        """Start over (``--force``): delete the files the layout names, nothing else, the lease
        excepted (the caller holds it). Returns the keys deleted."""
        keys = [k for k in self.store.list("") if in_layout(k) and k != LOCK]
        # summary.json first (the run stops looking complete), spec.json last (a wipe cut short
        # still says whose leftovers these are; checkpoints carry their spec hash anyway).
        gone = sorted(keys, key=lambda k: (k != SUMMARY, k == SPEC, k))
        for key in gone:
            self.store.delete(key)
        return gone

    @property
    def uri(self) -> str:
        return self.store.uri

    def read_json(self, key: str) -> dict | None:
        try:
            return json.loads(self.store.read_bytes(key))
        except NotFound:
            return None

    def write_json(self, key: str, obj: Any) -> None:
        self.store.write_bytes(key, _dumps(obj))

    def summary(self) -> RunSummary | None:
        """The run's summary, None until it is done. Raises contract.UnreadableOutput."""
        data = self.read_json(SUMMARY)
        return None if data is None else RunSummary.read(data, f"{self.uri}/{SUMMARY}")

    def write_summary(self, summary: RunSummary) -> None:
        self.write_json(SUMMARY, summary.to_dict())

    def status(self) -> RunStatus | None:
        data = self.read_json(STATUS)
        return None if data is None else RunStatus.read(data, f"{self.uri}/{STATUS}")

    def write_status(self, status: RunStatus) -> None:
        self.write_json(STATUS, status.to_dict())

    def metrics(self) -> list[dict]:
        try:
            text = self.store.read_bytes(METRICS).decode()
        except NotFound:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def write_metrics(self, records: list[dict]) -> None:
        # Rewritten whole each epoch (S3 has no append); a few KB even for long runs.
        self.store.write_bytes(
            METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        )

    def checkpoints(self) -> list[str]:
        """Complete checkpoint keys, oldest first (names sort by zero-padded epoch)."""
        return sorted(k for k in self.store.list(CHECKPOINTS) if k.endswith(".pt"))
