"""``bridge export``: parse options, build an ``ExportConfig``, call ``run_export``.

Defaults live in ``exporters.config``; only options the user gave are passed on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from exporters.config import DEFAULT_HF_QUANT, DEFAULT_PRUNE, KEEP, ExportConfig, parse_layer_list


@click.command("export")
@click.argument("model")
@click.option("--prune", type=float, metavar="RATIO",
              help=f"Fraction of layers to drop, between 0 and 1 [default: {DEFAULT_PRUNE}].")
@click.option("--drop-layers", metavar="LIST",
              help="Exact layers to drop instead of --prune, e.g. '3,7,12' or '10-12'.")
@click.option("--quant", metavar="TYPE",
              help=f"llama.cpp type: Q4_K_M, Q8_0, Q6_K, Q4_0, F16, ... or {KEEP}. "
                   f"[default: {DEFAULT_HF_QUANT} for a Hugging Face model, "
                   f"{KEEP} (the file's own type) for a GGUF]")
@click.option("-o", "--outdir", type=click.Path(path_type=Path),
              help="Output folder [default: the current folder].")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def export_cmd(model: str, prune: float | None, drop_layers: str | None, quant: str | None,
               outdir: Path | None, force: bool) -> None:
    """Export MODEL to a full GGUF and a layer-pruned draft GGUF beside it.

    \b
    MODEL is a Hugging Face folder, a hub id already in the local HF cache,
    a .gguf file, or a bundled model name (smollm2, gemma3).
    Writes <name>-<QUANT>.gguf and <name>-<QUANT>.draft.gguf. The draft keeps the
    full model's quantized bytes for every layer it keeps.
    """
    from exporters.export import run_export  # the exporter loads only when used

    # gguf-py narrates every file it writes at INFO; show that only with -vv
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("gguf").setLevel(logging.WARNING)
    try:
        given = {"prune": prune, "quant": quant, "out_dir": outdir, "force": force or None}
        if drop_layers is not None:
            given["drop_layers"] = parse_layer_list(drop_layers)
        cfg = ExportConfig(model=model, **{k: v for k, v in given.items() if v is not None})
        result = run_export(cfg)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise click.ClickException(_one_line(e)) from None
    dropped = ",".join(map(str, result.dropped_layers))
    click.echo(f"full   {result.full_path}")
    click.echo(f"draft  {result.draft_path}  ({len(result.kept_layers)}/{result.n_layers} "
               f"layers; dropped {dropped} by '{result.method}')")


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
