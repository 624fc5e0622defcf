"""The thin I/O layer over the Kubernetes API: the only module that imports ``kubernetes``.

``Cluster`` wraps a BatchV1Api and a CoreV1Api (injected, so tests pass fakes) and turns every
API failure into one line that names the verb and the object:

    Failed to create Job backbones/eurosat: 403 Forbidden: jobs.batch is forbidden: ...

4xx answers are the caller's to fix (UserError, exit 2); timeouts, throttling, 5xx and an
unreachable server may pass (RetriableError, exit 75). Results are plain camelCase dicts, the
shape of the rendered manifests, so the logic above never touches client model classes.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from service.errors import BackbonesError, RetriableError, UserError

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
_RETRIABLE_4XX = (408, 429)


class NotFoundError(UserError):
    """The object does not exist (HTTP 404)."""


def _message(exc: Any) -> str:
    """The API server's own explanation (Status.message), else the HTTP reason."""
    body = getattr(exc, "body", None)
    if body:
        try:
            msg = json.loads(body).get("message")
        except (ValueError, AttributeError):
            msg = body.decode() if isinstance(body, bytes) else str(body)
        if msg:
            return " ".join(str(msg).split())
    return str(getattr(exc, "reason", "") or exc)


def api_error(verb: str, what: str, exc: Exception) -> BackbonesError:
    """``Failed to <verb> <what>: <status> <reason>: <message>`` as the right error class."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status > 0:
        reason = getattr(exc, "reason", "") or ""
        line = f"Failed to {verb} {what}: {status} {reason}: {_message(exc)}"
        if status == 404:
            return NotFoundError(line)
        if 400 <= status < 500 and status not in _RETRIABLE_4XX:
            return UserError(line)
        return RetriableError(line)
    # No HTTP answer at all: connection refused, DNS, TLS, timeout.
    return RetriableError(f"Failed to {verb} {what}: cannot reach the API server: {exc}")


@contextlib.contextmanager
def _calling(verb: str, what: str) -> Iterator[None]:
    try:
        yield
    except BackbonesError:
        raise
    except Exception as e:  # ApiException, urllib3 errors, OSError: all become one line
        raise api_error(verb, what, e) from None


def _plain(obj: Any) -> Any:
    """Client model objects -> camelCase dicts (dicts from fakes pass through unchanged)."""
    if obj is None or isinstance(obj, dict | list | str | int | float | bool):
        return obj
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def connect(context: str | None = None) -> tuple[Any, Any]:
    """(BatchV1Api, CoreV1Api) from the kubeconfig, else from the in-cluster service account."""
    from kubernetes import client, config

    try:
        config.load_kube_config(context=context)
    except (config.ConfigException, FileNotFoundError, TypeError) as kubeconfig_error:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise UserError(
                "no Kubernetes configuration: set KUBECONFIG (or write ~/.kube/config), or run "
                f"inside a cluster ({' '.join(str(kubeconfig_error).split())})"
            ) from None
    return client.BatchV1Api(), client.CoreV1Api()


IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def context_namespace(context: str | None = None) -> str | None:
    """The namespace the kubeconfig context (the current one, or ``context``) names, as kubectl
    uses it; in a pod without a kubeconfig, the pod's own; None when neither says."""
    import os

    from kubernetes import config

    try:
        # $KUBECONFIG as it is now (the client reads it once, at import).
        contexts, current = config.list_kube_config_contexts(os.environ.get("KUBECONFIG"))
    except (config.ConfigException, FileNotFoundError, TypeError, ValueError):
        try:
            with open(IN_CLUSTER_NAMESPACE) as f:
                return f.read().strip() or None
        except OSError:
            return None
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else current
    return ((chosen or {}).get("context") or {}).get("namespace") or None


class Cluster:
    """Jobs and their pods in one namespace."""

    def __init__(
        self,
        batch: Any,
        core: Any,
        namespace: str,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        version: Any = None,
        custom: Any = None,
    ):
        self.batch = batch
        self.core = core
        self.version = version  # VersionApi; None: the server version is not asked
        self.custom = custom  # CustomObjectsApi (Kueue's objects); None: Kueue is not asked
        self.namespace = namespace
        self._sleep = sleep
        self._clock = clock

    @classmethod
    def connect(cls, namespace: str, context: str | None = None) -> Cluster:
        from kubernetes.client import CustomObjectsApi, VersionApi

        batch, core = connect(context)
        return cls(batch, core, namespace, version=VersionApi(), custom=CustomObjectsApi())

    def _job(self, name: str) -> str:
        return f"Job {self.namespace}/{name}"

    # ---- Jobs ---------------------------------------------------------------------------

    def create_job(self, job: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"namespace": self.namespace, "body": job}
        if dry_run:
            kwargs["dry_run"] = "All"  # server-side: admission and validation, nothing stored
        with _calling("create", self._job(job["metadata"]["name"])):
            return _plain(self.batch.create_namespaced_job(**kwargs))

    def get_job(self, name: str) -> dict[str, Any]:
        with _calling("get", self._job(name)):
            return _plain(self.batch.read_namespaced_job(name=name, namespace=self.namespace))

    def find_job(self, name: str) -> dict[str, Any] | None:
        """The Job, or None when it does not exist."""
        try:
            return self.get_job(name)
        except NotFoundError:
            return None

    def list_jobs(self, selector: str) -> list[dict[str, Any]]:
        with _calling("list", f"Jobs in {self.namespace} ({selector})"):
            found = _plain(
                self.batch.list_namespaced_job(namespace=self.namespace, label_selector=selector)
            )
        return sorted(found.get("items") or [], key=lambda j: j["metadata"]["name"])

    def delete_job(self, name: str, propagation: str = "Foreground") -> None:
        """Foreground: the Job stays visible until its pods have checkpointed and exited."""
        with _calling("delete", self._job(name)):
            self.batch.delete_namespaced_job(
                name=name, namespace=self.namespace, propagation_policy=propagation
            )

    def wait_deleted(self, name: str, timeout: float, poll: float = 2.0) -> None:
        deadline = self._clock() + timeout
        while self.find_job(name) is not None:
            if self._clock() >= deadline:
                raise RetriableError(
                    f"Failed to replace {self._job(name)}: still terminating after "
                    f"{timeout:.0f} s; run submit --replace again"
                )
            self._sleep(poll)

    # ---- What a Job needs before it can run ----------------------------------------------

    def server_version(self) -> tuple[int, int] | None:
        """(major, minor) of the API server (GET /version, readable by every user), or None."""
        if self.version is None:
            return None
        with _calling("get", "the API server version"):
            info = _plain(self.version.get_code())
        try:
            return int(info["major"]), int(str(info["minor"]).rstrip("+"))
        except (KeyError, TypeError, ValueError):
            return None  # a distribution that reports something odd: do not guess

    def namespace_exists(self) -> bool | None:
        """True / False, or None when we may not look (the submitter Role is namespaced and
        cannot read Namespace objects: the create then answers for it)."""
        try:
            with _calling("get", f"Namespace {self.namespace}"):
                self.core.read_namespace(name=self.namespace)
        except NotFoundError:
            return False
        except UserError:  # 403
            return None
        return True

    def service_account_exists(self, name: str) -> bool:
        try:
            with _calling("get", f"ServiceAccount {self.namespace}/{name}"):
                self.core.read_namespaced_service_account(name=name, namespace=self.namespace)
        except NotFoundError:
            return False
        return True

    # ---- Kueue (kueue.x-k8s.io/v1beta1) ---------------------------------------------------

    def local_queue_exists(self, name: str) -> bool | None:
        """True / False, or None when we may not look (403, or no CustomObjectsApi). Without
        Kueue installed the API answers 404 too: the queue does not exist either way."""
        from service.k8s.kueue import GROUP, VERSION

        if self.custom is None:
            return None
        try:
            with _calling("get", f"LocalQueue {self.namespace}/{name}"):
                self.custom.get_namespaced_custom_object(
                    group=GROUP,
                    version=VERSION,
                    namespace=self.namespace,
                    plural="localqueues",
                    name=name,
                )
        except NotFoundError:
            return False
        except UserError:  # 403: a Role without Kueue's reads; the Job's status will tell
            return None
        return True

    def workload_of(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """Kueue's Workload for a Job (by the job-uid label), newest first; None when there is
        none, or Kueue cannot be asked (not installed, not allowed)."""
        from service.k8s.kueue import GROUP, JOB_UID, VERSION

        uid = (job.get("metadata") or {}).get("uid")
        if self.custom is None or not uid:
            return None
        try:
            with _calling("list", f"Workloads of {self._job(job['metadata']['name'])}"):
                found = _plain(
                    self.custom.list_namespaced_custom_object(
                        group=GROUP,
                        version=VERSION,
                        namespace=self.namespace,
                        plural="workloads",
                        label_selector=f"{JOB_UID}={uid}",
                    )
                )
        except UserError:  # 404 (no Kueue) or 403: status shows the Job without it
            return None
        items = sorted(
            found.get("items") or [],
            key=lambda w: (w.get("metadata") or {}).get("creationTimestamp") or "",
        )
        return items[-1] if items else None

    def events(self, kind: str, name: str) -> list[dict[str, Any]]:
        """Events about one object (FailedCreate on a Job, FailedScheduling on a pod), oldest
        first."""
        selector = f"involvedObject.kind={kind},involvedObject.name={name}"
        with _calling("list", f"events of {kind} {self.namespace}/{name}"):
            found = _plain(
                self.core.list_namespaced_event(namespace=self.namespace, field_selector=selector)
            )

        def when(e: dict[str, Any]) -> str:
            return e.get("lastTimestamp") or e.get("eventTime") or ""

        return sorted(found.get("items") or [], key=when)

    # ---- Pods ---------------------------------------------------------------------------

    def job_pods(self, name: str) -> list[dict[str, Any]]:
        """Pods of a Job, oldest first."""
        with _calling("list", f"pods of {self._job(name)}"):
            found = _plain(
                self.core.list_namespaced_pod(
                    namespace=self.namespace, label_selector=f"{JOB_NAME_LABEL}={name}"
                )
            )
        return sorted(
            found.get("items") or [],
            key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]),
        )

    def pod_log(self, pod: str, container: str, follow: bool = False) -> Iterator[str]:
        """The container's log as text chunks; ``follow`` streams until the container ends."""
        what = f"log of pod {self.namespace}/{pod}"
        if not follow:
            with _calling("read", what):
                text = self.core.read_namespaced_pod_log(
                    name=pod, namespace=self.namespace, container=container
                )
            yield text if isinstance(text, str) else text.decode("utf-8", "replace")
            return
        with _calling("follow", what):
            resp = self.core.read_namespaced_pod_log(
                name=pod,
                namespace=self.namespace,
                container=container,
                follow=True,
                _preload_content=False,
            )
        try:
            with _calling("follow", what):
                for chunk in resp.stream(4096):
                    yield chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else chunk
        finally:
            with contextlib.suppress(Exception):
                resp.release_conn()
