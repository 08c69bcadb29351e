"""Pods as replicas: a dns+http replica discovered through a real DNS server (dnsmasq), each
address a replica of its own, with pods as real HTTP servers on 127.0.0.x (one port, as pods
behind a headless Service have). Pods come and go while requests run."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import free_port
from tests.dns_server import DnsServer
from tests.unit.harness import Harness, build, registry

pytestmark = pytest.mark.asyncio(loop_scope="function")
KEY, MODEL, NAME = "k-discovery", "accounts/fireworks/models/m", "workers.test"


class Pod:
    """A worker pod: answers completions with its own address."""

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.sick = False
        self.served = 0
        pod = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def answer(self, status: int, body: dict[str, Any]) -> None:
                data = orjson.dumps(body)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self.answer(500 if pod.sick else 200, {})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                if pod.sick:
                    self.answer(500, {"error": {"message": "sick"}})
                    return
                pod.served += 1
                self.answer(200, {
                    "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "text": pod.address, "finish_reason": "stop",
                                 "logprobs": None}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.server = ThreadingHTTPServer((address, port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer()
    yield server
    server.stop()


def gateway_app(tmp_path: Path, dns: DnsServer, port: int) -> Harness:
    return build(tmp_path, registry_of=registry([f"dns+http://{NAME}:{port}"],
                                                accounts={"fireworks": KEY}),
                 dns_server=dns.address, discovery_interval=0.1, health_check_interval=0.2,
                 eject_after_failures=1, ejection_seconds=60,
                 prefix_affinity_bytes=0)  # unkeyed: least loaded


async def ask(client: httpx.AsyncClient, key: str | None) -> str:
    """One request; the pod that answered it."""
    headers = {"Authorization": f"Bearer {KEY}"} | ({"x-session-affinity": key} if key else {})
    response = await client.post("/v1/completions", headers=headers,
                                 json={"model": MODEL, "prompt": "x"})
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


async def until(seen: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Until the gateway sees it (discovery every 0.1 s, health checks every 0.2 s: longer
    on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while not seen():
        assert time.monotonic() < deadline, f"the gateway never saw {what}"
        await asyncio.sleep(0.05)


def in_rotation(app: Harness, port: int) -> set[str]:
    """The pods' addresses the gateway would send a request to."""
    gateway = app.gateway
    (deployment,) = gateway.store.current.data.deployments
    return {r.url.removeprefix("http://").removesuffix(f":{port}")
            for r in gateway.replicas.in_rotation(deployment)}


async def test_pods_come_and_go_while_requests_run(tmp_path: Path, dns: DnsServer) -> None:
    port = free_port()
    pods = {a: Pod(a, port) for a in ("127.0.0.2", "127.0.0.3", "127.0.0.4")}
    dns.set({NAME: ["127.0.0.2", "127.0.0.3"]})
    app = gateway_app(tmp_path, dns, port)
    # 48 keys: with 12, no key ranked the new pod first for about 1 port in 130 (the pods'
    # URLs carry a free port), and the test failed.
    keys = [f"session-{n}" for n in range(48)]
    trace: list[tuple[str, str, str]] = []  # (phase, key, pod)
    failures: list[Exception] = []
    stop = asyncio.Event()
    async with app.running() as client:

        async def keep_asking() -> None:  # unkeyed traffic all along: none may fail
            while not stop.is_set():
                try:
                    await ask(client, None)
                except Exception as exc:  # collected, asserted below
                    failures.append(exc)
                await asyncio.sleep(0.005)

        async def phase(name: str) -> dict[str, str]:
            placed = {key: await ask(client, key) for key in keys}
            trace.extend((name, key, pod) for key, pod in placed.items())
            return placed

        background = asyncio.create_task(keep_asking())
        two = await phase("two pods")
        assert set(two.values()) == {"127.0.0.2", "127.0.0.3"}
        assert await phase("two pods again") == two  # affinity holds per pod

        dns.set({NAME: ["127.0.0.2", "127.0.0.3", "127.0.0.4"]})  # a pod appears
        await until(lambda: in_rotation(app, port) == {"127.0.0.2", "127.0.0.3", "127.0.0.4"},
                    "the new pod")
        three = await phase("three pods")
        moved = {k for k in keys if three[k] != two[k]}
        assert moved and all(three[k] == "127.0.0.4" for k in moved)  # only to the new pod

        dns.set({NAME: ["127.0.0.3", "127.0.0.4"]})  # a pod leaves (still up, draining)
        await until(lambda: in_rotation(app, port) == {"127.0.0.3", "127.0.0.4"},
                    "the pod gone from the name")
        await asyncio.sleep(0.2)  # what was sent to it before has been answered
        served_before = pods["127.0.0.2"].served
        left = await phase("127.0.0.2 gone")
        assert pods["127.0.0.2"].served == served_before  # no new request reaches it
        assert all(left[k] == three[k] for k in keys if three[k] != "127.0.0.2")
        pods["127.0.0.2"].stop()

        pods["127.0.0.3"].sick = True  # a sick pod is ejected alone
        await until(lambda: in_rotation(app, port) == {"127.0.0.4"}, "the sick pod ejected")
        sick = await phase("127.0.0.3 sick")
        assert set(sick.values()) == {"127.0.0.4"}
        gateway = app.gateway
        assert not gateway.replicas.health.is_healthy(f"http://127.0.0.3:{port}")
        assert gateway.replicas.health.is_healthy(f"http://127.0.0.4:{port}")
        stop.set()
        await background
    for pod in pods.values():
        if pod.address != "127.0.0.2":
            pod.stop()
    print("\n".join(f"{phase_name:<16} {key:<11} -> {pod}" for phase_name, key, pod in trace))
    assert failures == []
    unkeyed = Counter(p.address for p in pods.values() for _ in range(p.served))
    assert len(unkeyed) == 3  # least-outstanding spread the unkeyed traffic over every pod


async def test_a_failed_lookup_keeps_the_last_answer(tmp_path: Path, dns: DnsServer) -> None:
    port = free_port()
    pod = Pod("127.0.0.2", port)
    dns.set({NAME: ["127.0.0.2"]})
    app = gateway_app(tmp_path, dns, port)
    async with app.running() as client:
        assert await ask(client, None) == "127.0.0.2"
        dns.stop()  # the DNS server is gone: the pods are not
        await asyncio.sleep(2.5)  # past a lookup's 2 s lifetime
        assert await ask(client, None) == "127.0.0.2"
    pod.stop()


async def test_conversations_stay_on_their_pod_without_a_key(tmp_path: Path,
                                                             dns: DnsServer) -> None:
    port = free_port()
    pods = [Pod(a, port) for a in ("127.0.0.2", "127.0.0.3", "127.0.0.4")]
    dns.set({NAME: [p.address for p in pods]})
    app = gateway_app(tmp_path, dns, port)
    app.gateway.settings.prefix_affinity_bytes = 4096  # derived keys (the default)
    placed: dict[int, set[str]] = {}
    async with app.running() as client:
        for turn in range(3):
            for conversation in range(9):
                head = f"conversation {conversation}: " + "lorem ipsum " * 400  # > 4 KB
                response = await client.post(
                    "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                    json={"model": MODEL, "prompt": head + " next turn" * turn})
                assert response.status_code == 200
                placed.setdefault(conversation, set()).add(
                    response.json()["choices"][0]["text"])
    for pod in pods:
        pod.stop()
    assert all(len(where) == 1 for where in placed.values()), placed  # each on one pod
    assert len(set().union(*placed.values())) > 1  # and the conversations spread


def test_a_drained_name_drains_every_pod_it_resolves_to() -> None:
    from gateway.controlplane.registry import Replica
    from gateway.dataplane.discovery import Discovery, make_resolver

    discovery = Discovery(lambda: [], make_resolver(None))
    name = "dns+http://workers.prod.svc:8000"
    pods = [Replica(url="http://10.0.0.1:8000"), Replica(url="http://10.0.0.2:8000")]
    discovery.found[name] = pods
    listed = Replica(url="http://10.0.9.9:8000")
    assert [r.draining for r in discovery.expand([Replica(url=name), listed])] == \
        [False, False, False]
    drained = discovery.expand([Replica(url=name, draining=True), listed])
    assert [(r.url, r.draining) for r in drained] == [
        ("http://10.0.0.1:8000", True), ("http://10.0.0.2:8000", True),
        ("http://10.0.9.9:8000", False)]
    assert not any(p.draining for p in pods)  # the resolved pods themselves are unchanged
