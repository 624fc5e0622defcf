"""Spec -> Kubernetes Job: pure functions that return plain dicts (no ``kubernetes`` import).

A FineTune becomes a batch/v1 Job with one pod; a Study becomes ONE Indexed Job whose pod with
``JOB_COMPLETION_INDEX`` i runs ``expand(study)[i]``. The validated spec travels inside the Job
as ``BACKBONES_SPEC`` (its canonical ``to_json()``); the pod parses it with the same model, so
nothing is re-assembled from a dozen env vars.

The pod template (container, env, security, volumes, failure policy) is service.k8s.pod; here
the Job around it: names, labels, hashes, completions, retries and deadline.

Everything here is deterministic in the spec and the image: the golden files in k8s/examples/
are a fresh render, byte for byte.
"""

from __future__ import annotations

import json
import re
from typing import Any

import service
from service.digest import bounded_name, json_hash
from service.errors import UserError
from service.k8s.pod import CACHE_DIR, pod_failure_policy, pod_spec
from service.spec import FineTune, Study
from service.spec.study import cells_of

IMAGE_REPO = "ghcr.io/backbones/backbones"
LABEL_PREFIX = "backbones.dev"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY = "kueue.x-k8s.io/priority-class"
# Partial admission: Kueue may start a Study with fewer pods at once than its parallelism when
# the queue's quota cannot hold them all (each cell is independent), instead of never.
KUEUE_MIN_PARALLELISM = "kueue.x-k8s.io/job-min-parallelism"
SPEC_HASH = f"{LABEL_PREFIX}/spec-hash"
# Everything that shapes the Job (spec, resources, image, storage, metrics, namespace): what
# `submit` compares to tell "already there" from "changed".
JOB_HASH = f"{LABEL_PREFIX}/job-hash"
# A packed Study (resources.cells_per_pod): the cells each index runs (service.cost.packs).
PACKS = f"{LABEL_PREFIX}/packs"

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def default_image() -> str:
    """This release's image: the tag is the package version, so CLI and pod always agree."""
    return f"{IMAGE_REPO}:{service.version()}"


def check_image(image: str) -> str:
    """Refuse images that are not pinned: ``:latest`` or no tag at all can change under a run."""
    if "@sha256:" in image:
        return image
    last = image.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else None
    if tag is None or tag == "latest":
        raise UserError(
            f"image: {image!r} is not pinned; use a version tag or an @sha256: digest "
            f"(e.g. {default_image()})"
        )
    return image


def label_value(text: str) -> str:
    """A valid label value (<= 63 chars of [A-Za-z0-9-_.], alphanumeric at both ends).

    Long values keep a readable head and end in a short hash so distinct names stay distinct;
    the full text goes into an annotation of the same key.
    """
    slug = bounded_name(re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_."), source=text)
    assert _LABEL_VALUE.fullmatch(slug), slug
    return slug


def job_hash_of(job: dict[str, Any]) -> str:
    """Hash of the rendered Job itself (its own job-hash annotation left out)."""
    meta = dict(job["metadata"])
    meta["annotations"] = {k: v for k, v in meta.get("annotations", {}).items() if k != JOB_HASH}
    return json_hash({**job, "metadata": meta})


def dry_run_name(job: dict[str, Any]) -> str:
    """A name for the server-side dry run of a replacement (the real name would answer 409
    AlreadyExists) that the API server accepts: an Indexed Job's pod hostnames included."""
    spec = job["spec"]
    suffix = "-dry"
    if spec.get("completionMode") == "Indexed":
        suffix += f"-{spec['completions'] - 1}"
    head = job["metadata"]["name"][: 63 - len(suffix)].rstrip("-")
    return head + "-dry"


def _identity(spec: FineTune | Study) -> dict[str, str]:
    """Full names of what the Job runs (annotations); labels get sanitised copies."""
    cells = cells_of(spec)
    backbones = sorted({c.backbone.model for c in cells})
    datasets = sorted({c.dataset.short_name for c in cells})
    out = {
        "run": spec.run_id if isinstance(spec, FineTune) else "",
        "study": spec.study or "" if isinstance(spec, FineTune) else spec.name,
        # A Study over several backbones has no single backbone: the label is left out and the
        # annotation lists them all.
        "backbone": ",".join(backbones),
        "dataset": ",".join(datasets),
    }
    return {k: v for k, v in out.items() if v}


def labels_of(spec: FineTune | Study) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "backbones",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "backbones",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/version": label_value(service.version()),
    }
    for key, value in _identity(spec).items():
        if "," not in value:
            labels[f"{LABEL_PREFIX}/{key}"] = label_value(value)
    return labels


def annotations_of(spec: FineTune | Study) -> dict[str, str]:
    # The spec's own annotations first: backbones' keys (refused in the spec) cannot be shadowed.
    out = dict(spec.resources.annotations)
    out |= {f"{LABEL_PREFIX}/{k}": v for k, v in _identity(spec).items()}
    out[SPEC_HASH] = spec.spec_hash
    if isinstance(spec, Study):
        out[f"{LABEL_PREFIX}/cells"] = str(spec.n_cells)
        if spec.resources.cells_per_pod != 1:
            from service.cost.packs import packs, packs_text

            out[PACKS] = packs_text(packs(spec))  # indexes into expand(spec), index by index
    return out


def _deadline(spec: FineTune | Study) -> int:
    """``resources.active_deadline_seconds``, else one derived from the budget estimate."""
    from service.cost.deadline import job_deadline_seconds

    return spec.resources.active_deadline_seconds or job_deadline_seconds(spec)


def render_job(
    spec: FineTune | Study, image: str | None = None, namespace: str | None = None
) -> dict[str, Any]:
    """The batch/v1 Job for a spec, ready for ``kubectl apply -f -``."""
    image = check_image(image or spec.resources.image or default_image())
    r = spec.resources
    labels = labels_of(spec)
    annotations = annotations_of(spec)
    job_labels = dict(labels)
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": spec.name,
            "namespace": namespace or r.namespace,
            "labels": job_labels,
            "annotations": annotations,
        },
        "spec": _run_policy(spec),
    }
    js: dict[str, Any] = job["spec"]
    if r.queue:
        # Kueue admits the Job by unsuspending it when quota frees up.
        js["suspend"] = True
        job_labels[KUEUE_QUEUE] = r.queue
        if r.priority_class:
            job_labels[KUEUE_PRIORITY] = r.priority_class
        if isinstance(spec, Study) and js["parallelism"] > 1:
            annotations[KUEUE_MIN_PARALLELISM] = "1"
    js["template"] = {
        "metadata": {"labels": dict(labels), "annotations": _pod_annotations(spec, annotations)},
        "spec": pod_spec(spec, image, spec.spec_hash),
    }
    annotations[JOB_HASH] = job_hash_of(job)
    return job


def _pod_annotations(spec: FineTune | Study, annotations: dict[str, str]) -> dict[str, str]:
    out = dict(annotations)
    if spec.metrics.port:
        # For clusters without the Prometheus operator (k8s/monitoring/ covers those with).
        out |= {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(spec.metrics.port),
            "prometheus.io/path": "/metrics",
        }
    return out


def _run_policy(spec: FineTune | Study) -> dict[str, Any]:
    """How many pods, how many retries, for how long: the Job's spec without its template."""
    r = spec.resources
    js: dict[str, Any] = {}
    if isinstance(spec, Study):
        from service.cost.packs import packs

        cells = len(packs(spec))  # one index per pack: per cell unless cells_per_pod packs them
        js |= {
            "completionMode": "Indexed",
            "completions": cells,
            "parallelism": min(r.parallelism or cells, cells),
            "backoffLimitPerIndex": r.backoff_limit,
            # More than half of the grid failing for good is systemic (bad image, bad bucket):
            # stop instead of burning GPU hours on the rest.
            "maxFailedIndexes": (cells + 1) // 2,
        }
    else:
        js |= {"completions": 1, "parallelism": 1, "backoffLimit": r.backoff_limit}
    js["podFailurePolicy"] = pod_failure_policy(isinstance(spec, Study))
    # A replacement pod starts only once the old one is gone: two workers never write the same
    # run's checkpoints at once.
    js["podReplacementPolicy"] = "Failed"
    # Always bounded: retriable exits are ignored by the failure policy, and pods that never
    # start (image pull, missing Secret, no quota) would otherwise hold the Job forever.
    js["activeDeadlineSeconds"] = _deadline(spec)
    js["ttlSecondsAfterFinished"] = r.ttl_seconds_after_finished
    return js


def warnings_for(spec: FineTune | Study) -> list[str]:
    """Things that render fine but will not do what a person expects on a cluster."""
    from service.storage import is_s3

    out = list(spec.resources.warnings())
    if not is_s3(spec.output.uri):
        out.append(
            f"output.uri {spec.output.uri!r} is a local path: results stay inside the pod and "
            "are lost when it ends; use s3://"
        )
    uris = {c.dataset.uri for c in cells_of(spec)} | {
        c.backbone.weights for c in cells_of(spec) if c.backbone.weights.endswith(".safetensors")
    }
    for uri in sorted(uris):
        if not is_s3(uri) and not uri.startswith("builtin://"):
            out.append(f"{uri!r} is a local path: the pod sees only what the image contains")
    cache = spec.storage.cache_dir
    if (
        cache
        and not cache.startswith((CACHE_DIR + "/", "/tmp/"))
        and cache not in (CACHE_DIR, "/tmp")
    ):
        out.append(
            f"storage.cache_dir {cache!r}: in the pod only {CACHE_DIR} (the cache emptyDir) and "
            "/tmp are writable; leave it empty to use $BACKBONES_CACHE"
        )
    if (is_s3(spec.output.uri) or any(is_s3(u) for u in uris)) and not (
        spec.storage.credentials_secret
    ):
        out.append(
            "storage.credentials_secret is empty: the pod gets no S3 keys (fine only with "
            "node or workload identity)"
        )
    return out


def spec_from_job(job: dict[str, Any]) -> FineTune | Study:
    """The spec a rendered (or fetched, camelCase) Job carries in BACKBONES_SPEC."""
    from service.spec import parse_spec

    for c in job["spec"]["template"]["spec"]["containers"]:
        for e in c.get("env") or []:
            if e.get("name") == "BACKBONES_SPEC" and e.get("value"):
                return parse_spec(json.loads(e["value"]))
    name = job.get("metadata", {}).get("name", "?")
    raise UserError(f"Job {name} carries no BACKBONES_SPEC: not made by backbones render")


def to_yaml(obj: dict[str, Any]) -> str:
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, s: str) -> yaml.Node:
        # The spec JSON is multi-line: a block scalar keeps it readable in the manifest.
        style = "|" if "\n" in s else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def to_json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2) + "\n"
