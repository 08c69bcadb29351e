"""The settings given to create_app are the ones the edge enforces, in both layers: the
server protocol (EdgeProtocol: header size) and the ASGI layer (body size). One source of
truth: nothing is read again from the environment."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gateway.server.protocol import EdgeProtocol, served_settings
from tests.unit.fake_worker import KEY, MODEL
from tests.unit.harness import build, registry, serving


async def exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


def request(header_bytes: int, body: bytes = b"{}") -> bytes:
    return (b"POST /inference/v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
            b"authorization: Bearer " + KEY.encode() + b"\r\nx-padding: "
            + b"p" * header_bytes + b"\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body) + body)


async def test_the_apps_settings_reach_both_edge_layers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The environment says otherwise: it must not win over what create_app was given.
    monkeypatch.setenv("GATEWAY_MAX_HEADER_BYTES", str(1 << 20))
    monkeypatch.setenv("GATEWAY_MAX_BODY_BYTES", str(1 << 20))
    h = build(tmp_path, registry_of=registry(["http://127.0.0.1:9"]),
              max_header_bytes=2048, max_body_bytes=1000)
    assert served_settings(h.app) is h.settings
    assert (h.settings.max_header_bytes, h.settings.max_body_bytes) == (2048, 1000)
    async with serving(h, EdgeProtocol) as (_, port):
        # headers still arriving past 2 KB (the environment would allow 1 MB)
        unfinished = request(4096).partition(b"\r\ncontent-type")[0]
        assert (await exchange(port, unfinished)).startswith(b"HTTP/1.1 431 ")
        too_long = b'{"model": "%s", "pad": "%s"}' % (MODEL.encode(), b"x" * 2000)
        assert (await exchange(port, request(100, too_long))).startswith(b"HTTP/1.1 413 ")
        small = await exchange(port, request(100, b'{"model": 1}'))
        assert small.startswith(b"HTTP/1.1 400 ")  # within both bounds: validated


def test_the_protocol_refuses_an_app_without_settings() -> None:
    async def bare(scope: object, receive: object, send: object) -> None:
        raise AssertionError("never called")
    with pytest.raises(RuntimeError):
        served_settings(bare)


async def test_the_metrics_key_opens_metrics_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "admin").write_text("admin-secret\n")
    (tmp_path / "metrics").write_text("scrape-only\n")
    h = build(tmp_path, admin_key_file=tmp_path / "admin", metrics_key_file=tmp_path / "metrics")
    async with h.running() as client:
        def get(path: str, key: str | None) -> Any:
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            return client.get(path, headers=headers)

        assert (await get("/metrics", "scrape-only")).status_code == 200
        assert (await get("/metrics", "admin-secret")).status_code == 200
        assert (await get("/metrics", None)).status_code == 401
        assert (await get("/admin/v1/registry", "scrape-only")).status_code == 401
        assert (await get("/admin/v1/registry", "admin-secret")).status_code == 200
