"""One worker per run: the lease in the run's output folder (issue 8, concurrency)."""

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from service.run.lease import Lease, LeaseHeld
from service.storage.local import LocalStore


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "run")


def test_first_worker_takes_the_lease_and_releases_it(store):
    with Lease(store, ttl=5) as lease:
        held = json.loads(store.read_bytes("lock.json"))
        assert held["owner"] == lease.owner
    assert not store.exists("lock.json")


def test_second_worker_refuses_while_the_first_is_alive(store):
    with Lease(store, ttl=5) as first:
        with pytest.raises(LeaseHeld, match=r"run is held by another worker .*retry later"):
            Lease(store, ttl=5).acquire()
        assert first.held()


def test_second_worker_waits_for_the_first_to_finish(store):
    first = Lease(store, ttl=5).acquire()
    threading.Timer(0.3, first.release).start()
    second = Lease(store, ttl=5).acquire(wait=5)
    assert second.held()
    second.release()


def test_lease_of_a_killed_worker_on_this_host_is_taken_over_at_once(store):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    store.write_bytes(
        "lock.json",
        json.dumps(
            {
                "owner": "ghost",
                "host": socket.gethostname(),
                "pid": pid,
                "heartbeat": time.time(),
                "ttl": 60,
            }
        ).encode(),
    )
    lease = Lease(store, ttl=60).acquire()
    assert lease.held()
    lease.release()


def test_lease_with_an_old_heartbeat_is_taken_over(store):
    store.write_bytes(
        "lock.json",
        json.dumps(
            {
                "owner": "other-node/1/x",
                "host": "other-node",
                "pid": 1,
                "heartbeat": time.time() - 120,
                "ttl": 60,
            }
        ).encode(),
    )
    lease = Lease(store, ttl=60).acquire()
    assert lease.held()
    lease.release()


def test_heartbeat_keeps_a_long_run_alive(store):
    lease = Lease(store, ttl=0.4).acquire()
    time.sleep(1.0)  # more than two TTLs: only the heartbeat keeps it fresh
    with pytest.raises(LeaseHeld):
        _foreign_acquire(store)
    lease.release()


def _foreign_acquire(store):
    """A lease from 'another host', so the pid check cannot apply."""
    lease = Lease(store, ttl=0.4)
    lease._stale = lambda held: time.time() - held["heartbeat"] > held["ttl"]  # no pid shortcut
    return lease.acquire()


# ---- a replacement pod and a dead holder (issue 16) ------------------------------------------

HOLDER = """
import socket, sys, time
socket.gethostname = lambda: "dead-node"  # another node: the same-host pid check cannot apply
from service.run.lease import Lease
from service.storage.local import LocalStore
lease = Lease(LocalStore(sys.argv[1]), ttl=float(sys.argv[2])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _start_holder(store, ttl: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store.root), str(ttl)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_replacement_waits_out_a_killed_holders_lease_instead_of_exiting_75(store, caplog):
    """SIGKILL (OOM, node crash): the dead holder's heartbeat stays fresh for up to its TTL.
    A contender started within the TTL waits for it to expire, says so, then takes over."""
    holder = _start_holder(store, ttl=3)
    holder.kill()
    holder.wait()
    assert json.loads(store.read_bytes("lock.json"))["host"] == "dead-node"
    caplog.set_level("WARNING", logger="service.run.lease")
    with Lease(store, ttl=3) as lease:  # the worker's way in
        assert lease.held() and lease.waited
        assert json.loads(store.read_bytes("lock.json"))["owner"] == lease.owner
    (line,) = [r.getMessage() for r in caplog.records]
    assert "run is held by dead-node/" in line and "waiting up to" in line


def test_a_contender_gives_up_as_soon_as_a_live_holders_heartbeat_moves(store):
    holder = _start_holder(store, ttl=0.8)  # renews every 0.2 s
    try:
        with pytest.raises(LeaseHeld, match="run is held by another worker"):
            Lease(store, ttl=60).__enter__()  # would wait ~75 s for a dead one
        assert json.loads(store.read_bytes("lock.json"))["host"] == "dead-node"
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_that_finishes_while_a_contender_waits_hands_over(store):
    first = Lease(store, ttl=60)
    first.acquire()
    second = Lease(store, ttl=60)
    threading.Timer(0.3, first.release).start()
    with second:
        assert second.waited  # the worker then re-reads the summary before training
