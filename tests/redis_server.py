"""A real redis-server on a free port, for tests (stop and restart it to test outages)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import redis

from gateway.local_stack import Child
from tests.conftest import free_port


class RedisServer:
    """Append-only persistence on, so a restart keeps the data, as a real deployment's
    Redis (a StatefulSet with a volume) does."""

    def __init__(self, appendfsync: str = "always") -> None:
        self.appendfsync = appendfsync  # "everysec" as a production Redis (benchmarks)
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed (make test installs it)")
        self.executable = executable
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="redis-"))
        self.child: Child | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.child = Child("redis", [self.executable, "--port", str(self.port), "--bind",
                                     "127.0.0.1", "--dir", str(self.dir), "--save", "",
                                     "--appendonly", "yes", "--appendfsync", self.appendfsync],
                           self.dir / "redis.log")
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or not self.child.alive():
                    raise RuntimeError("redis-server did not start:\n"
                                       + self.child.log_tail()) from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)
