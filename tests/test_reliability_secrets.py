"""Secrets (issue 8, point 6): the S3 keys never appear in anything a run produces.

The whole S3 path runs with the suite's distinctive test keys in the environment, the way a pod
gets them from its Secret: `backbones dataset push`, a one-cell Study run by `backbones worker`
from $BACKBONES_SPEC (with /metrics served and pushed to a real Pushgateway), `backbones
report`, `backbones render` of a spec naming a credentials_secret, and a run with a wrong
secret. Then everything is searched for the key id and the secrets (plain and base64): every
object in the bucket, every file on local disk (cache, report), every stdout/stderr, every
/metrics scrape, the Pushgateway's exposition, the rendered manifests, the error messages.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.request
from pathlib import Path

import pytest

from service.errors import EXIT_OK, EXIT_USER
from tests.data_factory import digits_tree
from tests.fixtures.faults import backbones, run, start, stop
from tests.fixtures.prometheus import free_port
from tests.fixtures.seaweed import ADMIN
from tests.specs import TINY_PROTOCOL, study, write_spec

pytestmark = pytest.mark.integration

WRONG_SECRET = "bbtest-WRONG-secret-7f3a9c"


def _needles() -> dict[str, bytes]:
    out = {}
    for name, value in (
        ("key id", ADMIN[0]),
        ("secret", ADMIN[1]),
        ("wrong secret", WRONG_SECRET),
    ):
        out[name] = value.encode()
        out[f"{name} (base64)"] = base64.b64encode(value.encode())
    return out


def _study(tmp: Path, bucket: str, endpoint: str, metrics: dict) -> Path:
    doc = study(
        name="secrets",
        datasets=[{"uri": f"s3://{bucket}/datasets/digits/", "domain": "natural"}],
        seeds=[0],
        train_fractions=[1.0],
        protocol={**TINY_PROTOCOL, "batch_size": 32},
        output={"uri": f"s3://{bucket}/runs/"},
        storage={"endpoint_url": endpoint, "credentials_secret": "s3-credentials"},
        resources={"gpus": 0},
        metrics=metrics,
    )
    return write_spec(tmp, doc, "study.json")


class _Scraper:
    """Scrapes the worker's /metrics every 0.2 s while it runs; keeps every text it got."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.texts: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self):
        while not self._stop.wait(0.2):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    self.texts.append(r.read())
            except OSError:
                continue


def test_no_output_log_metric_manifest_or_error_contains_the_s3_keys(
    tmp_path, seaweed, s3_bucket, pushgateway
):
    keys = seaweed.env()  # ADMIN: the key id and secret every S3 test uses
    cache = tmp_path / "cache"
    seen: dict[str, bytes] = {}  # where -> content

    push = run(
        backbones(
            "dataset",
            "push",
            str(digits_tree(tmp_path / "digits", n=120, size=16)),
            f"s3://{s3_bucket}/datasets/digits/",
            "--endpoint-url",
            seaweed.endpoint,
            "--test-fraction",
            "0.2",
            "--val-fraction",
            "0.1",
            "--shard-mb",
            "1",
        ),
        cache,
        **keys,
    )
    assert push.returncode == EXIT_OK, push.stderr
    seen["push stdout+stderr"] = (push.stdout + push.stderr).encode()

    port = free_port()
    study = _study(
        tmp_path, s3_bucket, seaweed.endpoint, {"port": port, "pushgateway_url": pushgateway.url}
    )
    pod = {"BACKBONES_SPEC": study.read_text(), "JOB_COMPLETION_INDEX": "0", **keys}
    with _Scraper(port) as scraper:
        proc = start(backbones("worker"), cache, **pod)
        try:
            out, err = proc.communicate(timeout=300)
        finally:
            stop(proc)
    assert proc.returncode == EXIT_OK, err
    seen["worker stdout+stderr"] = (out + err).encode()
    assert scraper.texts, "no /metrics scrape succeeded while the worker ran"
    for i, text in enumerate(scraper.texts):
        seen[f"/metrics scrape {i}"] = text
    assert b"backbones_" in scraper.texts[-1]
    seen["pushgateway /metrics"] = pushgateway.metrics().encode()
    assert "backbones_" in seen["pushgateway /metrics"].decode()

    report = run(
        backbones(
            "report",
            f"s3://{s3_bucket}/runs/",
            "--spec",
            str(study),
            "--out",
            str(tmp_path / "report"),
            "--no-plots",
        ),
        cache,
        **keys,
    )
    assert report.returncode == EXIT_OK, report.stderr
    seen["report stdout+stderr"] = (report.stdout + report.stderr).encode()

    render = run(backbones("render", str(study), "-o", "yaml"), cache, **keys)
    assert render.returncode == EXIT_OK, render.stderr
    assert "s3-credentials" in render.stdout  # the Secret is referenced by name only
    seen["rendered manifests"] = (render.stdout + render.stderr).encode()

    wrong_env = {
        **pod,
        "AWS_SECRET_ACCESS_KEY": WRONG_SECRET,
        "BACKBONES_SPEC": study.read_text().replace("/runs/", "/runs-wrong/"),
    }
    wrong = run(backbones("worker"), cache, **wrong_env)
    assert wrong.returncode == EXIT_USER, wrong.stderr
    assert "wrong credentials" in wrong.stderr
    seen["wrong-credentials worker stdout+stderr"] = (wrong.stdout + wrong.stderr).encode()

    client = seaweed.client()
    objects = client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    assert any(o["Key"].endswith("summary.json") for o in objects)
    for o in objects:
        body = client.get_object(Bucket=s3_bucket, Key=o["Key"])["Body"].read()
        seen[f"s3://{s3_bucket}/{o['Key']}"] = body
    for f in sorted(tmp_path.rglob("*")):
        if f.is_file():
            seen[str(f)] = f.read_bytes()
    assert any("/cache/" in k for k in seen) and any("/report/" in k for k in seen)

    leaks = [
        f"{name} in {where}"
        for where, content in seen.items()
        for name, needle in _needles().items()
        if needle in content
    ]
    assert leaks == []
    # The control: the same search does find the keys where they belong (the server's config).
    assert _needles()["secret"] in seaweed.config.read_bytes()
    print(
        json.dumps(
            {
                "searched": len(seen),
                "bytes": sum(map(len, seen.values())),
                "s3_objects": len(objects),
                "scrapes": len(scraper.texts),
            }
        )
    )
