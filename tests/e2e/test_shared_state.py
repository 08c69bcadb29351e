"""Two gateway processes sharing one real redis-server, in front of real vLLM workers:
registry changes, rate limits, usage records, cross-account probes, a Redis restart, and a
worker killed and brought back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.controlplane.registry import Replica
from gateway.controlplane.usage import UsageRecord, usage_record
from gateway.dataplane.replicas import rendezvous_rank
from gateway.local_stack import Child
from tests.conftest import free_port
from tests.e2e.conftest import API_KEY, MODEL, OTHER_KEY, write_registry
from tests.e2e.processes import start_gateway, start_worker
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e
ADMIN_KEY = "fw_test_admin_key"
PREFIX = "fwgw:"


@dataclass
class Pair:
    """Two gateways over one Redis."""

    urls: list[str]
    redis: RedisServer
    worker_url: str
    children: list[Child] = field(default_factory=list)

    def admin(self, *args: str, gateway: int = 0) -> Any:
        """The operator's CLI against one gateway."""
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "admin", *args, "--url", self.urls[gateway]],
            env=dict(os.environ, GATEWAY_ADMIN_KEY=ADMIN_KEY), capture_output=True, text=True,
            timeout=60)
        assert result.returncode == 0, result.stderr
        return orjson.loads(result.stdout)

    def records(self, account: str) -> list[UsageRecord]:
        client = self.redis.client()
        try:
            entries = client.xrange(f"{PREFIX}usage")
        finally:
            client.close()
        records = [usage_record(
            {k.decode(): v.decode() for k, v in fields.items() if v != b""})
            for _, fields in entries]
        return [r for r in records if r.account == account]


@pytest.fixture(scope="module")
def pair(smollm2_worker: str, redis_server: RedisServer,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    registry = write_registry(tmp_path_factory.mktemp("pair") / "registry.yaml",
                              smollm2_worker)
    ports = [free_port(), free_port()]
    children = [start_gateway(registry, port, redis_url=redis_server.url,
                              admin_key=ADMIN_KEY, health_check_interval="0.5")
                for port in ports]
    yield Pair([f"http://127.0.0.1:{p}" for p in ports], redis_server, smollm2_worker,
               children)
    for child in children:
        child.stop()


def complete(url: str, key: str, model: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/inference/v1/completions", timeout=120,
                      headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "prompt": "The capital of France is",
                            "max_tokens": 4, "temperature": 0} | body)


def new_account(pair: Pair, account: str) -> str:
    """A fresh account with one key (through the CLI)."""
    return str(pair.admin("keys", "create", account)["api_key"])


def test_a_deployment_added_through_one_gateway_is_served_by_the_other(pair: Pair) -> None:
    pair.admin("deployments", "put", "fireworks", "late", "--model",
               "accounts/fireworks/models/late", "--replica", pair.worker_url, "--default",
               gateway=0)
    added = time.monotonic()
    while True:
        response = complete(pair.urls[1], API_KEY, "accounts/fireworks/models/late",
                            max_tokens=1)
        if response.status_code == 200:
            break
        assert response.status_code == 404
        assert time.monotonic() - added < 1.0, "not visible on the other gateway in 1 s"
        time.sleep(0.02)
    seen_after = time.monotonic() - added
    print(f"deployment visible on the second gateway after {seen_after * 1000:.0f} ms")
    listed = pair.admin("deployments", "list", "fireworks", gateway=1)
    assert "accounts/fireworks/deployments/late" in [d["name"] for d in listed["deployments"]]


def test_a_limit_of_l_admits_exactly_l_of_3l_across_both_gateways(pair: Pair) -> None:
    key = new_account(pair, "limited")
    limit = 4
    pair.admin("limits", "limited", "--rpm", str(limit), gateway=1)
    time.sleep(1.0)  # both gateways have the limits (the poll is 0.25 s)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(
                client.post(f"{pair.urls[n % 2]}/inference/v1/completions",
                            headers={"Authorization": f"Bearer {key}"},
                            json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
                for n in range(3 * limit)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * limit + [429] * (2 * limit)
    refused = [r for r in responses if r.status_code == 429]
    assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in refused)
    assert all(r.headers["x-ratelimit-limit-requests"] == str(limit) for r in responses)
    assert {r.json()["error"]["code"] for r in refused} == {"RESOURCE_EXHAUSTED"}
    # Both gateways refused some: the count is shared, not per gateway.
    assert {str(r.url).split("/inference")[0] for r in refused} == set(pair.urls)


def test_cross_account_probes_are_refused(pair: Pair) -> None:
    key = new_account(pair, "acme")
    pair.admin("deployments", "put", "acme", "tuned", "--model", "accounts/acme/models/tuned",
               "--replica", pair.worker_url, "--default")
    time.sleep(0.6)
    assert complete(pair.urls[1], key, "accounts/acme/models/tuned").status_code == 200
    absent = complete(pair.urls[1], OTHER_KEY, "accounts/acme/deployments/absent")
    assert absent.status_code == 404
    for probe in ("accounts/acme/models/tuned", "accounts/acme/deployments/tuned",
                  "accounts/acme/models/tuned#accounts/acme/deployments/tuned",
                  f"{MODEL}#accounts/acme/deployments/tuned"):
        refused = complete(pair.urls[1], OTHER_KEY, probe)
        assert refused.status_code == 404, probe
        assert refused.json()["error"] == absent.json()["error"] | {
            "message": absent.json()["error"]["message"].replace(
                "accounts/acme/deployments/absent", probe)}
    for url in pair.urls:
        for key_used in (key, OTHER_KEY, API_KEY):
            for method, path in (("GET", "/admin/v1/accounts"),
                                 ("PUT", "/admin/v1/accounts/acme/limits"),
                                 ("POST", "/admin/v1/accounts/other/api-keys")):
                response = httpx.request(method, url + path, json={},
                                         headers={"Authorization": f"Bearer {key_used}"})
                assert response.status_code == 401, (method, path)


def stream_lines(url: str, key: str, request_id: str, close_after: int | None = None,
                 **body: Any) -> list[str]:
    """The data lines of a stream; with close_after, hang up after that many."""
    lines: list[str] = []
    with httpx.Client(timeout=120) as client, client.stream(
            "POST", f"{url}/inference/v1/completions",
            headers={"Authorization": f"Bearer {key}", "x-request-id": request_id},
            json={"model": MODEL, "prompt": "Once upon a time", "stream": True,
                  "temperature": 0} | body) as response:
        assert response.status_code == 200
        iterator = response.iter_lines()
        for line in iterator:
            if line.startswith("data: "):
                lines.append(line[6:])
            if close_after is not None and len(lines) >= close_after:
                response.close()  # the client goes away mid-stream
                break
    return lines


def test_exactly_one_usage_record_per_request_with_the_clients_token_counts(
        pair: Pair) -> None:
    key = new_account(pair, "metered")
    pair.admin("limits", "metered", "--generated-tpm", "100000")  # limited: settles too
    time.sleep(0.6)
    seen: dict[str, dict[str, Any]] = {}
    for n in range(3):
        response = httpx.post(f"{pair.urls[n % 2]}/inference/v1/completions", timeout=120,
                              headers={"Authorization": f"Bearer {key}",
                                       "x-request-id": f"json-{n}"},
                              json={"model": MODEL, "prompt": f"Count to {n}",
                                    "max_tokens": 3 + n})
        assert response.status_code == 200
        seen[f"json-{n}"] = response.json()["usage"]
    for n in range(2):
        lines = stream_lines(pair.urls[n % 2], key, f"stream-{n}", max_tokens=5)
        final = [orjson.loads(line) for line in lines if line != "[DONE]"][-1]
        seen[f"stream-{n}"] = final["usage"]
    aborted = stream_lines(pair.urls[0], key, "aborted-0", close_after=2, max_tokens=200,
                           ignore_eos=True)
    deadline = time.monotonic() + 10
    while len(pair.records("metered")) < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # and nothing more arrives
    records = {r.request_id: r for r in pair.records("metered")}
    assert len(pair.records("metered")) == 6 and len(records) == 6
    for request_id, usage in seen.items():
        record = records[request_id]
        assert record.status == "ok"
        assert (record.prompt_tokens, record.completion_tokens) == \
            (usage["prompt_tokens"], usage["completion_tokens"]), request_id
    cut = records["aborted-0"]
    assert (cut.status, cut.http_status) == ("aborted", 499)
    assert cut.prompt_tokens == records["stream-0"].prompt_tokens
    assert len(aborted) <= cut.completion_tokens < 200  # what was generated before the abort
    table = subprocess.run([sys.executable, "-m", "gateway", "usage", "--redis-url",
                            pair.redis.url], capture_output=True, text=True, check=True).stdout
    row = next(line for line in table.splitlines() if line.startswith("metered "))
    assert row.split()[1:5] == ["6", *(str(sum(getattr(r, name) for r in records.values()))
                                       for name in ("prompt_tokens", "cached_tokens",
                                                    "completion_tokens"))]


def test_redis_restart_under_load(pair: Pair) -> None:
    key = new_account(pair, "steady")
    pair.admin("limits", "steady", "--rpm", "10000", "--generated-tpm", "1000000")
    pair.admin("deployments", "put", "steady", "own", "--model", "accounts/steady/models/own",
               "--replica", pair.worker_url, "--default")
    time.sleep(0.6)
    results: list[tuple[str, int]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        n = 0
        while not stop.is_set():
            request_id = f"load-{worker}-{n}"
            response = httpx.post(
                f"{pair.urls[worker]}/inference/v1/completions", timeout=120,
                headers={"Authorization": f"Bearer {key}", "x-request-id": request_id},
                json={"model": "accounts/steady/models/own", "prompt": "Hello",
                      "max_tokens": 2})
            results.append((request_id, response.status_code))
            n += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in (0, 1)]
    for thread in threads:
        thread.start()
    try:  # (a failed check must not leave the load running and Redis down for the next)
        time.sleep(2.0)
        before = len(results)
        pair.redis.stop()
        outage = httpx.get(f"{pair.urls[0]}/admin/v1/usage", timeout=10,
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        # The totals cannot be read; what waits for Redis can (that is when it waits).
        assert outage.status_code == 200 and outage.json()["accounts"] is None
        assert set(outage.json()["pending"]) == {"records", "oldest_seconds"}
        assert str(pair.redis.port) not in outage.text  # where Redis is stays in the log
        time.sleep(3.0)
        during = len(results)
    finally:
        if pair.redis.child is None:
            pair.redis.start()
        time.sleep(3.0)
        stop.set()
        for thread in threads:
            thread.join()
    print(f"redis restart: {before} requests before the stop, {during - before} while down, "
          f"{len(results) - during} after the restart")
    assert during > before, "no request was served while Redis was down"
    assert len(results) > during
    assert {status for _, status in results} == {200}
    deadline = time.monotonic() + 15
    while len(pair.records("steady")) < len(results) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    records = pair.records("steady")
    assert sorted(r.request_id for r in records) == sorted(rid for rid, _ in results)
    # The limits' windows hold exactly what was used: reservations settled once, requests
    # admitted during the outage counted once at their end, no concurrency slot left over.
    client = pair.redis.client()
    base = f"{PREFIX}limits:steady:"
    generated = sum(int(v) for v in client.hvals(base + "generated"))
    prompt = sum(int(v) for v in client.hvals(base + "prompt"))
    slots = client.zcard(base + "concurrent")
    client.close()
    assert generated == sum(r.completion_tokens for r in records)
    assert prompt == sum(r.prompt_tokens for r in records)
    assert slots == 0


def metrics_text(url: str) -> str:
    return httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text


def metric(url: str, name: str) -> float:
    """The sum of one metric's samples on one gateway."""
    return sum(float(line.split()[-1]) for line in metrics_text(url).splitlines()
               if line.startswith(name))


def healthy_gauge(url: str, replica: str) -> float | None:
    for line in metrics_text(url).splitlines():
        if line.startswith(f'fwgw_replica_healthy{{replica="{replica}"}}'):
            return float(line.split()[-1])
    return None


def wait_gauge(pair: Pair, replica: str, value: float, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(healthy_gauge(u, replica) != value for u in pair.urls):
        assert time.monotonic() < deadline, f"{replica} never reached health {value}"
        time.sleep(0.1)


def test_a_killed_worker_fails_no_unstarted_request_and_comes_back(
        pair: Pair, smollm2_dir: Path) -> None:
    port = free_port()
    spare_url = f"http://127.0.0.1:{port}"
    spare = start_worker(smollm2_dir, port, "--max-model-len", "2048",
                         "--served-model-name", "smollm2")
    try:
        pair.admin("deployments", "put", "fireworks", "pair", "--model",
                   "accounts/fireworks/models/pair", "--replica", pair.worker_url,
                   "--replica", spare_url, "--default")
        wait_gauge(pair, spare_url, 1.0, 10)
        replicas = [Replica(url=pair.worker_url), Replica(url=spare_url)]
        to_spare = next(k for k in (f"user-{n}" for n in range(100))
                        if rendezvous_rank(k, replicas)[0].url == spare_url)
        outcomes = asyncio.run(burst_with_kill(pair, spare, to_spare))
        for kind, status, text in outcomes:
            assert status == 200, (kind, status, text)
            if kind == "json":
                assert orjson.loads(text)["choices"][0]["text"]
            elif "event: error" in text:  # only a stream that had started may fail
                assert text.index("data: {") < text.index("event: error"), text
        cut = sum("event: error" in text for _, _, text in outcomes)
        retried = sum(metric(url, "fwgw_retries_total") for url in pair.urls)
        print(f"kill: {len(outcomes)} requests, all 200; {cut} streams cut after their "
              f"first bytes; {retried:.0f} retried on the other replica")
        wait_gauge(pair, spare_url, 0.0, 10)
        for url in pair.urls:  # the dead replica gets nothing now, even with its key
            response = complete(url, API_KEY, "accounts/fireworks/models/pair",
                                user=to_spare)
            assert response.status_code == 200
            assert response.headers["fireworks-backend-host"] == pair.worker_url[7:]
        spare = start_worker(smollm2_dir, port, "--max-model-len", "2048",
                             "--served-model-name", "smollm2")
        wait_gauge(pair, spare_url, 1.0, 10)
        for url in pair.urls:
            response = complete(url, API_KEY, "accounts/fireworks/models/pair",
                                user=to_spare)
            assert response.headers["fireworks-backend-host"] == spare_url[7:]
    finally:
        spare.stop()


async def burst_with_kill(pair: Pair, spare: Child, to_spare: str
                          ) -> list[tuple[str, int, str]]:
    """Sixteen requests, half streams, half preferring the spare replica; the spare is
    killed while they run."""
    async def one(n: int, client: httpx.AsyncClient) -> tuple[str, int, str]:
        stream = n % 2 == 1
        body = {"model": "accounts/fireworks/models/pair", "prompt": "Tell me a story",
                "max_tokens": 24, "ignore_eos": True, "stream": stream}
        if n % 4 < 2:
            body["user"] = to_spare
        response = await client.post(f"{pair.urls[n % 2]}/inference/v1/completions",
                                     json=body,
                                     headers={"Authorization": f"Bearer {API_KEY}"})
        return ("stream" if stream else "json"), response.status_code, response.text

    async def kill_soon() -> None:
        await asyncio.sleep(1.5)
        os.killpg(spare.process.pid, signal.SIGKILL)
        spare.process.wait()

    async with httpx.AsyncClient(timeout=180) as client:
        killer = asyncio.create_task(kill_soon())
        outcomes = await asyncio.gather(*(one(n, client) for n in range(16)))
        await killer
    return list(outcomes)
