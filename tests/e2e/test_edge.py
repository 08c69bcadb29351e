"""The edge of a real gateway process: what a client without a key (or with one) can make it
hold. Raw sockets, so that the client can misbehave as it likes."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from gateway.controlplane.registry import hash_key
from gateway.local_stack import Child, wait_healthy
from tests.conftest import free_port
from tests.e2e.processes import _child, start_gateway

KEY, ADMIN = "fw_edge_key", "fw_edge_admin"
BIG = 100 << 20
LIMIT = 1 << 20
HEADER_TIMEOUT = 1.0


class Gateway:
    def __init__(self, child: Child, port: int) -> None:
        self.child, self.port = child, port
        self.url = f"http://127.0.0.1:{port}"

    def rss(self) -> int:
        with open(f"/proc/{self.child.process.pid}/status") as f:
            line = next(line for line in f if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


def no_worker_registry(folder: Path) -> Path:
    """One account, one deployment whose replica is nowhere (these tests need no worker)."""
    registry = folder / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "fireworks", "api_keys": [hash_key(KEY)]}],
        "deployments": [{"id": "d", "account": "fireworks", "default": True,
                         "model": "accounts/fireworks/models/m",
                         "replicas": [{"url": f"http://127.0.0.1:{free_port()}"}]}]}))
    return registry


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    registry = no_worker_registry(tmp_path_factory.mktemp("edge"))
    port = free_port()
    child = start_gateway(registry, port, admin_key=ADMIN, max_body_bytes=str(LIMIT),
                          header_timeout=str(HEADER_TIMEOUT), keep_alive_timeout="1",
                          body_timeout="1", health_check_interval="0", log_level="warning")
    yield Gateway(child, port)
    child.stop()


def answer(sock: socket.socket, seconds: float = 5) -> tuple[int, bytes, bool]:
    """Status, body and whether the server closed the connection after it."""
    sock.settimeout(seconds)
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            raise ConnectionError(f"closed without an answer: {data!r}")
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    sock.settimeout(0.3)  # a connection closed after its answer closes at once
    try:
        closed = sock.recv(1) == b""
    except TimeoutError:
        closed = False
    except ConnectionError:  # a reset: closed while the client was still sending
        closed = True
    return int(head.split()[1]), body, closed


def send_big(sock: socket.socket, head: bytes, size: int, chunked: bool) -> threading.Thread:
    """Send a head and `size` bytes of body in the background, until the server stops
    reading."""
    def run() -> None:
        try:
            sock.sendall(head)
            part = b"x" * (1 << 20)
            for _ in range(size >> 20):
                sock.sendall(b"100000\r\n" + part + b"\r\n" if chunked else part)
        except OSError:
            pass
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def request_head(method: str, path: str, key: str | None, size: int, chunked: bool) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: gw", "content-type: application/json"]
    lines.append("transfer-encoding: chunked" if chunked else f"content-length: {size}")
    if key:
        lines.append(f"authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("method,path", [("POST", "/inference/v1/chat/completions"),
                                         ("PUT", "/admin/v1/accounts/fireworks/limits"),
                                         ("POST", "/v1/completions")])
@pytest.mark.parametrize("chunked", [False, True])
def test_an_unauthenticated_100mb_body_is_refused_before_it_is_read(
        gateway: Gateway, method: str, path: str, chunked: bool) -> None:
    before = gateway.rss()
    with gateway.connect() as sock:
        start = time.monotonic()
        send_big(sock, request_head(method, path, None, BIG, chunked), BIG, chunked)
        during = time.monotonic()
        health = httpx.get(f"{gateway.url}/health", timeout=5)  # others are not stalled
        health_seconds = time.monotonic() - during
        status, body, closed = answer(sock)
        seconds = time.monotonic() - start
    assert status == 401 and orjson.loads(body)["error"]["code"] == "UNAUTHORIZED"
    assert closed, "the rest of the body must not be read"
    assert seconds < 0.5, seconds
    assert health.status_code == 200 and health_seconds < 0.5
    assert gateway.rss() - before < 50 << 20


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_is_413(gateway: Gateway, chunked: bool) -> None:
    before = gateway.rss()
    with gateway.connect() as sock:
        start = time.monotonic()
        send_big(sock, request_head("POST", "/inference/v1/chat/completions", KEY, BIG,
                                    chunked), BIG, chunked)
        status, body, closed = answer(sock)
    assert status == 413 and orjson.loads(body)["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert closed and time.monotonic() - start < 2
    assert gateway.rss() - before < 50 << 20


def test_the_admin_key_is_checked_before_the_body_is_parsed(gateway: Gateway) -> None:
    response = httpx.put(f"{gateway.url}/admin/v1/accounts/fireworks/limits",
                         content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 401
    response = httpx.put(f"{gateway.url}/admin/v1/accounts/fireworks/limits",
                         content=b"x" * (LIMIT + 1), headers={"authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 413


def test_metrics_need_the_admin_key(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/metrics").status_code == 401
    response = httpx.get(f"{gateway.url}/metrics", headers={"authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 200 and "fwgw_" in response.text


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed the connection (reading whatever it sent)."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return time.monotonic() - start


def test_idle_and_slowloris_connections_are_closed(gateway: Gateway) -> None:
    idle = gateway.connect()
    slow = gateway.connect()
    slow.sendall(b"POST /inference/v1/completions HTTP/1.1\r\n")

    def drip() -> None:
        try:
            for i in range(20):
                time.sleep(0.2)
                slow.sendall(f"x-drip-{i}: y\r\n".encode())
        except OSError:
            pass
    threading.Thread(target=drip, daemon=True).start()
    seconds = closed_within(idle, HEADER_TIMEOUT + 1.5)
    assert seconds is not None and seconds < HEADER_TIMEOUT + 1
    assert closed_within(slow, 1.5) is not None
    idle.close()
    slow.close()


def test_an_idle_keep_alive_connection_is_closed(gateway: Gateway) -> None:
    with gateway.connect() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: gw\r\n\r\n")
        status, _, closed = answer(sock)
        assert status == 200 and not closed
        assert closed_within(sock, 2.5) is not None


def test_a_stalled_body_is_408(gateway: Gateway) -> None:
    with gateway.connect() as sock:
        sock.sendall(request_head("POST", "/inference/v1/completions", KEY, 100, False)
                     + b'{"model": ')
        status, _body, closed = answer(sock)
    assert status == 408 and closed


def test_headers_over_the_limit_are_431(gateway: Gateway) -> None:
    with gateway.connect() as sock:
        with contextlib.suppress(OSError):
            sock.sendall(b"GET /health HTTP/1.1\r\n" + b"x-big: " + b"y" * (1 << 20) + b"\r\n")
        status, _, closed = answer(sock)
    assert status == 431 and closed


def test_requests_succeed_while_2000_idle_connections_are_open(gateway: Gateway) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    idle = [gateway.connect() for _ in range(2000)]
    try:
        for _ in range(5):
            response = httpx.get(f"{gateway.url}/v1/models", timeout=5,
                                 headers={"authorization": f"Bearer {KEY}"})
            assert response.status_code == 200
    finally:
        for sock in idle:
            sock.close()


def test_with_1024_open_files_1100_idle_clients_leave_health_and_workers_served(
        tmp_path: Path) -> None:
    """`ulimit -n 1024`: the connection cap follows the open-files limit, and idle
    connections past it make room for new ones, so that a health probe and requests (each
    with its worker connection) still get through."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    fake, port = free_port(), free_port()
    upstream = _child(f"worker-{fake}", [sys.executable, "-m", "bench.fake_upstream",
                                         str(fake)])
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "fireworks", "api_keys": [hash_key(KEY)]}],
        "deployments": [{"id": "d", "account": "fireworks", "default": True,
                         "model": "accounts/fireworks/models/m",
                         "replicas": [{"url": f"http://127.0.0.1:{fake}"}]}]}))
    env = dict(os.environ, GATEWAY_REGISTRY_PATH=str(registry), GATEWAY_PORT=str(port),
               GATEWAY_LOG_LEVEL="warning", GATEWAY_HEALTH_CHECK_INTERVAL="0.5")
    child = _child(f"gateway-{port}", ["sh", "-c", "ulimit -n 1024 && exec "
                                       f"{sys.executable} -m gateway serve"], env)
    idle: list[socket.socket] = []
    try:
        wait_healthy(upstream, f"http://127.0.0.1:{fake}/health", "the fake worker", 30)
        wait_healthy(child, f"http://127.0.0.1:{port}/health", "the gateway", 60)
        with open(f"/proc/{child.process.pid}/limits") as limits:
            assert any(line.startswith("Max open files") and line.split()[3] == "1024"
                       for line in limits)
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(0.5)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for n in range(20):
                assert client.get("/health").status_code == 200
                answer = client.post("/inference/v1/completions", json={
                    "model": "accounts/fireworks/models/m", "prompt": "hi",
                    "stream": n % 2 == 1}, headers={"authorization": f"Bearer {KEY}"})
                assert answer.status_code == 200, answer.text
        closed = 0
        for sock in idle:  # the ones that made room were closed by the gateway
            sock.setblocking(False)
            try:
                closed += sock.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionError:
                closed += 1
        open_files = len(os.listdir(f"/proc/{child.process.pid}/fd"))
        print(f"1100 idle clients: {closed} closed by the gateway; it holds {open_files} "
              "files of its 1024")
        assert closed >= 1100 - (1024 - 128) // 2 and open_files < 1024
        assert "out of system resource" not in child.log_tail(200)
    finally:
        for sock in idle:
            sock.close()
        child.stop()
        upstream.stop()


def test_without_redis_usage_records_go_to_the_log(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    registry = no_worker_registry(tmp_path_factory.mktemp("logs"))
    port = free_port()
    child = start_gateway(registry, port, health_check_interval="0", log_level="info")
    try:
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=10,
                              headers={"authorization": f"Bearer {KEY}",
                                       "x-request-id": "logged-1"},
                              json={"model": "accounts/fireworks/models/m", "prompt": "x"})
        assert response.status_code == 503  # no worker there: a failed, recorded request
        assert "127.0.0.1" not in response.text  # where the worker is stays in the log
        deadline = time.monotonic() + 5
        while '"request_id":"logged-1"' not in child.log_tail(200):
            assert time.monotonic() < deadline, child.log_tail(50)
            time.sleep(0.1)
        line = next(line for line in child.log_tail(200).splitlines()
                    if '"request_id":"logged-1"' in line)
        assert "gateway.usage" in line and '"status":"error"' in line
    finally:
        child.stop()
