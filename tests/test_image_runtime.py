"""Opt-in (BACKBONES_IMAGE_BUILD=1, root, buildah, debootstrap): the whole image is built and the
worker runs inside it.

``scripts/build_image_local.sh --runtime`` builds the Dockerfile's runtime stage from a local
Debian base (the production default stays the CUDA PyTorch base), with the pinned torch and
torchvision from the package index. Then ``backbones worker`` runs inside the built image as user
10001, as the Job runs it (HOME and the working directory on /tmp, /cache and /tmp volumes), on a
quickstart-sized spec whose dataset and outputs live on the test SeaweedFS on loopback.

Figures (build times, image size, the worker's cold start from process start to its first
training step) are printed; docs/kubernetes.md quotes them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.data_factory import digits_tree

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "build_image_local.sh"
STATE = Path(os.environ.get("BACKBONES_BUILDAH_DIR", ROOT / "build" / "buildah"))
IMAGE = "localhost/backbones:test"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(5400),  # the suite's 600 s would kill a cold build midway
    pytest.mark.skipif(
        os.environ.get("BACKBONES_IMAGE_BUILD") != "1",
        reason="slow (~35 min cold, up to ~40 GB of vfs storage): set BACKBONES_IMAGE_BUILD=1",
    ),
]


def bh(*args: str, **kw) -> subprocess.CompletedProcess:
    cmd = ["buildah", "--storage-driver", "vfs", "--root", str(STATE / "storage")]
    cmd += ["--runroot", str(STATE / "run"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def image() -> dict:
    missing = [t for t in ("buildah", "debootstrap") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: apt-get install -y buildah debootstrap")
    if os.geteuid() != 0:
        pytest.fail("scripts/build_image_local.sh needs root")
    t0 = time.monotonic()
    built = subprocess.run(
        ["bash", str(SCRIPT), "--runtime"], capture_output=True, text=True, timeout=3600, cwd=ROOT
    )
    seconds = time.monotonic() - t0
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-4000:]
    size = re.search(r"size: (.+)", built.stdout)
    print(f"\nimage build: {seconds:.0f} s; {size and size.group(1)}\n{built.stdout}")
    return {"seconds": seconds, "stdout": built.stdout}


def test_the_worker_runs_inside_the_image_against_s3_on_loopback(
    image, tmp_path, s3_env, s3_bucket
):
    from service.data.push import push
    from service.spec import Storage

    push(
        digits_tree(tmp_path / "digits", n=1797, size=32),
        f"s3://{s3_bucket}/data/digits/",
        Storage(endpoint_url=s3_env.endpoint),
        test_fraction=0.2,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    quickstart = json.loads((ROOT / "jobspecs" / "quickstart.json").read_text())
    quickstart.pop("$schema")
    spec = {
        **quickstart,
        "dataset": {"uri": f"s3://{s3_bucket}/data/digits/", "domain": "natural"},
        "output": {"uri": f"s3://{s3_bucket}/runs/"},
        "metrics": {"port": port},
        "storage": {"endpoint_url": s3_env.endpoint},
    }
    volumes = {}
    for name in ("cache", "tmp"):
        d = tmp_path / "volumes" / name
        d.mkdir(parents=True)
        d.chmod(0o777)  # an emptyDir
        volumes[name] = d
    keys = s3_env.env()
    env = {
        "BACKBONES_SPEC": json.dumps(spec),
        "AWS_ACCESS_KEY_ID": keys["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": keys["AWS_SECRET_ACCESS_KEY"],
        "HOME": "/tmp",
        "XDG_CACHE_HOME": "/tmp/.cache",
    }
    ctr = bh("from", "-q", IMAGE).stdout.strip()
    cmd = ["buildah", "--storage-driver", "vfs", "--root", str(STATE / "storage")]
    cmd += ["--runroot", str(STATE / "run"), "run", "--isolation", "chroot"]
    cmd += ["--user", "10001:10001", "--workingdir", "/tmp"]
    cmd += ["-v", f"{volumes['cache']}:/cache", "-v", f"{volumes['tmp']}:/tmp"]
    for k, v in env.items():
        cmd += ["--env", f"{k}={v}"]
    cmd += [ctr, "--", "backbones", "worker"]
    first_step = None
    try:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None and first_step is None:
            try:
                url = f"http://127.0.0.1:{port}/metrics"
                with urllib.request.urlopen(url, timeout=2) as r:
                    body = r.read().decode()
                m = re.search(r"^backbones_train_images_total\{[^}]*\} (\S+)", body, re.M)
                if m and float(m.group(1)) > 0:
                    first_step = time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=1800)
        total = time.monotonic() - t0
    finally:
        bh("rm", ctr)
    print(
        f"\nworker in the image: first training step after {first_step} s, exit after {total:.0f} s"
    )
    print(out[-3000:])
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    assert first_step is not None
    listing = s3_env.client().list_objects_v2(Bucket=s3_bucket, Prefix="runs/quickstart/")
    found = {o["Key"].split("/", 2)[-1] for o in listing.get("Contents", [])}
    assert {"summary.json", "env.json", "best.safetensors"} <= found, found
    env_json = s3_env.client().get_object(Bucket=s3_bucket, Key="runs/quickstart/env.json")
    versions = json.loads(env_json["Body"].read())
    assert versions["torch"].startswith("2.14.1") and versions["torchvision"].startswith("0.29.1")
    # It ran as 10001: what it wrote to its cache volume is 10001's.
    owners = {p.stat().st_uid for p in volumes["cache"].rglob("*")}
    assert owners == {10001}, owners
