"""`bridge serve`: an OpenAI-compatible HTTP server over runtime.Engine."""

from __future__ import annotations

from pathlib import Path

import click

from bridge.run_cli import _given, build_engine, engine_options, generation, user_errors


@click.command("serve")
@engine_options
@click.option("--host", help="Interface to listen on (default 127.0.0.1, this machine only).")
@click.option("--port", type=int, help="TCP port (default 8080).")
@click.option("--api-key", envvar="BRIDGE_API_KEY",
              help="Require 'Authorization: Bearer KEY' (env: BRIDGE_API_KEY).")
@click.option("--draft-memory", "memory_tokens", type=int, metavar="TOKENS",
              help="Most tokens the drafting memory across requests keeps (40-60 bytes "
                   "each; GET /stats shows the bound); the oldest requests go first.")
@click.option("--no-shared-drafts", is_flag=True,
              help="No drafting memory: each request drafts only from itself.")
@click.option("--draft-memory-file", "memory_file", type=click.Path(path_type=Path),
              help="Load the drafting memory from this file at start (if it holds one for "
                   "this model) and save it there at shutdown.")
@user_errors
def serve_cmd(host: str | None, port: int | None, api_key: str | None,
              memory_tokens: int | None, no_shared_drafts: bool, memory_file: Path | None,
              **o) -> None:
    """Serve MODEL over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models,
    /stats).

    Requests are answered one at a time (one model, one KV cache); concurrent clients
    wait their turn. The sampling and drafting options set the defaults that requests may
    override. Requests also draft from earlier requests made with the same API key (a
    request sends "shared_drafts": false to stay out). Ctrl-C or SIGTERM stops the server
    cleanly.
    """
    try:
        from runtime.serve.app import MemoryConfig, ServerConfig, open_memory, serve
    except ImportError as e:
        raise click.ClickException(
            f"bridge serve needs the serve extra ({e.name} is missing): "
            "pip install 'bridge-specdec[serve]'") from None

    memory_cfg = MemoryConfig(enabled=not no_shared_drafts,
                              **_given(max_tokens=memory_tokens, path=memory_file))
    cfg = ServerConfig(**_given(host=host, port=port, api_key=api_key), memory=memory_cfg)
    gen = generation(o)
    with build_engine(o, memory=open_memory(memory_cfg, o["model"])) as engine:
        serve(engine, cfg, gen)
