"""Throughput against a fast upstream, with a compiled load generator (`make
bench-throughput`; not a test).

`make bench-gateway`'s client is Python: past a few thousand requests/s it measures itself.
Here wrk (C) drives each path for `--seconds`: the fast fake upstream directly
(bench/fake_upstream.py), the gateway with one server process, the gateway with two
(GATEWAY_WORKERS=2, over a real redis-server as that needs), and vllm-router 0.1.17. Cases:
plain requests and 64-chunk streams at concurrency 1, 32 and 64. The table gives requests/s,
the proxy's CPU per request (its process tree, from /proc), the ratio to vllm-router's, how
many times faster the upstream alone is than each proxy (it must be several times, or the
upstream is what is measured), and two processes against one.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.gateway import KEY, MODEL, registry_file, start, start_router, tree_cpu, wait_all
from tests.conftest import free_port
from tests.redis_server import RedisServer

SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
wrk.body = '{"model": "%s", "prompt": "Hello there", "max_tokens": 64, "stream": %s}'
"""


def wrk(url: str, stream: bool, connections: int, seconds: float) -> float:
    """Requests/s that wrk completed."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(SCRIPT % (KEY, MODEL, "true" if stream else "false"))
    result = subprocess.run(
        ["wrk", "-t", "1", "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
         "-s", str(script), f"{url}/v1/completions"], capture_output=True, text=True, check=True)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", result.stdout)
    if errors:
        raise SystemExit(f"{url}: {errors.group(1)} failed requests\n{result.stdout}")
    return float(re.search(r"Requests/sec:\s+([0-9.]+)", result.stdout).group(1))  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--router", default=".bench/router/bin/vllm-router")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed (Debian: apt-get install wrk)")
    redis = RedisServer()
    redis.start()
    fake_port = free_port()
    fake = f"http://127.0.0.1:{fake_port}"
    processes = [start([sys.executable, "-m", "bench.fake_upstream", str(fake_port)])]
    registry = registry_file({"fake": fake})
    proxies: dict[str, tuple[str, int]] = {}
    for label, workers in (("gateway", 1), ("gateway x2", 2)):
        port = free_port()
        env = dict(os.environ, GATEWAY_REGISTRY_PATH=str(registry), GATEWAY_PORT=str(port),
                   GATEWAY_LOG_LEVEL="warning", GATEWAY_HEALTH_CHECK_INTERVAL="0",
                   GATEWAY_WORKERS=str(workers), GATEWAY_REDIS_URL=redis.url,
                   GATEWAY_REDIS_PREFIX=f"bench{port}:")
        if workers == 1:
            env.pop("GATEWAY_REDIS_URL")  # one process runs without Redis, as by default
        process = start([sys.executable, "-m", "gateway", "serve"], env)
        processes.append(process)
        proxies[label] = (f"http://127.0.0.1:{port}", process.pid)
    router_port = free_port()
    router = start_router(args.router, router_port, fake)
    processes.append(router)
    proxies["router"] = (f"http://127.0.0.1:{router_port}", router.pid)
    try:
        wait_all(fake, proxies)
        time.sleep(1)
        print(f"{'case':<14} {'path':<11} {'req/s':>9} {'cpu ms/req':>11} {'vs router':>10} "
              f"{'upstream x':>11} {'x2 / x1':>8}")
        for stream in (False, True):
            for connections in (1, 32, 64):
                case = f"{'stream' if stream else 'plain'} c={connections}"
                direct = wrk(fake, stream, connections, args.seconds)
                print(f"{case:<14} {'direct':<11} {direct:>9.0f}")
                rows: dict[str, tuple[float, float]] = {}
                for label, (url, pid) in proxies.items():
                    before = tree_cpu(pid)
                    rate = wrk(url, stream, connections, args.seconds)
                    cpu = (tree_cpu(pid) - before) / (rate * args.seconds)
                    rows[label] = (rate, cpu)
                for label, (rate, cpu) in rows.items():
                    ratio = cpu / rows["router"][1]
                    scaling = f"{rate / rows['gateway'][0]:>7.2f}x" \
                        if label == "gateway x2" else ""
                    print(f"{case:<14} {label:<11} {rate:>9.0f} {cpu * 1e3:>11.3f} "
                          f"{ratio:>9.2f}x {direct / rate:>10.1f}x {scaling:>8}")
    finally:
        for process in processes:
            process.terminate()
            process.wait()
        redis.stop()


if __name__ == "__main__":
    main()
