"""The gateway's command line: `fireworks-gateway serve`, `hash-key`, `local`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gateway.admin_cli import app as admin_app
from gateway.admin_cli import usage_table
from gateway.registry import hash_key

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fireworks-compatible inference gateway over vLLM.")
app.add_typer(admin_app, name="admin")


@app.command()
def serve(
    host: str | None = typer.Option(None, help="bind address (GATEWAY_HOST)"),
    port: int | None = typer.Option(None, help="port (GATEWAY_PORT)"),
    registry: Path | None = typer.Option(None, help="registry YAML (GATEWAY_REGISTRY_PATH)"),
) -> None:
    """Run the gateway (settings from GATEWAY_* environment variables)."""
    import uvicorn

    from gateway.app import create_app
    from gateway.config import Settings

    overrides: dict[str, Any] = {key: value for key, value in
                 {"host": host, "port": port, "registry_path": registry}.items()
                 if value is not None}
    settings = Settings(**overrides)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, timeout_graceful_shutdown=30)


@app.command("hash-key")
def hash_key_command(api_key: str) -> None:
    """Print the registry form (sha256:<hex>) of an API key."""
    print(hash_key(api_key))


@app.command()
def usage(
    redis_url: str = typer.Option(..., envvar="GATEWAY_REDIS_URL", help="the gateways' Redis"),
    prefix: str = typer.Option("fwgw:", envvar="GATEWAY_REDIS_PREFIX"),
) -> None:
    """Sum the usage records in Redis per account."""
    print(usage_table(redis_url, prefix))


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
