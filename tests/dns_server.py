"""A real DNS server for tests: dnsmasq on a free port, answering from a hosts directory that
the test rewrites (dnsmasq rereads it when it changes)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdatatype


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DnsServer:
    def __init__(self) -> None:
        executable = shutil.which("dnsmasq", path=os.environ.get("PATH", "") +
                                  ":/usr/sbin:/sbin")
        if executable is None:
            raise RuntimeError("dnsmasq is not installed (make test installs it)")
        self.executable = executable
        self.dir = Path(tempfile.mkdtemp(prefix="dns-"))
        self.hosts = self.dir / "hosts"
        self.hosts.mkdir()
        self.hosts.chmod(0o755)
        self.dir.chmod(0o755)
        self.set({})
        self.log = open(self.dir / "log", "wb")  # noqa: SIM115 (closed in stop)
        for _ in range(5):  # a free port can be taken between the check and dnsmasq's bind
            self.port = free_udp_port()
            self.process = subprocess.Popen(self._command(), stdout=self.log,
                                            stderr=subprocess.STDOUT)
            if self._wait_ready():
                return
        raise RuntimeError(f"dnsmasq did not start: {(self.dir / 'log').read_text()}")

    def _command(self) -> list[str]:
        command = [self.executable, "--keep-in-foreground", "--no-resolv", "--no-hosts",
                   f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                   f"--hostsdir={self.hosts}", "--cache-size=0", "--local-ttl=0",
                   "--no-negcache", "--log-facility=-", f"--pid-file={self.dir / 'pid'}"]
        if os.geteuid() == 0:
            command.append("--user=root")
        return command

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, names: dict[str, list[str]]) -> None:
        """Each name resolves to these addresses from now on (a rename, so dnsmasq never
        reads half a file)."""
        text = "".join(f"{address} {name}\n" for name, addresses in names.items()
                       for address in addresses)
        staging = self.dir / "hosts.new"
        staging.write_text(text)
        os.replace(staging, self.hosts / "records")

    def lookup(self, name: str) -> list[str]:
        query = dns.message.make_query(name, dns.rdatatype.A)
        answer = dns.query.udp(query, "127.0.0.1", port=self.port, timeout=1)
        return sorted(item.to_text() for rrset in answer.answer for item in rrset)

    def wait_for(self, name: str, addresses: list[str], seconds: float = 10) -> None:
        deadline = time.monotonic() + seconds
        while self.lookup(name) != sorted(addresses):
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} still resolves to {self.lookup(name)}")
            time.sleep(0.05)

    def _wait_ready(self) -> bool:
        """True once it answers; False if it exited (its port was taken)."""
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                return False
            try:
                self.lookup("ready.test")
                return True
            except (dns.exception.Timeout, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop it (again: nothing more)."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
