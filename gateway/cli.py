"""The gateway's command line: `fireworks-gateway serve`, `hash-key`, `local`."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import typer

from gateway.config import Settings
from gateway.controlplane.admin_cli import app as admin_app
from gateway.controlplane.admin_cli import usage_table
from gateway.controlplane.registry import hash_key
from gateway.metrics import MULTIPROCESS_DIR
from gateway.server.protocol import raise_open_files_limit

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fireworks-compatible inference gateway over vLLM.")
app.add_typer(admin_app, name="admin")


@app.command()
def serve(
    host: str | None = typer.Option(None, help="bind address (GATEWAY_HOST)"),
    port: int | None = typer.Option(None, help="port (GATEWAY_PORT)"),
    registry: Path | None = typer.Option(None, help="registry YAML (GATEWAY_REGISTRY_PATH)"),
    workers: int | None = typer.Option(None, help="server processes (GATEWAY_WORKERS)"),
) -> None:
    """Run the gateway (settings from GATEWAY_* environment variables)."""
    # Through the environment, so that every server process reads the same settings.
    for name, value in {"host": host, "port": port, "registry_path": registry,
                        "workers": workers}.items():
        if value is not None:
            os.environ[f"GATEWAY_{name.upper()}"] = str(value)
    settings = Settings()
    if settings.workers > 1 and not settings.redis_url:
        raise typer.BadParameter("several server processes share limits and usage through "
                                 "Redis: set GATEWAY_REDIS_URL, or run one process",
                                 param_hint="--workers")
    raise_open_files_limit()
    shared_metrics = None
    if settings.workers > 1 and not os.environ.get(MULTIPROCESS_DIR):
        # Every server process writes its metrics here; a scrape of any sums them all.
        shared_metrics = tempfile.mkdtemp(prefix="fwgw-metrics-")
        os.environ[MULTIPROCESS_DIR] = shared_metrics
    try:
        _run(settings)
    finally:
        if shared_metrics is not None:
            shutil.rmtree(shared_metrics, ignore_errors=True)


def _run(settings: Settings) -> None:
    import uvicorn

    uvicorn.run("gateway.app:serve_app", factory=True, host=settings.host,
                port=settings.port, workers=settings.workers, log_level=settings.log_level,
                access_log=False, timeout_graceful_shutdown=30,
                # bounds on what a client can hold open (gateway/server/protocol.py)
                http="gateway.server.protocol:EdgeProtocol",
                timeout_keep_alive=settings.keep_alive_timeout,
                # The gateway never uses the client's address, so it does not parse
                # X-Forwarded-* (a measurable share of a plain request's CPU).
                proxy_headers=False, server_header=False)


@app.command("hash-key")
def hash_key_command(api_key: str) -> None:
    """Print the registry form (sha256:<hex>) of an API key."""
    print(hash_key(api_key))


@app.command()
def usage(
    redis_url: str = typer.Option(..., envvar=["GATEWAY_REDIS_BULK_URL", "GATEWAY_REDIS_URL"],
                                  help="the gateways' Redis (the bulk one where apart)"),
    prefix: str = typer.Option("fwgw:", envvar="GATEWAY_REDIS_PREFIX"),
    password: str | None = typer.Option(None, envvar="GATEWAY_REDIS_PASSWORD"),
) -> None:
    """Sum the usage records in Redis per account."""
    print(usage_table(redis_url, prefix, password))


@app.command()
def local(
    data_dir: Path = typer.Option(Path(".data"), help="model cache directory"),
    port: int = typer.Option(8000, help="gateway port"),
    worker_port: int = typer.Option(8001, help="vLLM worker port"),
    compile: bool = typer.Option(False, help="torch.compile the model: slower start, "
                                             "faster tokens"),
) -> None:
    """Run the whole product on this machine: the default model on one vLLM worker with
    the engine plugins, and the gateway in front of it (what `make run` does)."""
    from gateway.local_stack import run_local_stack

    raise typer.Exit(run_local_stack(data_dir.resolve(), port, worker_port, compile))


if __name__ == "__main__":
    app()
