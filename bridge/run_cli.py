"""`bridge generate` and `bridge chat`: thin click commands over runtime.Engine.

Options default to None so that every default lives in the runtime's dataclasses.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import click

from runtime.config import (
    DRAFTERS,
    GenerationConfig,
    RuntimeConfig,
    SamplingConfig,
    SpeculativeConfig,
)

log = logging.getLogger("bridge")


def engine_options(f: Callable) -> Callable:
    """Options shared by every command that loads a model."""
    opts = [
        click.argument("model"),
        *model_options(),
        click.option("--drafter", type=click.Choice(DRAFTERS),
                     help="Draft source: auto (context lookup, plus the pruned draft when "
                          "there is one), lookup, pruned or none [default: auto]."),
        click.option("--no-draft", is_flag=True, help="Same as --drafter none: plain "
                     "decoding, same code path."),
        click.option("--draft-max", type=int,
                     help="Most tokens drafted per step (the adaptive upper bound)."),
        click.option("--p-min", type=float, help="Stop drafting below this draft confidence."),
        click.option("--fixed-gamma", is_flag=True,
                     help="Always draft --draft-max tokens (no adaptation; for benchmarks)."),
        click.option("--no-forced-drafts", is_flag=True,
                     help="Under a constraint (JSON schema, grammar, tool calls), do not "
                          "draft the text it forces (for measuring what that buys)."),
        click.option("--recalibrate", is_flag=True,
                     help="Measure this device's costs afresh instead of reusing the "
                          "profile stored by an earlier run."),
        click.option("-c", "--ctx", "n_ctx", type=int, help="Context length in tokens."),
        click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", type=int,
                     help="Layers offloaded to the GPU (-1: all)."),
        click.option("--threads", "n_threads", type=int,
                     help="CPU threads [default: every core this process may use]."),
        *rpc_options(),
        click.option("--exact", is_flag=True, default=None,
                     help="Evaluate the model so that a verify batch's logits equal a "
                          "one-token step's bitwise: greedy output is then identical with "
                          "any drafting (costs a 2-row batch per plain step; see README)."),
        click.option("--no-backend-argmax", "backend_argmax", flag_value=False, default=None,
                     help="Read greedy choices from the logits in Python instead of taking "
                          "the argmax inside llama.cpp's graph (the same tokens; slower)."),
        click.option("--temp", type=float, help="Temperature; 0 is greedy."),
        click.option("--top-k", type=int), click.option("--top-p", type=float),
        click.option("--min-p", type=float),
        click.option("--repeat-penalty", type=float,
                     help="Divide a seen token's positive logit by this (1: off)."),
        click.option("--repeat-last-n", type=int,
                     help="Tokens the penalties look back over (default 64; -1: all)."),
        click.option("--frequency-penalty", type=float,
                     help="Subtract this times a token's count in the window (0: off)."),
        click.option("--presence-penalty", type=float,
                     help="Subtract this from every token in the window (0: off)."),
        click.option("--dry-multiplier", type=float,
                     help="DRY: penalize a token that would extend a repeat (0: off; 0.8 "
                          "breaks small models' loops, see docs/sampling.md)."),
        click.option("--dry-base", type=float, help="DRY: growth per repeated token (1.75)."),
        click.option("--dry-allowed-length", type=int,
                     help="DRY: repeats up to this long go free (2)."),
        click.option("--dry-penalty-last-n", type=int,
                     help="DRY: tokens scanned for repeats (default 64; -1: all)."),
        click.option("--dry-sequence-breaker", "dry_sequence_breakers", multiple=True,
                     help="DRY: a string that restarts the count (repeatable; replaces "
                          "the default \\n : \" *)."),
        click.option("--seed", type=int, help="Random seed for sampling."),
        click.option("-n", "--max-tokens", type=int, help="Most tokens to generate."),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def model_options() -> list:
    """--revision and --draft, shared by generate, chat, serve and bench."""
    return [
        click.option("--revision", metavar="REV",
                     help="Branch, tag or commit of a Hugging Face MODEL [default: main]."),
        click.option("--draft", "draft", metavar="DRAFT",
                     help="Draft GGUF: a file or a Hugging Face id, as MODEL [default: "
                          "MODEL.draft.gguf beside the model, else the draft `bridge "
                          "export` wrote for it]."),
    ]


def resolve_models(o: dict) -> dict:
    """The options with MODEL and --draft as GGUF paths (a hub id is downloaded here,
    before llama.cpp loads anything) and --revision used up. The draft comes first: a
    bad --draft fails before a large model is downloaded for nothing."""
    from runtime.models import resolve_gguf

    draft = None if o["draft"] is None else resolve_gguf(o["draft"], what="draft")
    return {**o, "model": resolve_gguf(o["model"], o["revision"]), "revision": None,
            "draft": draft}


def rpc_options() -> list:
    """--rpc and friends, shared by generate, chat, serve and bench."""
    return [
        click.option("--rpc", metavar="HOST:PORT[,HOST:PORT...]",
                     help="llama.cpp RPC workers (rpc-server) that take the target's "
                          "offloaded layers (-ngl), as llama.cpp's --rpc does. Drafts stay "
                          "on this machine. The protocol has no authentication: trusted "
                          "networks only."),
        click.option("--draft-rpc", metavar="HOST:PORT[,HOST:PORT...]",
                     help="RPC workers for the pruned draft's layers [default: none, the "
                          "draft runs here]."),
        click.option("--rpc-timeout", type=float, metavar="SECONDS",
                     help="Most seconds one decode may wait on the RPC workers before the "
                          "run ends with an error (default: two minutes)."),
    ]


def with_model_options(f: Callable) -> Callable:
    for opt in reversed(model_options()):
        f = opt(f)
    return f


def with_rpc_options(f: Callable) -> Callable:
    for opt in reversed(rpc_options()):
        f = opt(f)
    return f


def rpc_settings(o: dict) -> dict:
    """RuntimeConfig's RPC fields from the options (a bad endpoint raises ValueError), and
    the fatal handler: ggml-rpc ends the process on a lost worker, so say it in one line."""
    from runtime import rpc

    out = _given(rpc=rpc.parse_endpoints(o["rpc"]) if o.get("rpc") is not None else None,
                 draft_rpc=rpc.parse_endpoints(o["draft_rpc"], "--draft-rpc")
                 if o.get("draft_rpc") is not None else None,
                 rpc_timeout=o.get("rpc_timeout"))
    if "rpc" in out or "draft_rpc" in out:
        rpc.set_fatal_handler(_fatal_exit)
    return out


EXIT_RPC_LOST = 3  # a worker was lost mid-run; `bridge serve`'s supervisor restarts on it


def _fatal_exit(message: str) -> None:
    # runs on ggml-rpc's thread just before llama.cpp would abort(): exit cleanly instead
    sys.stdout.flush()
    sys.stderr.write(f"Error: {message}\n")
    sys.stderr.flush()
    os._exit(EXIT_RPC_LOST)


def constraint_options(f: Callable) -> Callable:
    """What the answer must match (generate and chat): at most one of these."""
    opts = [
        click.option("--json-schema", "json_schema", type=click.Path(path_type=Path),
                     help="Answer with JSON valid against this JSON schema file."),
        click.option("--format", "answer_format", type=click.Choice(["text", "json"]),
                     help="json: answer with one JSON object [default: text]."),
        click.option("--grammar", type=click.Path(path_type=Path),
                     help="Answer in the language of this GBNF grammar file "
                          "(llama.cpp's format)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def constraint_spec(o: dict):
    """The ``ConstraintSpec`` the options ask for, or None. Bad files raise ValueError or
    FileNotFoundError with the path in the message."""
    from runtime.constraint import ConstraintSpec

    given = [name for name, on in (("--json-schema", o["json_schema"]),
                                   ("--format json", o["answer_format"] == "json"),
                                   ("--grammar", o["grammar"])) if on]
    if len(given) > 1:
        raise ValueError(f"give one of --json-schema, --format json and --grammar, not "
                         f"{' and '.join(given)}")
    if o["answer_format"] == "json":
        return ConstraintSpec("json")
    for key, kind in (("json_schema", "json_schema"), ("grammar", "gbnf")):
        path = o[key]
        if path is None:
            continue
        if not path.is_file():
            raise FileNotFoundError(f"--{key.replace('_', '-')}: file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            return ConstraintSpec.from_schema(text) if kind == "json_schema" \
                else ConstraintSpec(kind, text)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return None


def _given(**kwargs):
    return {k: v for k, v in kwargs.items() if v is not None}


def build_engine(o: dict, memory=None, **serving):
    """Settings objects from the parsed options, then the engine (imports stay lazy so
    `bridge --help` does not load llama.cpp). ``o`` comes from ``resolve_models``.
    ``memory``: a server's ``DraftMemory``; ``serving``: a server's ``parallel`` and
    ``prefill_chunk``."""
    from runtime.engine import Engine

    runtime = RuntimeConfig(**_given(n_ctx=o["n_ctx"], n_gpu_layers=o["n_gpu_layers"],
                                     n_threads=o["n_threads"], exact=o["exact"],
                                     backend_argmax=o["backend_argmax"], **serving),
                            **rpc_settings(o))
    drafter = "none" if o["no_draft"] else o["drafter"]
    if o["no_draft"] and o["drafter"] not in (None, "none"):
        raise ValueError(f"--no-draft contradicts --drafter {o['drafter']}; give one of them")
    spec = SpeculativeConfig(**_given(draft_max=o["draft_max"], p_min=o["p_min"],
                                      drafter=drafter),
                             adaptive=not o["fixed_gamma"], recalibrate=o["recalibrate"],
                             forced_drafts=not o["no_forced_drafts"])
    sampling = SamplingConfig(**_given(
        temp=o["temp"], top_k=o["top_k"], top_p=o["top_p"], min_p=o["min_p"], seed=o["seed"],
        **{k: o[k] for k in _PENALTIES},
        dry_sequence_breakers=tuple(o["dry_sequence_breakers"]) or None))
    draft = None if drafter in ("none", "lookup") else (o["draft"] or "auto")
    return Engine(o["model"], draft=draft, runtime=runtime, speculative=spec,
                  sampling=sampling, memory=memory)


# options that are SamplingConfig fields of the same name
_PENALTIES = ("repeat_penalty", "repeat_last_n", "frequency_penalty", "presence_penalty",
              "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n")


def generation(o: dict) -> GenerationConfig:
    return GenerationConfig(**_given(max_tokens=o["max_tokens"]), stop=tuple(o["stop"]))


def user_errors(f: Callable) -> Callable:
    """Turn the errors users can cause into one-line messages with a non-zero exit."""
    from runtime.rpc import RpcError

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except (ValueError, FileNotFoundError, OSError, RpcError) as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def stats_line(stats) -> str:
    """One line: speed, and what drafting did (or why it was off)."""
    s = f"{stats.n_tokens} tokens, {stats.tokens_per_s:.1f} tok/s, {stats.mode}"
    if stats.n_drafted:
        per = ", ".join(f"{name} {v['accepted']}/{v['drafted']}"
                        for name, v in stats.sources.items())
        s += (f" (drafts carried by {stats.main_source or 'none'}; accepted {per}; "
              f"{stats.tokens_per_step:.2f} tokens per target step)")
    if stats.note:
        s += f"; {stats.note}"
    if stats.finish_reason == "context":
        s += "; stopped: the context is full (raise -c/--ctx)"
    return s


@click.command("generate")
@engine_options
@click.option("-p", "--prompt", required=True, help="Prompt text ('-' reads stdin).")
@click.option("--chat", "as_chat", is_flag=True,
              help="Wrap the prompt as a user message in the model's chat template.")
@click.option("--system", help="System message (with --chat).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with text and stats.")
@constraint_options
@user_errors
def generate_cmd(prompt: str, as_chat: bool, system: str | None, as_json: bool, **o) -> None:
    """Generate text with lossless speculative decoding.

    MODEL: a .gguf file, a folder, a bundled name, or a Hugging Face id such as
    org/name-GGUF:Q4_K_M (downloaded once into the HF cache; see `bridge --help`).
    """
    from runtime.chat import ChatSession
    from runtime.speculative import Stats

    if prompt == "-":
        prompt = sys.stdin.read()
    gen = generation(o)
    spec = constraint_spec(o)
    with build_engine(resolve_models(o)) as engine:
        if spec is not None:
            engine.compile(spec)  # a bad schema or grammar fails before any decoding
        stats = Stats()
        if as_chat:
            session = ChatSession(engine, system)
            stream = session.ask(prompt, gen, stats, constraint=spec)
        else:
            stream = engine.generate(prompt, gen, stats, constraint=spec)
        text, tokens = [], []
        for chunk in stream:
            text.append(chunk.text)
            tokens.extend(chunk.tokens)
            if not as_json:
                click.echo(chunk.text, nl=False)
        if as_json:
            click.echo(json.dumps({"text": "".join(text), "tokens": tokens,
                                   "finish_reason": stats.finish_reason,
                                   "stats": stats.as_dict()}, ensure_ascii=False))
        else:
            click.echo()
            click.echo(stats_line(stats), err=True)


CHAT_HELP = "/reset clears the conversation, /stats shows the last answer's figures, /exit quits"


@click.command("chat")
@engine_options
@click.option("--system", help="System message.")
@constraint_options
@user_errors
def chat_cmd(system: str | None, **o) -> None:
    """Interactive multi-turn chat with speculative decoding (Ctrl-C stops an answer).

    MODEL: a .gguf file, a folder, a bundled name, or a Hugging Face id such as
    org/name-GGUF:Q4_K_M (downloaded once into the HF cache; see `bridge --help`).
    """
    from runtime.chat import ChatSession
    from runtime.speculative import Stats

    gen = generation(o)
    spec = constraint_spec(o)
    with build_engine(resolve_models(o)) as engine:
        if spec is not None:
            engine.compile(spec)  # a bad schema or grammar fails before the first prompt
        session = ChatSession(engine, system)
        sources = ", ".join(s if s != "pruned" else f"pruned ({engine.draft_path.name})"
                            for s in engine.sources) or "none (plain decoding)"
        click.echo(f"bridge chat: {engine.model.path.name}, drafts: {sources}", err=True)
        click.echo(CHAT_HELP, err=True)
        last: Stats | None = None
        while True:
            try:
                line = input("> ")
            except EOFError:  # Ctrl-D or closed stdin
                click.echo(err=True)
                return
            except KeyboardInterrupt:
                click.echo("\n(type /exit or press Ctrl-D to quit)", err=True)
                continue
            cmd = line.strip()
            if not cmd:
                continue
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/reset":
                session.reset()
                click.echo("(conversation cleared)", err=True)
                continue
            if cmd == "/stats":
                click.echo(json.dumps(last.as_dict(), indent=1) if last else "(no answer yet)",
                           err=True)
                continue
            if cmd.startswith("/"):
                click.echo(f"unknown command {cmd}; {CHAT_HELP}", err=True)
                continue
            last = _answer(session, line, gen, spec)


def _answer(session, line: str, gen: GenerationConfig, spec=None):
    from runtime.speculative import Stats

    stats = Stats()
    dropped = session.dropped_turns
    stream = session.ask(line, gen, stats, constraint=spec)
    try:
        for chunk in stream:
            click.echo(chunk.text, nl=False)
            sys.stdout.flush()
        click.echo()
    except KeyboardInterrupt:
        stream.close()
        click.echo("\n(stopped)", err=True)
    except ValueError as e:  # e.g. a message longer than the whole context
        click.echo(f"error: {e}", err=True)
        return None
    except RuntimeError as e:  # llama.cpp failed: start the caches afresh, keep the history
        session.engine.reset()
        click.echo(f"error: {e}; the model's cache was reset, the conversation is kept",
                   err=True)
        return None
    if session.dropped_turns > dropped:
        click.echo(f"(context full: dropped the {session.dropped_turns - dropped} oldest "
                   "exchange(s))", err=True)
    click.echo(click.style(stats_line(stats), dim=True), err=True)
    return stats
