"""`bridge serve`: an OpenAI-compatible HTTP server over runtime.Engine."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import click

from bridge.run_cli import (
    _given,
    build_engine,
    engine_options,
    generation,
    resolve_models,
    rpc_settings,
    user_errors,
)
from runtime.config import serve_parallel


@click.command("serve")
@engine_options
@click.option("--host", help="Interface to listen on (default 127.0.0.1, this machine only).")
@click.option("--port", type=int, help="TCP port (default 8080).")
@click.option("--api-key", envvar="BRIDGE_API_KEY",
              help="Require 'Authorization: Bearer KEY' (env: BRIDGE_API_KEY, which keeps "
                   "it out of the process list).")
@click.option("--api-key-file", type=click.Path(path_type=Path),
              help="Accept each key in this file (one per line); each key is its own scope "
                   "for the prompt cache and the drafting memory.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Also accept requests whose Host header names NAME (repeatable; '*' "
                   "accepts any). The bound address and localhost are always accepted.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let web pages from ORIGIN (e.g. https://app.example) call the API "
                   "(repeatable). Without it, browsers get no CORS access.")
@click.option("--max-body", type=int, metavar="BYTES",
              help="Largest request body (default 8 MiB); larger ones get a 413.")
@click.option("--max-messages", type=int, help="Most messages in a chat (default 4096).")
@click.option("--context-overflow", type=click.Choice(["error", "cap", "trim"]),
              help="A request too long for the context: error (default, a 400), cap (a "
                   "shorter answer) or trim (drop the oldest turns, reported in the "
                   "response). A request's \"context_overflow\" field overrides it.")
@click.option("--draft-memory", "memory_tokens", type=int, metavar="TOKENS",
              help="Most tokens the drafting memory across requests keeps (40-60 bytes "
                   "each; GET /stats shows the bound); the oldest requests go first.")
@click.option("--no-shared-drafts", is_flag=True,
              help="No drafting memory: each request drafts only from itself.")
@click.option("--draft-memory-file", "memory_file", type=click.Path(path_type=Path),
              help="Load the drafting memory from this file at start (if it holds one for "
                   "this model) and save it there now and then and at shutdown.")
@click.option("--draft-memory-save", "memory_save", type=(float, int),
              metavar="SECONDS TOKENS",
              help="Save the memory file after SECONDS (default 60) or once TOKENS (default "
                   "20000) were added since the last save: what a crash can lose.")
@click.option("--parallel", type=int,
              help="Requests served at once: sequences evaluated together, each with a "
                   "KV cache of -c tokens (default: 4, doubled up to 16 while all their "
                   "caches fit in a quarter of the memory available, on CPUs; 1 with "
                   "--exact, --draft or --drafter pruned).")
@click.option("--prefill-chunk", type=int,
              help="Most prompt tokens a sequence evaluates per shared step, so a long "
                   "prompt delays the others by one chunk (default 256).")
@click.option("--kv-unified", is_flag=True, default=None,
              help="With --parallel: one cache of -c tokens shared by all sequences (less "
                   "memory; answers may then differ from a request alone at near-ties). "
                   "Default: -c tokens for each sequence, answers as alone.")
@click.option("--max-queue", type=int,
              help="Most requests waiting for a free sequence; past it 503 with "
                   "Retry-After (default: no bound).")
@click.option("--cache-ram", type=int, metavar="MIB",
              help="Host memory for conversations' KV caches when more conversations than "
                   "--parallel slots come and go: a request that a slot's cache would be "
                   "cut for first copies it out, and a request that continues a copied one "
                   "gets it back instead of evaluating it again (default 8192, as "
                   "llama-server; -1: no bound, 0: off).")
@click.option("--listen-fd", type=int, hidden=True,
              help="Internal: serve on this inherited listening socket (the --rpc "
                   "supervisor's child).")
@user_errors
def serve_cmd(host: str | None, port: int | None, api_key: str | None,
              api_key_file: Path | None, allowed_hosts: tuple[str, ...],
              cors_origins: tuple[str, ...], max_body: int | None, max_messages: int | None,
              context_overflow: str | None, memory_tokens: int | None,
              no_shared_drafts: bool, memory_file: Path | None,
              memory_save: tuple[float, int] | None, parallel: int | None,
              prefill_chunk: int | None, kv_unified: bool | None, max_queue: int | None,
              cache_ram: int | None, listen_fd: int | None,
              **o) -> None:
    """Serve MODEL over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models,
    /stats, /metrics).

    Up to --parallel requests are answered at once, their steps evaluated together in one
    batch; more wait their turn. The sampling and drafting options set the defaults that
    requests may override. Requests also draft from earlier requests made with the same API key (a
    request sends "shared_drafts": false to stay out). Ctrl-C or SIGTERM stops the server
    cleanly.

    MODEL: a .gguf file, a folder, a bundled name, or a Hugging Face id such as
    org/name-GGUF:Q4_K_M (downloaded once into the HF cache; see `bridge --help`).
    """
    try:
        from runtime.serve.app import MemoryConfig, ServerConfig, open_memory, serve
        from runtime.serve.guard import read_keys_file
    except ImportError as e:
        raise click.ClickException(
            f"bridge serve needs the serve extra ({e.name} is missing): "
            "pip install 'bridge-specdec[serve]'") from None

    save = dict(zip(("save_seconds", "save_tokens"), memory_save, strict=True)) \
        if memory_save else {}
    memory_cfg = MemoryConfig(enabled=not no_shared_drafts,
                              **_given(max_tokens=memory_tokens, path=memory_file), **save)
    keys = ((api_key,) if api_key is not None else ()) + \
        (read_keys_file(api_key_file) if api_key_file else ())
    cfg = ServerConfig(**_given(host=host, port=port, max_body=max_body,
                                max_messages=max_messages, context_overflow=context_overflow,
                                max_queue=max_queue, cache_ram=cache_ram),
                       api_keys=tuple(dict.fromkeys(keys)), allowed_hosts=allowed_hosts,
                       cors_origins=cors_origins, memory=memory_cfg)
    gen = generation(o)
    pruned = o["draft"] is not None or o["drafter"] == "pruned"
    serving = _given(parallel=parallel if parallel is not None else serve_parallel(
        bool(o["exact"]), pruned), prefill_chunk=prefill_chunk, kv_unified=kv_unified)
    serving["parallel_auto"] = parallel is None  # raised where the caches fit in memory
    if cache_ram not in (None, 0) and serving["parallel"] == 1:
        raise ValueError("--cache-ram keeps the conversations of --parallel slots, and one "
                         "sequence (--parallel 1, --exact or a pruned draft) has none to "
                         "give up; drop --cache-ram or raise --parallel")
    if (o["rpc"] or o["draft_rpc"]) and listen_fd is None:
        # ggml-rpc aborts the process on a lost worker: the engine runs in a child that
        # this process restarts, answering the request in flight with an error
        from runtime.serve.supervisor import supervise

        rpc_settings(o)  # a bad --rpc fails here, in one line, before any child starts
        supervise([sys.executable, "-m", "bridge.cli", *sys.argv[1:]], cfg.host, cfg.port)
        return
    sock = socket.socket(fileno=listen_fd) if listen_fd is not None else None
    o = resolve_models(o)  # a hub id is fetched before the server binds its port
    with build_engine(o, memory=open_memory(memory_cfg, o["model"]), **serving) as engine:
        serve(engine, cfg, gen, sock)
