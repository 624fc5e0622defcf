"""Scheduling fields a platform team needs (issue 23, point 6): pod priority without Kueue,
image pull secrets, a RuntimeClass, extra annotations, node disk requested as
ephemeral-storage, the pull policy of digest-pinned images, and the /dev/shm warning.

Each field: its schema, its render, the strict 1.29 / 1.34 / newest schemas, and checkov.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from service.k8s.render import render_job, to_yaml
from service.spec import parse_spec
from tests import specs
from tests.specs import write_spec
from tests.test_k8s_manifests import (
    NEWEST,
    OLDEST,
    ROOT,
    checkov_binary,
    kustomize_build,
    skips,
    validate,
)

PLATFORM = {
    "priority_class_name": "research-high",
    "image_pull_secrets": ["ghcr-pull", "mirror-pull"],
    "runtime_class_name": "nvidia",
    "annotations": {"cost.example.com/team": "vision", "sidecar.istio.io/inject": "false"},
}
DIGEST = "ghcr.io/backbones/backbones@sha256:" + "1" * 64


def finetune(**resources) -> dict:
    return specs.finetune(
        specs.ON_S3,
        name="q",
        storage={"credentials_secret": "s3-credentials"},
        resources=resources,
    )


def study(**resources) -> dict:
    return specs.study(
        specs.STUDY_ON_S3,
        name="grid",
        seeds=[0, 1],
        storage={"credentials_secret": "s3-credentials"},
        resources=resources,
    )


def job_of(data: dict, **kw) -> dict:
    return render_job(parse_spec(data), **kw)


def backbones(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    """The console script's code in a fresh process (this worktree's, through PYTHONPATH)."""
    return subprocess.run(
        [sys.executable, "-c", "from service.cli import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
    )


# ---- render ---------------------------------------------------------------------------------


def test_priority_pull_secrets_runtime_class_and_annotations_reach_the_pod():
    job = job_of(finetune(**PLATFORM))
    pod = job["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "research-high"
    assert pod["imagePullSecrets"] == [{"name": "ghcr-pull"}, {"name": "mirror-pull"}]
    assert pod["runtimeClassName"] == "nvidia"
    for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
        assert meta["annotations"]["cost.example.com/team"] == "vision"
        assert meta["annotations"]["sidecar.istio.io/inject"] == "false"
        assert meta["annotations"]["backbones.dev/spec-hash"]  # ours stay


def test_pod_priority_needs_no_kueue_queue():
    job = job_of(finetune(priority_class_name="research-high"))
    assert "suspend" not in job["spec"]
    assert not any(k.startswith("kueue.x-k8s.io/") for k in job["metadata"]["labels"])
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "research-high"


def test_unset_platform_fields_are_left_out():
    pod = job_of(finetune())["spec"]["template"]["spec"]
    assert not {"priorityClassName", "imagePullSecrets", "runtimeClassName"} & set(pod)


def test_the_cache_and_tmp_are_requested_and_limited_as_ephemeral_storage():
    job = job_of(finetune(cache_size="100Gi", tmp_size="10Gi"))
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    # 100Gi cache + 10Gi /tmp + 1Gi for the container's logs
    assert c["resources"]["requests"]["ephemeral-storage"] == "111Gi"
    assert c["resources"]["limits"]["ephemeral-storage"] == "111Gi"
    volumes = {v["name"]: v["emptyDir"] for v in pod["volumes"]}
    assert volumes["cache"] == {"sizeLimit": "100Gi"}
    assert volumes["tmp"] == {"sizeLimit": "10Gi"}


def test_mixed_units_add_up_exactly():
    (c,) = job_of(finetune(cache_size="512Mi", tmp_size="1G"))["spec"]["template"]["spec"][
        "containers"
    ]
    # 512 MiB + 10^9 B + 1 GiB is not a whole number of KiB: whole bytes, exact.
    assert c["resources"]["requests"]["ephemeral-storage"] == str(512 * 2**20 + 10**9 + 2**30)


def test_a_digest_pinned_image_is_pulled_if_not_present_and_a_tag_always():
    (by_digest,) = job_of(finetune(), image=DIGEST)["spec"]["template"]["spec"]["containers"]
    (by_tag,) = job_of(finetune())["spec"]["template"]["spec"]["containers"]
    assert by_digest["imagePullPolicy"] == "IfNotPresent"
    assert by_tag["imagePullPolicy"] == "Always"


@pytest.mark.parametrize("version", [OLDEST, "1.34", NEWEST])
@pytest.mark.parametrize("make", [finetune, study], ids=["finetune", "study"])
def test_every_new_field_passes_the_strict_schema(make, version):
    validate(job_of(make(**PLATFORM, cache_size="20Gi")), version)
    validate(job_of(make(**PLATFORM), image=DIGEST), version)


# ---- schema and validation ------------------------------------------------------------------


def test_the_new_fields_are_in_the_committed_json_schema():
    for name in ("finetune", "study"):
        schema = json.loads((ROOT / "jobspecs" / "schema" / f"{name}.schema.json").read_text())
        props = schema["$defs"]["Resources"]["properties"]
        for field in (*PLATFORM, "tmp_size"):
            assert props[field]["description"], field


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "priority_class_name",
            "High Priority",
            "must be a Kubernetes object name (DNS-1123 subdomain), got 'High Priority'",
        ),
        (
            "image_pull_secrets",
            ["ok", "Not_OK"],
            "must be a Kubernetes object name (DNS-1123 subdomain), got 'Not_OK'",
        ),
        ("tmp_size", "10GB", "must be a Kubernetes quantity such as '32Gi', '512Mi', got '10GB'"),
        (
            "annotations",
            {"backbones.dev/spec-hash": "x"},
            "'backbones.dev/spec-hash': keys under backbones.dev/ are set by backbones itself",
        ),
        (
            "annotations",
            {"bad key": "x"},
            "'bad key' is not a valid annotation key ([prefix/]name, name at most 63 characters "
            "of letters, digits, '-', '_', '.')",
        ),
    ],
)
def test_a_value_the_api_server_would_refuse_is_one_line_and_exit_2(
    tmp_path, field, value, message
):
    path = write_spec(tmp_path, finetune(**{field: value}), "spec.json")
    out = backbones("validate", str(path))
    assert out.returncode == 2
    assert out.stderr.strip() == f"{path}: resources.{field}: {message}"
    assert "Traceback" not in out.stderr


def test_validate_warns_when_dev_shm_exceeds_the_memory_limit(tmp_path):
    path = write_spec(tmp_path, finetune(memory="4Gi", shm_size="8Gi"), "spec.json")
    out = backbones("validate", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"ok: {path}")
    assert out.stderr.strip() == (
        f"warning: {path}: resources.shm_size: 8Gi of /dev/shm exceeds resources.memory (4Gi); "
        "/dev/shm is memory-backed and counts against that limit, so the pod is OOMKilled "
        "before /dev/shm fills: lower shm_size or raise memory"
    )
    fits = write_spec(tmp_path, finetune(memory="32Gi", shm_size="8Gi"), "fits.json")
    assert backbones("validate", str(fits)).stderr == ""


def test_render_warns_about_dev_shm_too(tmp_path):
    path = write_spec(tmp_path, finetune(memory="1Gi", shm_size="1536Mi"), "spec.json")
    out = backbones("render", str(path))
    assert out.returncode == 0, out.stderr
    assert "warning: resources.shm_size: 1536Mi of /dev/shm exceeds" in out.stderr


def test_the_shipped_jobspecs_draw_no_shm_warning():
    out = backbones("validate", *sorted(str(p) for p in (ROOT / "jobspecs").glob("*.json")))
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr


# ---- RBAC -----------------------------------------------------------------------------------


def test_submitters_may_get_and_watch_pods_for_kubectl_describe_get_w_and_wait():
    role = yaml.safe_load((ROOT / "k8s" / "rbac.yaml").read_text().split("\n---\n")[0])
    assert role["kind"] == "Role"
    verbs = {v for rule in role["rules"] if "pods" in rule["resources"] for v in rule["verbs"]}
    assert {"get", "list", "watch"} <= verbs


# ---- checkov --------------------------------------------------------------------------------


def test_a_job_with_every_new_field_is_checkov_clean(tmp_path):
    binary = checkov_binary()
    for i, job in enumerate(
        [job_of(finetune(**PLATFORM)), job_of(study(**PLATFORM), image=DIGEST)]
    ):
        (tmp_path / f"job{i}.yaml").write_text(to_yaml(job))
    # The base's NetworkPolicies select these pods (CKV2_K8S_6 reads them from the folder).
    base = kustomize_build()
    (tmp_path / "base.yaml").write_text(yaml.safe_dump_all(base, sort_keys=False))
    out = subprocess.run(
        [binary, "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode in (0, 1), out.stderr[-2000:]
    report = json.loads(out.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = {c["check_id"] for r in reports for c in r["results"]["failed_checks"]}
    passed = {c["check_id"] for r in reports for c in r["results"]["passed_checks"]}
    assert not failed - set(skips()), failed
    # The checks these fields touch ran and passed: requests/limits and the pull policy.
    assert {"CKV_K8S_10", "CKV_K8S_11", "CKV_K8S_12", "CKV_K8S_13"} <= passed


def _env(job: dict) -> dict[str, str]:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in c["env"]}


@pytest.mark.parametrize(
    "cpu, gpus, threads", [("8", 1, "8"), ("32", 4, "8"), ("500m", 0, "1"), ("3", 2, "1")]
)
def test_threads_are_bounded_by_the_pods_cpu_limit_shared_among_its_ranks(cpu, gpus, threads):
    """torch and inductor size their pools by the node's cores (96 on a GPU node), which a
    cgroup quota of a few CPUs turns into thrashing; torchrun would force 1 per rank."""
    env = _env(job_of(finetune(cpu=cpu, gpus=gpus)))
    assert env["OMP_NUM_THREADS"] == env["TORCHINDUCTOR_COMPILE_THREADS"] == threads


def test_gpu_pods_log_nccl_warnings_and_grow_allocator_segments():
    gpu, cpu = _env(job_of(finetune(gpus=2))), _env(job_of(finetune(gpus=0)))
    assert gpu["NCCL_DEBUG"] == "WARN"
    assert gpu["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "NCCL_DEBUG" not in cpu and "PYTORCH_CUDA_ALLOC_CONF" not in cpu
