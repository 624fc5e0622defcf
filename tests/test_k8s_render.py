"""`backbones render`: a spec becomes a batch/v1 Job (a Study one Indexed Job), pure and exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import service
from service.cli import app
from service.errors import UserError
from service.k8s.render import (
    default_image,
    label_value,
    render_job,
    spec_from_job,
    warnings_for,
)
from service.spec import parse_spec
from service.spec.study import expand
from tests import specs

ROOT = Path(__file__).resolve().parent.parent


def finetune(**over) -> dict:
    """convnext_tiny with weights on S3, reading EuroSAT from S3, credentials from a Secret."""
    return specs.finetune(
        specs.ON_S3,
        {
            "name": "eurosat-convnext",
            "backbone": {"model": "convnext_tiny", "weights": "s3://w/convnext_tiny.safetensors"},
            "dataset": {"domain": "remote_sensing"},
            "storage": {"credentials_secret": "s3-credentials"},
        },
        over,
    )


def study(**over) -> dict:
    """Two backbones × EuroSAT on S3 × three seeds: six cells."""
    return specs.study(
        specs.STUDY_ON_S3,
        {
            "backbones": [{"model": "resnet50", "weights": "none"}, {"model": "convnext_tiny"}],
            "name": "rs",
            "seeds": [0, 1, 2],
        },
        over,
    )


def job_of(data: dict, **kw) -> dict:
    return render_job(parse_spec(data), **kw)


def pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def container(job: dict) -> dict:
    (c,) = pod(job)["containers"]
    return c


def env(job: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(job)["env"]}


# ---- shape ----------------------------------------------------------------------------------


def test_a_finetune_becomes_a_batch_v1_job_named_after_the_spec():
    job = job_of(finetune())
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["metadata"]["name"] == "eurosat-convnext"
    assert job["metadata"]["namespace"] == "backbones"
    assert job["spec"]["completions"] == 1
    assert "completionMode" not in job["spec"]


def test_a_study_becomes_one_indexed_job_with_a_completion_per_cell():
    job = job_of(study(resources={"parallelism": 2, "backoff_limit": 5}))
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == 6
    assert spec["parallelism"] == 2
    assert spec["backoffLimitPerIndex"] == 5
    assert spec["maxFailedIndexes"] == 3
    assert "backoffLimit" not in spec


def test_study_parallelism_defaults_to_every_cell_at_once():
    assert job_of(study())["spec"]["parallelism"] == 6


def test_the_spec_travels_in_the_job_and_parses_back_to_the_same_model():
    for data in (finetune(), study()):
        spec = parse_spec(data)
        carried = env(render_job(spec))["BACKBONES_SPEC"]
        assert carried == spec.to_json()
        assert parse_spec(json.loads(carried)) == spec
        assert spec_from_job(render_job(spec)) == spec


def test_each_study_pod_runs_the_cell_of_its_completion_index(monkeypatch):
    from service.run.worker import pick_cell, read_spec

    spec = parse_spec(study())
    monkeypatch.setenv("BACKBONES_SPEC", env(render_job(spec))["BACKBONES_SPEC"])
    cells = expand(spec)
    assert len(cells) == 6
    for index, cell in enumerate(cells):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))
        assert pick_cell(read_spec(None)) == cell


def test_output_is_ready_for_kubectl_apply_as_yaml_and_as_json(tmp_path):
    path = specs.write_spec(tmp_path, finetune())
    expected = job_of(finetune())
    as_yaml = CliRunner().invoke(app, ["render", str(path)])
    as_json = CliRunner().invoke(app, ["render", str(path), "-o", "json"])
    assert as_yaml.exit_code == 0 and as_json.exit_code == 0
    assert yaml.safe_load(as_yaml.stdout) == expected
    assert json.loads(as_json.stdout) == expected


def test_render_refuses_an_unknown_output_format(tmp_path):
    path = specs.write_spec(tmp_path, finetune())
    result = CliRunner().invoke(app, ["render", str(path), "-o", "toml"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --output: must be 'yaml' or 'json', got 'toml'"


def test_render_of_a_bad_spec_names_the_field_and_exits_2(tmp_path):
    path = specs.write_spec(tmp_path, finetune(resources={"gpus": -1}))
    result = CliRunner().invoke(app, ["render", str(path)])
    assert result.exit_code == 2
    assert "resources.gpus" in result.stderr


def test_render_never_imports_the_kubernetes_client():
    code = (
        "import sys, service.k8s.render, service.k8s.ops, service.cli.k8s_cmds; "
        "sys.exit('kubernetes' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---- the container --------------------------------------------------------------------------


def test_one_gpu_runs_the_worker_with_a_gpu_limit():
    c = container(job_of(finetune(resources={"gpus": 1})))
    assert c["command"] == ["tini", "--", "backbones", "worker"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_several_gpus_run_the_worker_under_torchrun_one_process_per_gpu():
    c = container(job_of(finetune(resources={"gpus": 4, "termination_grace_seconds": 300})))
    assert c["command"] == [
        "tini",
        "--",
        "python",
        "-m",
        "service.k8s.launch",  # torchrun that keeps a rank's exit code 2
        "--standalone",
        "--nproc-per-node=4",
        "--shutdown-timeout=290",  # ranks get the grace period to checkpoint, less a margin
        "-m",
        "service.run.worker",
    ]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"


def test_no_gpu_means_no_gpu_limit():
    c = container(job_of(finetune(resources={"gpus": 0})))
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert "nvidia.com/gpu" not in c["resources"]["requests"]


def test_cpu_memory_and_disk_requests_equal_limits():
    c = container(job_of(finetune(resources={"cpu": "6", "memory": "40Gi", "gpus": 0})))
    amounts = {"cpu": "6", "memory": "40Gi", "ephemeral-storage": "111Gi"}
    assert c["resources"] == {"requests": amounts, "limits": amounts}


def test_node_selector_tolerations_and_affinity_pass_through_unchanged():
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}
                ]
            }
        }
    }
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    p = pod(
        job_of(
            finetune(
                resources={
                    "node_selector": {"pool": "gpu"},
                    "tolerations": tolerations,
                    "affinity": affinity,
                }
            )
        )
    )
    assert p["nodeSelector"] == {"pool": "gpu"}
    assert p["tolerations"] == tolerations
    assert p["affinity"] == affinity


def test_empty_scheduling_fields_are_left_out():
    p = pod(job_of(finetune()))
    assert not {"nodeSelector", "tolerations", "affinity", "serviceAccountName"} & set(p)


def test_the_metrics_port_is_named_metrics_and_scrape_annotations_match_it():
    job = job_of(finetune(metrics={"port": 9200}))
    assert container(job)["ports"] == [
        {"name": "metrics", "containerPort": 9200, "protocol": "TCP"}
    ]
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9200"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_metrics_port_0_exposes_no_port_and_no_scrape_annotations():
    job = job_of(finetune(metrics={"port": 0}))
    assert "ports" not in container(job)
    assert "prometheus.io/scrape" not in job["spec"]["template"]["metadata"]["annotations"]


def test_s3_credentials_come_from_the_named_secret_by_reference():
    e = env(job_of(finetune()))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert e[key] == {"secretKeyRef": {"name": "s3-credentials", "key": key}}


def test_no_secret_named_means_no_credential_env():
    e = env(job_of(finetune(storage={"credentials_secret": None})))
    assert "AWS_ACCESS_KEY_ID" not in e and "AWS_SECRET_ACCESS_KEY" not in e


def test_job_identity_reaches_the_pod_through_env():
    e = env(job_of(finetune()))
    assert e["BACKBONES_IMAGE"] == default_image()
    assert e["BACKBONES_JOB"] == "eurosat-convnext"
    assert e["BACKBONES_CACHE"] == "/cache"
    assert e["BACKBONES_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert e["BACKBONES_POD"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_hub_stays_offline_unless_a_backbone_asks_for_timm_weights():
    assert env(job_of(finetune()))["HF_HUB_OFFLINE"] == "1"
    timm = finetune(backbone={"model": "convnext_tiny", "weights": "timm"})
    assert env(job_of(timm))["HF_HUB_OFFLINE"] == "0"
    assert env(job_of(study()))["HF_HUB_OFFLINE"] == "0"  # convnext_tiny defaults to timm


def test_cache_tmp_and_a_memory_backed_dev_shm_are_emptydirs():
    job = job_of(finetune(resources={"cache_size": "20Gi", "shm_size": "2Gi"}))
    assert pod(job)["volumes"] == [
        {"name": "cache", "emptyDir": {"sizeLimit": "20Gi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "10Gi"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
    ]
    assert container(job)["volumeMounts"] == [
        {"name": "cache", "mountPath": "/cache"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]


def test_pod_and_container_run_non_root_read_only_without_privileges():
    job = job_of(finetune())
    assert pod(job)["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    sc = container(job)["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod(job)["automountServiceAccountToken"] is False


def test_the_grace_period_is_the_specs_checkpoint_time():
    p = pod(job_of(finetune(resources={"termination_grace_seconds": 300})))
    assert p["terminationGracePeriodSeconds"] == 300
    assert p["restartPolicy"] == "Never"  # podFailurePolicy requires it


# ---- the Job's retry policy -----------------------------------------------------------------


def retry_table(which: int = 0) -> list[dict[str, str]]:
    """A table of docs/kubernetes.md section 7 (0: the rules, 1: the bounds), a dict per row."""
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    section = text[text.index("## 7. What a Job does on failure") :]
    section = section[: section.index("\n## ", 10)]
    tables, current = [], []
    for ln in section.splitlines():
        if ln.startswith("|"):
            current.append(ln)
        elif current:
            tables.append(current)
            current = []
    lines = tables[which]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, [c.strip() for c in ln.strip("|").split("|")], strict=True))
        for ln in lines[2:]
    ]


def action_for(job: dict, shows: str) -> str:
    """What the Job controller does with a failed pod: the first matching rule, else Count."""
    kind, value = shows.replace("`", "").split()[:2]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules
    for rule in rules:
        if kind == "exit" and "onExitCodes" in rule:
            on = rule["onExitCodes"]
            assert on["containerName"] == container(job)["name"]
            inside = int(value) in on["values"]
            if inside == (on["operator"] == "In"):
                return rule["action"]
        if kind == "condition" and any(
            c["type"] == value and c["status"] == "True" for c in rule.get("onPodConditions", [])
        ):
            return rule["action"]
    return "Count"


RETRY_ROWS = retry_table()


def test_the_retry_table_covers_the_worker_contract():
    shows = [r["the pod shows"] for r in RETRY_ROWS]
    assert shows[0] == "condition `DisruptionTarget`"
    for code in (1, 2, 75, 137, 143):
        assert any(s.startswith(f"exit {code}") for s in shows), code


@pytest.mark.parametrize("row", RETRY_ROWS, ids=[r["the pod shows"] for r in RETRY_ROWS])
@pytest.mark.parametrize("kind", ["FineTune", "Study (per cell)"])
def test_each_row_of_the_retry_table_is_what_the_rendered_job_does(row, kind):
    job = job_of(finetune() if kind == "FineTune" else study())
    assert f"`{action_for(job, row['the pod shows'])}`" == row[kind]


def test_each_bound_the_table_names_is_set_in_the_rendered_jobs():
    import re

    rows = retry_table(1)
    assert len(rows) == 3
    fields = {f for r in rows for f in re.findall(r"`(\w+)`", r["field"])}
    assert fields == {
        "backoffLimit",
        "backoffLimitPerIndex",
        "maxFailedIndexes",
        "activeDeadlineSeconds",
    }
    finetune_spec, study_spec = job_of(finetune())["spec"], job_of(study())["spec"]
    for f in fields:
        assert f in finetune_spec or f in study_spec, f
    assert study_spec["maxFailedIndexes"] == (parse_spec(study()).n_cells + 1) // 2
    assert "activeDeadlineSeconds" in finetune_spec and "activeDeadlineSeconds" in study_spec


def test_counted_failures_end_at_the_backoff_limit_the_table_names():
    assert job_of(finetune())["spec"]["backoffLimit"] == 3
    spec = job_of(study())["spec"]
    assert spec["backoffLimitPerIndex"] == 3 and "backoffLimit" not in spec


def test_retriable_exits_are_the_workers_and_ignored_only_for_its_container():
    from service.errors import EXIT_RETRY
    from service.k8s.pod import RETRIABLE_EXIT_CODES

    assert RETRIABLE_EXIT_CODES == [EXIT_RETRY, 143]
    job = job_of(finetune())
    assert action_for(job, "exit 75") == "Ignore"
    (rule,) = [r for r in job["spec"]["podFailurePolicy"]["rules"] if r.get("onExitCodes")][1:]
    assert rule["onExitCodes"]["containerName"] == "worker"


def test_backoff_deadline_and_ttl_come_from_the_spec():
    job = job_of(
        finetune(
            resources={
                "backoff_limit": 6,
                "active_deadline_seconds": 3600,
                "ttl_seconds_after_finished": 60,
            }
        )
    )
    assert job["spec"]["backoffLimit"] == 6
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    assert job["spec"]["ttlSecondsAfterFinished"] == 60


def test_without_a_deadline_in_the_spec_one_is_derived_from_the_budget_estimate():
    from service.cost.deadline import job_deadline_seconds

    for data in (finetune(), study()):
        deadline = job_of(data)["spec"]["activeDeadlineSeconds"]
        assert deadline == job_deadline_seconds(parse_spec(data))
        assert deadline % 3600 == 0 and deadline >= 2 * 3600


def test_the_derived_deadline_grows_with_the_waves_of_a_study():
    def deadline(**resources):
        return job_of(study(resources=resources))["spec"]["activeDeadlineSeconds"]

    cells = parse_spec(study()).n_cells
    assert cells >= 2
    assert deadline(parallelism=1) > deadline(parallelism=cells)


def test_a_queue_creates_the_job_suspended_with_kueue_labels():
    job = job_of(finetune(resources={"queue": "gpu-queue", "priority_class": "low"}))
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "low"


def test_without_a_queue_the_job_starts_at_once():
    job = job_of(finetune())
    assert "suspend" not in job["spec"]
    assert not any(k.startswith("kueue.x-k8s.io/") for k in job["metadata"]["labels"])


# ---- labels and annotations -----------------------------------------------------------------


def test_labels_name_the_app_and_what_the_job_runs():
    job = job_of(finetune())
    assert job["metadata"]["labels"] == {
        "app.kubernetes.io/name": "backbones",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "backbones",
        "app.kubernetes.io/instance": "eurosat-convnext",
        "app.kubernetes.io/version": service.version(),
        "backbones.dev/run": "eurosat-convnext",
        "backbones.dev/backbone": "convnext_tiny",
        "backbones.dev/dataset": "eurosat",
    }
    # The pod carries the same labels, so the PodMonitor and NetworkPolicy select it.
    assert job["spec"]["template"]["metadata"]["labels"] == job["metadata"]["labels"]


def test_the_spec_hash_is_an_annotation():
    spec = parse_spec(finetune())
    assert render_job(spec)["metadata"]["annotations"]["backbones.dev/spec-hash"] == spec.spec_hash


def test_a_study_lists_its_backbones_in_an_annotation_not_a_label():
    job = job_of(study())
    assert job["metadata"]["labels"]["backbones.dev/study"] == "rs"
    assert "backbones.dev/backbone" not in job["metadata"]["labels"]
    assert job["metadata"]["annotations"]["backbones.dev/backbone"] == "convnext_tiny,resnet50"
    assert job["metadata"]["annotations"]["backbones.dev/cells"] == "6"


def test_long_or_odd_names_become_valid_label_values_and_stay_whole_in_annotations():
    model = "hf-hub:timm/" + "vit_base_patch16_clip_224.openai_ft_in12k_in1k_long_name_x" * 2
    job = job_of(finetune(backbone={"model": model, "weights": "none"}))
    label = job["metadata"]["labels"]["backbones.dev/backbone"]
    assert len(label) <= 63
    assert label[0].isalnum() and label[-1].isalnum()
    assert set(label) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    assert job["metadata"]["annotations"]["backbones.dev/backbone"] == model


def test_label_value_keeps_distinct_long_names_distinct():
    a, b = "x" * 80 + "a", "x" * 80 + "b"
    assert label_value(a) != label_value(b)
    assert label_value("study/eurosat/resnet50/seed0-frac1.0") == (
        "study-eurosat-resnet50-seed0-frac1.0"
    )


# ---- the image ------------------------------------------------------------------------------


def test_the_default_image_is_this_release_pinned_by_version():
    assert container(job_of(finetune()))["image"] == (
        f"ghcr.io/backbones/backbones:{service.version()}"
    )


def test_image_from_the_flag_beats_the_spec():
    data = finetune(resources={"image": "reg.example/bb:1.2"})
    assert container(job_of(data))["image"] == "reg.example/bb:1.2"
    assert container(job_of(data, image="reg.example/bb:1.3"))["image"] == "reg.example/bb:1.3"


def test_an_image_pinned_by_digest_is_accepted():
    image = "reg.example:5000/bb@sha256:" + "a" * 64
    assert container(job_of(finetune(), image=image))["image"] == image


@pytest.mark.parametrize("image", ["reg.example/bb:latest", "reg.example:5000/bb", "bb"])
def test_an_unpinned_image_is_refused(image):
    with pytest.raises(UserError) as e:
        job_of(finetune(), image=image)
    assert str(e.value) == (
        f"image: {image!r} is not pinned; use a version tag or an @sha256: digest "
        f"(e.g. {default_image()})"
    )


def test_local_paths_in_a_cluster_spec_are_warned_about():
    data = finetune(output={"uri": "./runs"}, dataset={"uri": "/data/eurosat"})
    assert warnings_for(parse_spec(data)) == [
        "output.uri './runs' is a local path: results stay inside the pod and are lost when it "
        "ends; use s3://",
        "'/data/eurosat' is a local path: the pod sees only what the image contains",
    ]


def test_a_namespace_override_moves_the_job():
    assert job_of(finetune(), namespace="team-a")["metadata"]["namespace"] == "team-a"


def test_pass_through_fields_from_a_spec_file_render_as_plain_yaml(tmp_path):
    affinity = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    path = specs.write_spec(
        tmp_path, finetune(resources={"affinity": affinity, "tolerations": [{}]})
    )
    result = CliRunner().invoke(app, ["render", str(path)])
    assert result.exit_code == 0, result.output
    assert pod(yaml.safe_load(result.stdout))["affinity"] == affinity


def test_a_cache_dir_outside_the_writable_volumes_is_warned_about():
    data = finetune(storage={"cache_dir": "/data/cache"})
    assert warnings_for(parse_spec(data)) == [
        "storage.cache_dir '/data/cache': in the pod only /cache (the cache emptyDir) and /tmp "
        "are writable; leave it empty to use $BACKBONES_CACHE"
    ]
    assert warnings_for(parse_spec(finetune(storage={"cache_dir": "/cache/x"}))) == []
