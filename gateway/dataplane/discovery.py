"""Replicas discovered from DNS: every address behind a name is a replica of its own.

A registry replica `dns+http://<name>:<port>` (in Kubernetes: a headless Service, whose
name resolves to the addresses of its ready pods) stands for `http://<address>:<port>` for
each address the name has. Each of them is chosen, health-checked, ejected and retried as a
replica in its own right, so affinity reaches one pod's prefix cache and a sick pod is
ejected alone. Names are resolved again every `interval` seconds: pods that appear get
traffic from the next resolution, pods that leave get none after it (a request already on
one finishes there). A failed lookup keeps the last answer; a name with no addresses has
no replicas.

DNS rather than the EndpointSlice API: no RBAC for the gateway, no Kubernetes client, and
the same mechanism outside Kubernetes. What it gives up: DNS shows only ready pods (which is
what routing wants) and updates within the resolution interval plus the DNS TTL (CoreDNS:
5 s by default for headless Services), against a watch's sub-second updates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

import dns.asyncresolver
import dns.exception
import dns.resolver

from gateway.background import cancel, every
from gateway.controlplane.registry import Replica

logger = logging.getLogger("gateway.discovery")
PREFIX = "dns+"


def is_discovered(url: str) -> bool:
    return url.startswith(PREFIX)


def make_resolver(nameserver: str | None) -> dns.asyncresolver.Resolver:
    """The system's resolver (resolv.conf: search domains, as a pod has them), or one that
    asks `host:port` only."""
    if not nameserver:
        resolver = dns.asyncresolver.Resolver()
        resolver.use_search_by_default = True  # a short name, as a pod's resolv.conf means it
        return resolver
    host, _, port = nameserver.rpartition(":")
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [host or nameserver]
    resolver.port = int(port) if host else 53
    return resolver


class Discovery:
    def __init__(self, names: Callable[[], Iterable[str]],
                 resolver: dns.asyncresolver.Resolver, interval: float = 1.0) -> None:
        self.names = names  # the dns+ replica URLs of the registry, now
        self.resolver = resolver
        self.interval = interval
        self.found: dict[str, list[Replica]] = {}  # dns+ URL -> its replicas, by address
        self._task: asyncio.Task[None] | None = None

    def expand(self, replicas: list[Replica]) -> list[Replica]:
        """A deployment's replicas with each dns+ one replaced by what it resolved to."""
        for replica in replicas:  # (a loop, not any(): this runs a few times per request)
            if is_discovered(replica.url):
                break
        else:
            return replicas
        out: list[Replica] = []
        for replica in replicas:
            if not is_discovered(replica.url):
                out.append(replica)
            elif replica.draining:  # a drained name drains every pod of it
                out += [pod.model_copy(update={"draining": True})
                        for pod in self.found.get(replica.url, [])]
            else:
                out += self.found.get(replica.url, [])
        return out

    def start(self) -> None:
        """The loop that follows the first resolution (app start-up awaits that one)."""
        self._task = every(self.interval, self.resolve_all, "replica discovery", logger,
                           first_after=self.interval)

    async def stop(self) -> None:
        await cancel(self._task)

    async def resolve_all(self) -> None:
        urls = {url for url in self.names() if is_discovered(url)}
        for gone in set(self.found) - urls:
            del self.found[gone]
        results = await asyncio.gather(*(self._resolve(url) for url in urls))
        for url, replicas in zip(urls, results, strict=True):
            if replicas is None:
                continue  # the lookup failed: keep the last answer
            before = [r.url for r in self.found.get(url, [])]
            if [r.url for r in replicas] != before:
                logger.info("%s: %d replica(s): %s", url, len(replicas),
                            " ".join(r.url for r in replicas))
            self.found[url] = replicas

    async def _resolve(self, url: str) -> list[Replica] | None:
        parts = urlsplit(url.removeprefix(PREFIX))
        host, port, scheme = parts.hostname or "", parts.port, parts.scheme
        addresses: set[str] = set()
        failed = 0
        for kind in ("A", "AAAA"):
            try:
                answer = await self.resolver.resolve(host, kind, lifetime=2.0)
                addresses |= {record.to_text() for record in answer}
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                pass  # no such name, or none of this kind: no replicas of it
            except dns.exception.DNSException as exc:
                failed += 1
                logger.warning("resolving %s (%s) failed: %r", host, kind, exc)
        if failed == 2:
            return None
        path = parts.path.rstrip("/")
        return [Replica(url=f"{scheme}://{_host(a)}{f':{port}' if port else ''}{path}")
                for a in sorted(addresses)]


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
