"""The pod template of a backbones Job: the worker container (command, env, resources,
security context, volumes) and the pod failure policy that decides which exits are retried.

Pure functions of the spec and the image, like service.k8s.render, which puts them in a Job.
"""

from __future__ import annotations

import json
from typing import Any

from service.errors import EXIT_RETRY, EXIT_USER
from service.spec import FineTune, Study
from service.spec.infra import quantity_bytes
from service.spec.study import cells_of

CONTAINER = "worker"
DRIVER_CONTAINER = "driver"  # the search driver's Job (service.k8s.search_jobs)
UID = 10001
CACHE_DIR = "/cache"


def _needs_hub(spec: FineTune | Study) -> bool:
    return any(c.backbone.weights == "timm" for c in cells_of(spec))


# PID 1 of the container: tini (Debian's, in the image). The kernel drops a signal sent to a
# PID 1 that has no handler for it, so a SIGTERM that arrives while Python is still importing
# (the pod deleted as it starts) was lost and the kubelet SIGKILLed the pod after its grace
# period: 137, counted as a crash. tini handles it from its first instant and passes it on; a
# worker stopped before its own handler exits 143 (ignored by the failure policy), after it 75.
INIT = ["tini", "--"]


def _command(gpus: int, grace: int) -> list[str]:
    return INIT + _program(gpus, grace)


def _program(gpus: int, grace: int) -> list[str]:
    if gpus > 1:
        # torchrun, one process per GPU, --standalone: a local rendezvous (no etcd). Through
        # service.k8s.launch, which keeps a rank's exit code 2 (plain torchrun exits 1).
        # torchrun SIGKILLs ranks 30 s after forwarding SIGTERM unless told otherwise: give them
        # the pod's grace period, less a margin for the launcher itself to exit.
        return [
            "python",
            "-m",
            "service.k8s.launch",
            "--standalone",
            f"--nproc-per-node={gpus}",
            f"--shutdown-timeout={max(1, grace - 10)}",
            "-m",
            "service.run.worker",
        ]
    return ["backbones", "worker"]


def _env(spec: FineTune | Study, image: str, spec_hash: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "BACKBONES_SPEC", "value": spec.to_json()},
        {"name": "BACKBONES_IMAGE", "value": image},
        {"name": "BACKBONES_JOB", "value": spec.name},
        {"name": "BACKBONES_SPEC_HASH", "value": spec_hash},
        {"name": "BACKBONES_CACHE", "value": CACHE_DIR},
        {"name": "BACKBONES_NAMESPACE", "valueFrom": _field("metadata.namespace")},
        {"name": "BACKBONES_POD", "valueFrom": _field("metadata.name")},
        {"name": "BACKBONES_NODE", "valueFrom": _field("spec.nodeName")},
        # The root filesystem is read-only: every library cache goes to a writable emptyDir.
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
        {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "TORCH_HOME", "value": f"{CACHE_DIR}/torch"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    env += _runtime_env(spec)
    # The image defaults to offline. Weights from S3 or a random init: fail fast instead of
    # retrying the hub for ~47 s; weights: "timm" needs the hub.
    env.append({"name": "HF_HUB_OFFLINE", "value": "0" if _needs_hub(spec) else "1"})
    secret = spec.storage.credentials_secret
    if secret:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    return env


def _runtime_env(spec: FineTune | Study) -> list[dict[str, Any]]:
    """Threads bounded by the pod's CPU limit (torch and inductor would size their pools by the
    node's cores and thrash a cgroup quota), shared among the GPU ranks; on GPUs, NCCL's
    warnings in the log and an allocator that grows segments instead of fragmenting them (fewer
    out-of-memory errors at the same peak)."""
    r = spec.resources
    threads = str(max(1, int(quantity_bytes(r.cpu)) // max(1, r.gpus)))
    env = [
        {"name": "OMP_NUM_THREADS", "value": threads},
        {"name": "TORCHINDUCTOR_COMPILE_THREADS", "value": threads},
    ]
    if r.gpus > 0:
        env.append({"name": "NCCL_DEBUG", "value": "WARN"})
        env.append({"name": "PYTORCH_CUDA_ALLOC_CONF", "value": "expandable_segments:True"})
    return env


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _field(path: str) -> dict[str, Any]:
    return {"fieldRef": {"fieldPath": path}}


def _resources(spec: FineTune | Study) -> dict[str, Any]:
    r = spec.resources
    # The cache and /tmp emptyDirs live on the node's disk: requested, so the scheduler places
    # the pod where they fit, and limited, so a full cache evicts this pod and not its neighbours.
    amounts: dict[str, str] = {
        "cpu": r.cpu,
        "memory": r.memory,
        "ephemeral-storage": r.ephemeral_storage(),
    }
    limits = dict(amounts)
    if r.gpus > 0:
        limits["nvidia.com/gpu"] = str(r.gpus)
    # Requests equal limits: a training pod that is throttled or OOM-killed mid-epoch wastes
    # more than the headroom saves.
    return {"requests": amounts, "limits": limits}


def _pull_policy(image: str) -> str:
    # A digest names one image for good: the node's copy is it, no registry round trip (and no
    # failed start while the registry is down). A tag may move: re-check its digest on each
    # start; layers stay cached on the node.
    return "IfNotPresent" if "@sha256:" in image else "Always"


def _container(spec: FineTune | Study, image: str, spec_hash: str) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": _pull_policy(image),
        "command": _command(spec.resources.gpus, spec.resources.termination_grace_seconds),
        # Relative paths in a spec (./runs) land in the writable /tmp emptyDir.
        "workingDir": "/tmp",
        "env": _env(spec, image, spec_hash),
        "resources": _resources(spec),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.metrics.port:
        c["ports"] = [{"name": "metrics", "containerPort": spec.metrics.port, "protocol": "TCP"}]
    return c


def pod_spec(spec: FineTune | Study, image: str, spec_hash: str) -> dict[str, Any]:
    """The Job's pod template spec: one worker container, its volumes, placement and account.

    ``spec_hash`` (the spec's ``spec_hash``) reaches the pod as BACKBONES_SPEC_HASH."""
    r = spec.resources
    pod: dict[str, Any] = {
        # podFailurePolicy requires Never; the Job controller does the retrying.
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": r.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(spec, image, spec_hash)],
        "volumes": [
            {"name": "cache", "emptyDir": {"sizeLimit": r.cache_size}},
            {"name": "tmp", "emptyDir": {"sizeLimit": r.tmp_size}},
            # DataLoader workers pass batches through shared memory; the default 64 MiB is too
            # small. Memory-backed: it counts against the container's memory limit.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": r.shm_size}},
        ],
    }
    if r.service_account:
        pod["serviceAccountName"] = r.service_account
    # Passed through as plain JSON values (the spec loader may hand over dict subclasses).
    if r.node_selector:
        pod["nodeSelector"] = _plain(r.node_selector)
    if r.tolerations:
        pod["tolerations"] = _plain(r.tolerations)
    if r.affinity:
        pod["affinity"] = _plain(r.affinity)
    if r.priority_class_name:
        pod["priorityClassName"] = r.priority_class_name
    if r.runtime_class_name:
        pod["runtimeClassName"] = r.runtime_class_name
    if r.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in r.image_pull_secrets]
    return pod


# Exit codes the worker uses for "stopped, resume me later": 75 (storage down, SIGTERM handled,
# lease held) and 143 (SIGTERM before the handler was installed, e.g. during imports).
RETRIABLE_EXIT_CODES = [EXIT_RETRY, 128 + 15]


def pod_failure_policy(study: bool) -> dict[str, Any]:
    """The retry table of docs/kubernetes.md ("What a Job does on failure"), rule for rule.

    Rules match in order. ``Ignore`` does not count against the backoff limit but retries
    without end: ``activeDeadlineSeconds`` (always set: service.k8s.render) bounds it.
    """
    return {
        "rules": [
            # Preemption, eviction, node drain: not the run's fault; retry without counting.
            {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
            # Exit 2 = bad spec or bad data: retrying only burns GPU hours. In a Study only that
            # cell fails (a corrupt dataset must not cancel the other datasets' cells).
            {
                "action": "FailIndex" if study else "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "In",
                    "values": [EXIT_USER],
                },
            },
            # Retriable stops (S3 outage, `kubectl delete pod`, a held lease): the run resumes
            # from its checkpoint, so they must not use up the Job the way crashes do.
            {
                "action": "Ignore",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "In",
                    "values": list(RETRIABLE_EXIT_CODES),
                },
            },
            # Anything else (a crash; 137 = OOMKilled, killed after the grace period, or evicted
            # for the cache emptyDir, which sets no DisruptionTarget) falls
            # through to the default: counted against backoffLimit(PerIndex).
        ]
    }
