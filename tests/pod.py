"""Run a rendered Job's pod on this machine, as the kubelet would start its container.

``render(spec)`` runs ``backbones render`` (the console script) and returns the Job it prints.
``Pod(job, index, secrets, ...)`` then starts one pod of it:

- the container's ``command`` + ``args``, resolved on this machine's PATH (the installed
  ``backbones`` entry point);
- exactly the container's ``env``: ``value``s as written, ``secretKeyRef`` from the given Secret
  objects, ``fieldRef`` from the pod's metadata; plus the image's ``ENV`` (read from the
  Dockerfile), its PATH, ``JOB_COMPLETION_INDEX`` for an Indexed Job (the Job controller sets
  it), and PYTHONPATH to this repo bound at SITE (it stands in for the wheel in the image);
- as the manifest's ``runAsUser``/``runAsGroup``, with no supplementary groups and the kubelet's
  umask; the working directory is the manifest's ``workingDir``;
- each ``volumeMount`` is an emptyDir (mode 0777) under one stand-in folder. In a private mount
  namespace of its own, a mount whose path exists here (``/tmp``, ``/dev/shm``) is bind-mounted
  over it, so the pod's /tmp is its volume and not this machine's; a path that does not exist
  here (``/cache``) stays at its stand-in folder and the env values naming it are rewritten.
  The same namespace makes this Python reachable for the pod's user wherever it lives (it
  stands in for the image's interpreter): its prefixes, console scripts and site-packages are
  bound back read-only at their own paths when a pod mount hides them (a venv under /tmp) or a
  closed folder lies above them (pyenv under a 0700 home, covered by a tmpfs so the pod can
  neither read nor write root's home).

Everything else on the machine is as the pod's user finds it: not writable outside the mounts
(``outside_writes`` checks that with a file-tree compare). Needs root (mount namespace, setuid).
"""

from __future__ import annotations

import base64
import ctypes
import os
import re
import shutil
import signal
import site
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from tests.specs import write_spec

REPO = Path(__file__).resolve().parent.parent
NODE = "node-0"
# Where the pod finds the package (standing in for the wheel in the image): the repo bound
# read-only on a tmpfs over /mnt inside the pod's mount namespace, so no pod mount hides it
# (a checkout under /tmp vanishes behind the pod's /tmp emptyDir) and nothing is written here.
SITE_PARENT = "/mnt"
SITE = f"{SITE_PARENT}/backbones"
UMASK = 0o022  # containerd's default

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18


def console(name: str = "backbones") -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name}: console script not installed (pip install -e .)")
    return path


def render(doc: dict, workdir: Path) -> dict:
    """The Job that ``backbones render SPEC`` prints for ``doc``."""
    path = write_spec(workdir, doc, f"{doc['name']}.spec.json")
    out = subprocess.run(
        [console(), "render", str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    (job,) = [d for d in yaml.safe_load_all(out.stdout) if d and d.get("kind") == "Job"]
    return job


def image_env(dockerfile: Path = REPO / "Dockerfile") -> dict[str, str]:
    """The ``ENV`` of the Dockerfile's last stage (the image the pod runs)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    last = text[text.rindex("\nFROM ") :]
    env: dict[str, str] = {}
    for line in last.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line[4:]))
    return env


def indexes(job: dict) -> list[int | None]:
    spec = job["spec"]
    if spec.get("completionMode") == "Indexed":
        return list(range(spec["completions"]))
    return [None]


def container(job: dict) -> dict:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


def port(job: dict, name: str = "metrics") -> int:
    return next(p["containerPort"] for p in container(job).get("ports", []) if p["name"] == name)


def secret_values(secret: dict) -> dict[str, str]:
    values = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    values.update(secret.get("stringData") or {})
    return values


def failure_rule(job: dict, exit_code: int, container_name: str) -> dict | None:
    """The first podFailurePolicy rule that matches a container exit code, as the Job
    controller evaluates them (in order; ``In`` / ``NotIn``; a rule may name the container)."""
    for rule in job["spec"].get("podFailurePolicy", {}).get("rules", []):
        on = rule.get("onExitCodes")
        if not on or on.get("containerName", container_name) != container_name:
            continue
        listed = exit_code in on["values"]
        if listed == (on["operator"] == "In"):
            return rule
    return None


class Pod:
    """One pod of ``job`` (``index`` for an Indexed Job), with fresh emptyDir volumes."""

    def __init__(self, job: dict, index: int | None, secrets: list[dict], attempt: int = 0):
        self.job, self.index = job, index
        pod_spec = job["spec"]["template"]["spec"]
        self.container = c = container(job)
        security = {**pod_spec.get("securityContext", {}), **c.get("securityContext", {})}
        self.uid = int(security["runAsUser"])
        self.gid = int(security.get("runAsGroup", self.uid))
        self.grace = float(pod_spec.get("terminationGracePeriodSeconds", 30))
        suffix = f"-{index}" if index is not None else ""
        self.name = f"{job['metadata']['name']}{suffix}-a{attempt}"
        self.base = Path(tempfile.mkdtemp(prefix="backbones-pod-", dir="/var/tmp"))
        self.base.chmod(0o755)
        self.mounts: dict[str, Path] = {}  # mountPath -> stand-in folder
        for m in c.get("volumeMounts", []):
            d = self.base / m["name"]
            d.mkdir()
            d.chmod(0o777)  # emptyDir
            self.mounts[m["mountPath"]] = d
        self.bound = {p: d for p, d in self.mounts.items() if Path(p).is_dir()}
        self.moved = {p: d for p, d in self.mounts.items() if p not in self.bound}
        self.env = self._env(secrets, job["metadata"].get("namespace", "default"))
        self.cwd = c.get("workingDir", "/")
        self.command = [*c.get("command", []), *c.get("args", [])]
        self.command[0] = console(self.command[0])
        self.proc: subprocess.Popen | None = None
        self.out = self.base / "log"

    def path(self, mount_path: str) -> Path:
        """Where a path inside the pod lies on this machine."""
        for p, d in sorted(self.mounts.items(), key=lambda kv: -len(kv[0])):
            if mount_path == p or mount_path.startswith(p.rstrip("/") + "/"):
                return d / os.path.relpath(mount_path, p)
        return Path(mount_path)

    def _env(self, secrets: list[dict], namespace: str) -> dict[str, str]:
        by_name = {s["metadata"]["name"]: secret_values(s) for s in secrets}
        fields = {
            "metadata.namespace": namespace,
            "metadata.name": self.name,
            "spec.nodeName": NODE,
        }
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"}
        env.update(image_env())
        for e in self.container.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
                continue
            src = e["valueFrom"]
            if "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                value = by_name.get(ref["name"], {}).get(ref["key"])
                if value is None:
                    if ref.get("optional"):
                        continue
                    raise KeyError(f"Secret {ref['name']!r} has no key {ref['key']!r}")
                env[e["name"]] = value
            elif "fieldRef" in src:
                env[e["name"]] = fields[src["fieldRef"]["fieldPath"]]
            else:
                raise NotImplementedError(f"env {e['name']}: {src}")
        if self.index is not None:
            env["JOB_COMPLETION_INDEX"] = str(self.index)
        for p, d in sorted(self.moved.items(), key=lambda kv: -len(kv[0])):
            for k, v in env.items():
                if v == p or v.startswith(p.rstrip("/") + "/"):
                    env[k] = str(d) + v[len(p.rstrip("/")) :]
        env["PYTHONPATH"] = SITE  # the repo, standing in for the wheel installed in the image
        return env

    # ---- the process ------------------------------------------------------------------------

    def _enter(self) -> None:
        """In the child, before exec: the pod's mounts, working directory and user."""
        _check(_libc.unshare(_CLONE_NEWNS), "unshare")
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
        _mount("tmpfs", SITE_PARENT, "tmpfs", 0, "mode=0755")
        os.mkdir(SITE)
        _bind_read_only(str(REPO), SITE)
        # The interpreter, staged before anything covers it: a pod volume (a venv under /tmp)
        # or the tmpfs over a closed home (pyenv under /root) would hide it from the pod.
        hidden = _python_roots(self.bound)
        for i, root in enumerate(hidden):
            _mount(str(root), str(self.base / f".python-{i}"), None, _MS_BIND | _MS_REC)
        for closed in {c for root in hidden if (c := _closed_ancestor(root))}:
            _mount("tmpfs", str(closed), "tmpfs", 0, "mode=0755")
        for p, d in self.bound.items():
            _mount(str(d), p, None, _MS_BIND)
        for i, root in enumerate(hidden):
            root.mkdir(parents=True, exist_ok=True)  # inside the tmpfs or the pod's volume
            _bind_read_only(str(self.base / f".python-{i}"), str(root))
        os.chdir(self.path(self.cwd) if self.cwd in self.moved else self.cwd)
        os.setgroups([])
        os.setgid(self.gid)
        os.setuid(self.uid)
        os.umask(UMASK)

    def start(self) -> Pod:
        for i in range(len(_python_roots(self.bound))):
            (self.base / f".python-{i}").mkdir(exist_ok=True)
        self._log = open(self.out, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=self._enter,
        )
        return self

    def poll(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def wait(self, timeout: float = 300) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._close()

    def _close(self) -> None:
        if not self._log.closed:
            self._log.close()
            self._text = self.out.read_text(errors="replace")

    def terminate(self) -> float:
        """What the kubelet does on delete/preemption: SIGTERM, SIGKILL after the grace period.
        Returns the seconds the process took to exit."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        took = time.monotonic() - t0
        self._close()
        return took

    def log(self) -> str:
        """Its stdout and stderr (kubectl logs)."""
        return self._text if self._log.closed else self.out.read_text(errors="replace")

    def scrape(self) -> str | None:
        """/metrics on the port the manifest names, or None when nothing answers."""
        try:
            url = f"http://127.0.0.1:{port(self.job)}/metrics"
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        except OSError:
            return None

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None:
            self._close()
        shutil.rmtree(self.base, ignore_errors=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _bind_read_only(src: str, target: str) -> None:
    _mount(src, target, None, _MS_BIND | _MS_REC)
    _mount(None, target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)


def _closed_ancestor(path: Path) -> Path | None:
    """The outermost folder above ``path`` that other users cannot enter (a 0700 home)."""
    return next((a for a in reversed(path.parents) if not a.stat().st_mode & stat.S_IXOTH), None)


def _python_roots(bound: dict[str, Path]) -> list[Path]:
    """The folders this interpreter needs that the pod's user would not see: its prefixes, the
    console scripts beside ``sys.executable`` and its site-packages, wherever they live (a venv
    under /tmp, inside the checkout, pyenv under a closed home, a system prefix), when a pod
    mount covers them or a closed folder lies above them. Outermost first, none inside another."""
    needed = {
        Path(p).resolve()
        for p in (
            sys.prefix,
            sys.base_prefix,
            sys.exec_prefix,
            sys.base_exec_prefix,
            Path(sys.executable).parent,
            Path(sys.executable).resolve().parent,
            *site.getsitepackages(),
        )
    }
    covers = [Path(p) for p in bound]
    hidden = [
        p
        for p in needed
        if _closed_ancestor(p) is not None or any(p == c or c in p.parents for c in covers)
    ]
    outermost = [p for p in hidden if not any(q in p.parents for q in hidden)]
    return sorted(outermost, key=lambda p: (len(p.parts), str(p)))


# ---- nothing written outside the mounts -------------------------------------------------------

# Where a non-root user can write on this machine outside a pod's mounts (world-writable
# folders); /tmp and /dev/shm are the pod's own volumes inside its namespace.
SHARED = ("/var/tmp", "/run", "/dev/mqueue", "/var/lock")
_SKIP = {".git", "build", ".pytest_cache", ".ruff_cache"}


def tree(roots=(REPO, *SHARED)) -> dict[str, tuple]:
    """path -> (owner, size, mtime) of everything under ``roots``, pods' stand-ins excepted."""
    out: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [
                d for d in dirnames if d not in _SKIP and not d.startswith("backbones-pod-")
            ]
            for name in [*dirnames, *filenames]:
                p = os.path.join(dirpath, name)
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    continue
                out[p] = (st.st_uid, st.st_size, st.st_mtime_ns)
    return out


def outside_writes(before: dict, after: dict, uid: int) -> list[str]:
    """Paths the pod's user created or changed outside its mounts: in the repo any change at
    all; in the shared world-writable folders, entries owned by the pod's user (other
    processes on this machine write there too)."""
    changed = []
    for p, meta in after.items():
        if before.get(p) == meta:
            continue
        if p.startswith(str(REPO)) or meta[0] == uid:
            changed.append(p)
    return sorted(changed)
