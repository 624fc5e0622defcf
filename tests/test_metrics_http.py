"""The /metrics endpoint (service.run.metrics_http): where it listens, what it serves, and that
idle or half-open connections neither pin threads nor lock scrapers out (issue 22, point 6)."""

from __future__ import annotations

import http.client
import socket
import threading

import pytest

from service.k8s.render import render_job
from service.run.metrics import PrometheusObserver
from service.run.metrics_http import MAX_CONNECTIONS, MetricsServer, listen_address
from service.spec import parse_spec
from tests.fixtures.prometheus import free_port
from tests.specs import finetune


@pytest.fixture
def spec():
    return parse_spec(finetune(name="m", metrics={"port": 0}))


@pytest.fixture
def observer(spec, monkeypatch):
    """An observer serving /metrics the way a local run does: no address given."""
    monkeypatch.delenv("BACKBONES_POD", raising=False)
    monkeypatch.delenv("BACKBONES_METRICS_ADDR", raising=False)
    o = PrometheusObserver(spec, port=free_port(), pushgateway_url=None)
    yield o
    o.close()


def get(port: int, path: str, method: str = "GET", **headers) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_a_local_run_listens_on_loopback_only(observer):
    assert observer.server.server_address[0] == "127.0.0.1"


def test_the_rendered_pod_tells_the_worker_to_listen_on_every_interface(spec):
    """The pod's env (as rendered) names the pod, which the worker reads as "in a pod":
    Prometheus scrapes the pod's IP. A user may still choose the address."""
    env = render_job(spec)["spec"]["template"]["spec"]["containers"][0]["env"]
    in_pod = {e["name"]: e.get("value", "from the downward API") for e in env}
    assert listen_address(in_pod) == "0.0.0.0"
    assert listen_address({}) == "127.0.0.1"
    assert listen_address({**in_pod, "BACKBONES_METRICS_ADDR": "10.0.0.7"}) == "10.0.0.7"


def test_only_metrics_is_served(observer):
    port = observer.server.server_address[1]
    status, body = get(port, "/metrics")
    assert status == 200 and b"backbones_run_info{" in body
    assert get(port, "/metrics?name[]=backbones_epoch")[0] == 200
    for path in ("/", "/metrics/x", "/favicon.ico", "/../metrics"):
        assert get(port, path)[0] == 404, path
    assert get(port, "/metrics", method="POST")[0] == 405
    openmetrics = "application/openmetrics-text; version=1.0.0"
    status, body = get(port, "/metrics", Accept=openmetrics)
    assert status == 200 and body.endswith(b"# EOF\n")  # what the scraper asked for


def test_half_open_connections_neither_pin_threads_nor_lock_scrapers_out(observer):
    """100 clients connect and send nothing, or half a request line, and keep the socket open:
    a scrape is still answered, no thread is added per connection, and at most
    MAX_CONNECTIONS stay open on the server's side."""
    port = observer.server.server_address[1]
    threads_before = threading.active_count()
    idle = []
    try:
        for i in range(100):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 2:
                s.sendall(b"GET /metr")
            idle.append(s)
        status, body = get(port, "/metrics")
        assert status == 200 and b"backbones_run_info{" in body
        assert threading.active_count() <= threads_before
        assert observer.server.open_connections <= MAX_CONNECTIONS
    finally:
        for s in idle:
            s.close()


def test_an_idle_connection_is_closed(spec):
    server = MetricsServer("127.0.0.1", 0, lambda a: (b"x 1\n", "text/plain"), idle_seconds=0.3)
    try:
        with socket.create_connection(server.server_address, timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
            assert s.recv(100) == b""  # closed by the server, well before the 10 s timeout
    finally:
        server.shutdown()


def test_a_request_head_over_8_kib_is_refused(spec):
    server = MetricsServer("127.0.0.1", 0, lambda a: (b"x 1\n", "text/plain"))
    try:
        with socket.create_connection(server.server_address, timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000)
            assert s.recv(100).startswith(b"HTTP/1.0 431 ")
    finally:
        server.shutdown()
