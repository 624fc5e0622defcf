"""One worker per run: a lease object in the run's output folder.

Two pods can end up on the same run id (a Job retried while a slow node still runs the old
pod, or two people submitting the same spec). Both writing checkpoints would interleave
epochs, so the second one must not start. The lease is ``lock.json`` beside the outputs:

- acquire: create it only if absent (``Store.create_exclusive``: O_EXCL on a folder,
  ``If-None-Match: *`` on S3). If present, it is honoured while its heartbeat is fresh; a
  stale lease (holder preempted or killed) is taken over. On the same host a dead holder's pid
  makes it stale at once, so a local restart after ``kill -9`` does not wait for the TTL.
- hold: a daemon thread renews the heartbeat every ``ttl / 4`` seconds.
- release: delete it on exit, if it is still ours.

A worker that finds the lease held (``with Lease(...)``) does not give up at once: after a
SIGKILL the dead holder's heartbeat stays fresh for up to its TTL, and a replacement pod that
exited 75 at once would only spend another attempt. It waits, bounded by the TTL plus a margin,
and logs that it does: a heartbeat that stays put expires and the lease is taken over; a
heartbeat that moves (or a new owner) is a live worker, and then it exits retriable (75) as
soon as it sees that. Kubernetes retries it later, by which time the other worker has finished
(its summary then makes this one a no-op) or died.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from service.errors import BackbonesError, RetriableError, UserError
from service.outputs.folder import LOCK, SPEC
from service.storage import NotFound, Store

LEASE_KEY = LOCK

log = logging.getLogger(__name__)


def default_ttl() -> float:
    return float(os.environ.get("BACKBONES_LEASE_TTL", "60"))


class LeaseHeld(RetriableError):
    """Another live worker holds this run."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    def __init__(self, store: Store, *, ttl: float | None = None, key: str = LEASE_KEY):
        self.store = store
        self.key = key
        self.ttl = default_ttl() if ttl is None else ttl
        self.owner = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.waited = False  # acquire() found the lease held and waited for it

    def _body(self) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "heartbeat": time.time(),
                "ttl": self.ttl,
            }
        ).encode()

    def _read(self) -> dict | None:
        try:
            return json.loads(self.store.read_bytes(self.key))
        except NotFound:
            return None
        except ValueError:  # a torn or foreign file: treat as stale
            return {}

    def _stale(self, held: dict) -> bool:
        if not held:
            return True
        if held.get("host") == socket.gethostname() and not _pid_alive(int(held.get("pid", 0))):
            return True
        return time.time() - float(held.get("heartbeat", 0)) > float(held.get("ttl", self.ttl))

    def acquire(self, wait: float | None = 0.0) -> Lease:
        """Take the lease. ``wait``: seconds to wait for a holder to release it; ``None``: wait
        only while the holder may be dead (its heartbeat has not moved), at most its TTL plus
        a margin, then take it over. A live holder raises LeaseHeld (retriable)."""
        takeover = wait is None
        deadline = time.monotonic() + (0.0 if takeover else wait)
        seen: tuple | None = None  # (owner, heartbeat) of the holder when we started waiting
        while True:
            if self.store.create_exclusive(self.key, self._body()):
                break
            held = self._read()
            if held is None:
                continue  # released between our create and read: try again
            if self._stale(held):
                # Take over, then confirm: if two workers race for a stale lease, the one whose
                # write landed last wins and the other sees a foreign owner and backs off.
                self.store.write_bytes(self.key, self._body())
                time.sleep(min(0.2, self.ttl / 10))
                if (self._read() or {}).get("owner") == self.owner:
                    break
                continue
            beat = (held.get("owner"), held.get("heartbeat"))
            if takeover and seen is None:
                seen = beat
                ttl = max(float(held.get("ttl", self.ttl)), self.ttl)
                deadline = time.monotonic() + ttl + self.margin(ttl)
                self.waited = True
                log.warning(
                    "%s: run is held by %s (heartbeat %.0fs ago); waiting up to %.0fs for it to "
                    "expire (a killed worker) or renew (a live one)",
                    self.store.uri,
                    held.get("owner"),
                    time.time() - float(held.get("heartbeat", 0)),
                    ttl + self.margin(ttl),
                )
            alive = takeover and beat != seen
            if alive or time.monotonic() >= deadline:
                age = time.time() - float(held.get("heartbeat", 0))
                raise LeaseHeld(
                    f"{self.store.uri}: run is held by another worker ({held.get('owner')}, "
                    f"heartbeat {age:.0f}s ago); retry later"
                )
            time.sleep(min(1.0, max(0.05, self.ttl / 8)))
        # Rule: no module is first imported inside a thread or pool; acquire() wrote through
        # the store on this thread, which imported and built what the renewals use.
        self._thread = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def margin(ttl: float) -> float:
        """Beyond the TTL: one renewal period and a few polls, for clocks and slow storage."""
        return max(5.0, ttl / 4)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if (self._read() or {}).get("owner") != self.owner:
                    return  # taken over: the worker notices at its next checkpoint
                self.store.write_bytes(self.key, self._body())
            except Exception:  # storage blip: try again next beat; a long outage expires us
                continue

    def held(self) -> bool:
        """Still ours? Checked before each checkpoint so a worker that lost it stops writing."""
        try:
            return (self._read() or {}).get("owner") == self.owner
        except UserError:
            raise  # the bucket is gone, access revoked: no retry mends it, and it says so
        except Exception:
            return True  # unknown (storage down): the checkpoint write itself will fail

    def lost(self) -> BackbonesError:
        """Why ``held()`` said no. Another owner's lease, or none with the run's spec.json
        still there (a taker-over wrote it, finished and let go): LeaseLost. Neither lease nor
        spec.json: the run folder (or its bucket) was deleted, which no retry mends. (SeaweedFS
        creates a deleted bucket again on the next PUT, so "no such bucket" may become this.)"""
        try:
            if self._read() is None and not self.store.exists(SPEC):
                return UserError(
                    f"{self.store.uri}: the run folder was deleted while this worker held it "
                    "(lock.json and spec.json are gone); stopping without writing more"
                )
        except BackbonesError as e:  # S3: "no such bucket", access revoked, endpoint down
            return e
        return LeaseLost(f"{self.store.uri}: lost the run lease to another worker")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if (self._read() or {}).get("owner") == self.owner:
                self.store.delete(self.key)
        except Exception:
            pass  # expires by itself

    def __enter__(self) -> Lease:
        # The worker's way in: a dead holder's lease is waited out, a live holder's refused.
        return self.acquire(wait=None)

    def __exit__(self, *exc) -> None:
        self.release()


class LeaseLost(RetriableError):
    """Another worker took this run over: this one must not write anything more."""


class LeasedStore:
    """The run's store as seen by the lease holder: every write first checks the lease is ours.

    A worker frozen past the TTL (a stalled node, a partition) wakes up to find another worker
    has taken over, perhaps finished. Checking here, beneath every writer (checkpoints, best
    weights, metrics.jsonl, status.json), means none of them can clobber the new holder's files
    whatever they were about to do. Reads pass straight through.
    """

    def __init__(self, store: Store, lease: Lease):
        self.store = store
        self.lease = lease
        self.uri = store.uri

    def _check(self) -> None:
        if not self.lease.held():
            raise self.lease.lost()

    def write_bytes(self, key: str, data: bytes) -> None:
        self._check()
        self.store.write_bytes(key, data)

    def upload_file(self, path, key: str) -> None:
        self._check()
        self.store.upload_file(path, key)

    def delete(self, key: str) -> None:
        self._check()
        self.store.delete(key)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        self._check()
        return self.store.create_exclusive(key, data)

    def discard_partials(self, **kw) -> int:
        self._check()
        return self.store.discard_partials(**kw)

    def __getattr__(self, name: str):  # read_bytes, exists, list, download_file, child
        return getattr(self.store, name)
