"""`bridge serve`: an OpenAI-compatible HTTP server over runtime.Engine."""

from __future__ import annotations

import click

from bridge.run_cli import _given, build_engine, engine_options, generation, user_errors


@click.command("serve")
@engine_options
@click.option("--host", help="Interface to listen on (default 127.0.0.1, this machine only).")
@click.option("--port", type=int, help="TCP port (default 8080).")
@click.option("--api-key", envvar="BRIDGE_API_KEY",
              help="Require 'Authorization: Bearer KEY' (env: BRIDGE_API_KEY).")
@user_errors
def serve_cmd(host: str | None, port: int | None, api_key: str | None, **o) -> None:
    """Serve MODEL over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models).

    Requests are answered one at a time (one model, one KV cache); concurrent clients
    wait their turn. The sampling and drafting options set the defaults that requests may
    override. Ctrl-C or SIGTERM stops the server cleanly.
    """
    try:
        from runtime.server import ServerConfig, serve
    except ImportError as e:
        raise click.ClickException(
            f"bridge serve needs the serve extra ({e.name} is missing): "
            "pip install 'bridge-specdec[serve]'") from None

    cfg = ServerConfig(**_given(host=host, port=port, api_key=api_key))
    gen = generation(o)
    with build_engine(o) as engine:
        serve(engine, cfg, gen)
