"""What the API server would refuse is refused at `backbones validate`: one line, exit 2.

Kubernetes quantities for cpu and sizes, DNS names for the queue, priority class and service
account, and a Study name short enough for its pods' hostnames (<name>-<last index>).
"""

from __future__ import annotations

import kubernetes_validate
import pytest
from typer.testing import CliRunner

from service.cli import app
from service.k8s.render import render_job
from service.spec import parse_spec
from tests import specs
from tests.specs import write_spec

runner = CliRunner()


def finetune(**resources) -> dict:
    return specs.finetune(specs.ON_S3, name="q", resources=resources)


def study(name: str, seeds: int) -> dict:
    return specs.study(specs.STUDY_ON_S3, name=name, seeds=list(range(seeds)))


def validate(tmp_path, data: dict):
    path = write_spec(tmp_path, data, "spec.json")
    result = runner.invoke(app, ["validate", str(path)])
    return result, path


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cpu", "8 cores", "must be a Kubernetes quantity such as '8', '500m', got '8 cores'"),
        ("cpu", "0", "must be greater than 0, got '0'"),
        ("memory", "32GB", "must be a Kubernetes quantity such as '32Gi', '512Mi', got '32GB'"),
        (
            "memory",
            "512m",
            "'512m' is 512 milli/micro/nano-bytes, not a size; did you mean '512Mi'?",
        ),
        ("shm_size", "-1Gi", "must be a Kubernetes quantity such as '32Gi', '512Mi', got '-1Gi'"),
        ("cache_size", "lots", "must be a Kubernetes quantity such as '32Gi', '512Mi', got 'lots'"),
        (
            "queue",
            "GPU_Queue",
            "must be a Kubernetes object name (DNS-1123 subdomain), got 'GPU_Queue'",
        ),
        (
            "service_account",
            "Backbones Worker",
            "must be a Kubernetes object name (DNS-1123 subdomain), got 'Backbones Worker'",
        ),
    ],
)
def test_a_value_the_api_server_would_refuse_is_one_line_and_exit_2(
    tmp_path, field, value, message
):
    result, path = validate(tmp_path, finetune(**{field: value}))
    assert result.exit_code == 2
    assert result.output.strip() == f"{path}: resources.{field}: {message}"


def test_a_priority_class_name_must_fit_a_label_value(tmp_path):
    result, path = validate(tmp_path, finetune(queue="gpu", priority_class="p" * 64))
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"{path}: resources.priority_class: must be at most 63 characters (a label value), got 64"
    )


@pytest.mark.parametrize(
    ("cpu", "memory"), [("8", "32Gi"), ("500m", "1.5Gi"), ("0.5", "512Mi"), ("2", "1e9")]
)
def test_quantities_the_api_server_accepts_pass_and_render_valid_jobs(cpu, memory):
    job = render_job(parse_spec(finetune(cpu=cpu, memory=memory, shm_size="1Gi")))
    kubernetes_validate.validate(job, "1.30", strict=True)


@pytest.mark.parametrize(("seeds", "longest"), [(10, 61), (11, 60), (101, 59)])
def test_a_study_name_must_leave_room_for_its_pod_hostnames(tmp_path, seeds, longest):
    ok, _ = validate(tmp_path, study("s" * longest, seeds))
    assert ok.exit_code == 0, ok.output
    bad, path = validate(tmp_path, study("s" * (longest + 1), seeds))
    assert bad.exit_code == 2
    last = f"{'s' * (longest + 1)}-{seeds - 1}"
    assert bad.output.strip() == (
        f"{path}: name: {longest + 1} characters is too long for {seeds} cells: the last "
        f"pod's hostname {last!r} would exceed 63 characters; use at most {longest}"
    )
