"""The layout shows the architecture: imports between the gateway's modules run one way.

app and cli -> the API packages (fireworks/, anthropic/) and the data plane -> the API
contract (gateway/api.py) -> the control plane -> errors, config. The data plane never names
an API (no per-API branches: it serves whatever the route table holds), and the control
plane never reaches up into the data plane. The server package (server/) knows no plane;
the data plane takes only the client protocol from it.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "gateway"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """gateway module -> the gateway modules it imports (anywhere in the file)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return out


def arrows(graph: dict[str, set[str]], source: str, target: str) -> list[str]:
    return sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith(source)
                  for t in ts if t.startswith(target))


def test_no_import_circles() -> None:
    assert cycles(imports()) == []


def test_the_finder_sees_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_control_plane_never_imports_upward() -> None:
    graph = imports()
    for upper in ("gateway.dataplane", "gateway.fireworks", "gateway.anthropic",
                  "gateway.api", "gateway.app", "gateway.server"):
        assert arrows(graph, "gateway.controlplane", upper) == []


def test_the_data_plane_names_no_api() -> None:
    graph = imports()
    for api_package in ("gateway.fireworks", "gateway.anthropic"):
        assert arrows(graph, "gateway.dataplane", api_package) == []


def test_the_apis_and_their_contract_know_no_data_plane() -> None:
    graph = imports()
    for source in ("gateway.fireworks", "gateway.anthropic", "gateway.api"):
        assert arrows(graph, source, "gateway.dataplane") == []
    assert arrows(graph, "gateway.api", "gateway.fireworks") == []
    assert arrows(graph, "gateway.fireworks", "gateway.anthropic") == []
    assert arrows(graph, "gateway.anthropic", "gateway.fireworks") == []


def test_the_data_plane_imports_only_the_client_protocol_from_the_server() -> None:
    graph = imports()
    assert {arrow.split(" -> ")[1] for arrow in arrows(graph, "gateway.dataplane",
                                                        "gateway.server")} \
        == {"gateway.server.client"}
    for plane in ("gateway.dataplane", "gateway.controlplane", "gateway.fireworks",
                  "gateway.anthropic", "gateway.api", "gateway.app"):
        assert arrows(graph, "gateway.server", plane) == []


def test_only_the_servers_protocol_touches_uvicorns_internals() -> None:
    touching = sorted(
        _module(path) for path in PACKAGE.rglob("*.py")
        if "uvicorn.protocols" in path.read_text())
    assert touching == ["gateway.server.protocol"]


def test_batch_rides_the_data_plane_and_nothing_below_knows_it() -> None:
    """Batch lines are requests of whatever API the route table holds: batch/ names no API
    package, and neither plane, nor the APIs, nor the server imports batch/."""
    graph = imports()
    for api_package in ("gateway.fireworks", "gateway.anthropic"):
        assert arrows(graph, "gateway.batch", api_package) == []
    for lower in ("gateway.dataplane", "gateway.controlplane", "gateway.fireworks",
                  "gateway.anthropic", "gateway.api", "gateway.server"):
        assert arrows(graph, lower, "gateway.batch") == []
    assert "gateway.dataplane.request" in graph["gateway.batch.runner"]
