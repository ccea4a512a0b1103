"""``bridge export``: parse options, build an ``ExportConfig``, call ``run_export``.

Defaults live in ``exporters.config``; only options the user gave are passed on.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import click

from exporters.config import (
    AUTO,
    DEFAULT_HF_QUANT,
    DEFAULT_METHOD,
    DEFAULT_PRUNE,
    DEFAULT_TIME_BUDGET_S,
    DEVICE_PROFILES,
    KEEP,
    METHODS,
    SCORE_DTYPES,
    ExportConfig,
    parse_layer_list,
    parse_minutes,
)


@click.command("export")
@click.argument("model")
@click.option("--prune", metavar="RATIO|auto",
              help=f"Fraction of layers to drop, between 0 and 1, or '{AUTO}' to pick the "
                   f"ratio by predicted speedup [default: {DEFAULT_PRUNE}].")
@click.option("--method", metavar="|".join(METHODS),
              help=f"How --prune chooses layers [default: {DEFAULT_METHOD}].")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration prompts (.txt one per line, or .jsonl with "
                   "{\"prompt\": ...}) instead of the built-in set.")
@click.option("--keep-layers", metavar="LIST",
              help="Layers --prune never drops [default: the first and last].")
@click.option("--device-profile", metavar="|".join(DEVICE_PROFILES),
              help="Verify-cost profile for --prune auto [default: gpu when llama.cpp "
                   "can offload to a GPU, else cpu].")
@click.option("--score-dtype", metavar="|".join(SCORE_DTYPES),
              help="Weight dtype for scoring [default: auto: bfloat16 on a GPU; float32 on "
                   "a CPU, or bfloat16 when float32 would not fit in RAM].")
@click.option("--drop-layers", metavar="LIST",
              help="Exact layers to drop instead of --prune, e.g. '3,7,12' or '10-12'.")
@click.option("--quant", metavar="TYPE",
              help=f"llama.cpp type: Q4_K_M, Q8_0, Q6_K, Q4_0, F16, ... or {KEEP}. "
                   f"[default: {DEFAULT_HF_QUANT} for a Hugging Face model, "
                   f"{KEEP} (the file's own type) for a GGUF]")
@click.option("--threads", type=int,
              help="CPU threads for quantizing and scoring [default: every core this "
                   "process may use].")
@click.option("--time-budget", metavar="MINUTES|none",
              help="Wall time the whole export may take: scoring uses as many calibration "
                   "prompts as are predicted to fit, and says so; 'none' uses all of them "
                   f"[default: {DEFAULT_TIME_BUDGET_S / 60:g}].")
@click.option("-o", "--outdir", type=click.Path(path_type=Path),
              help="Output folder [default: the current folder].")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--revision", metavar="REV",
              help="Branch, tag or commit of a Hugging Face MODEL [default: main].")
@click.option("--copy-full", is_flag=True,
              help="Also copy a GGUF from the Hugging Face cache into the output folder "
                   "(by default it stays in the cache and only the draft is written).")
def export_cmd(model: str, prune: str | None, method: str | None, calib: Path | None,
               keep_layers: str | None, device_profile: str | None, score_dtype: str | None,
               drop_layers: str | None,
               quant: str | None, threads: int | None, time_budget: str | None,
               outdir: Path | None, force: bool, revision: str | None,
               copy_full: bool) -> None:
    """Export MODEL to a full GGUF and a layer-pruned draft GGUF beside it.

    \b
    MODEL is a Hugging Face folder, a .gguf file, a bundled model name (smollm2,
    gemma3), or a Hugging Face id, downloaded once into the HF cache:
      org/name              its safetensors checkpoint, converted and quantized
      org/name-GGUF:Q4_K_M  that GGUF as it is (default quant: as llama.cpp's -hf)
    Writes <name>-<QUANT>.gguf and <name>-<QUANT>.draft.gguf. The draft keeps the
    full model's quantized bytes for every layer it keeps. A GGUF from the HF cache
    stays there (--copy-full copies it): `bridge chat org/name-GGUF:Q4_K_M` then
    finds the draft by the full file's sha256, which the draft records.
    """
    from exporters.export import run_export  # the exporter loads only when used
    from exporters.report import rich_stages

    # `kill` (SIGTERM) must clean up like Ctrl-C: as an exception, the exporter's
    # staging removes its temporary files on the way out instead of leaving them behind
    signal.signal(signal.SIGTERM, _exit_on_signal)
    # gguf-py narrates every file it writes at INFO; show that only with -vv
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("gguf").setLevel(logging.WARNING)
    try:
        given = {"prune": prune, "quant": quant, "out_dir": outdir, "force": force or None,
                 "method": method, "calib": calib, "device_profile": device_profile,
                 "score_dtype": score_dtype, "threads": threads, "revision": revision,
                 "copy_full": copy_full or None}
        # None is a value here ("none": no budget), so it does not go through ``given``
        budget = {} if time_budget is None else {"time_budget": parse_minutes(time_budget)}
        if drop_layers is not None:
            given["drop_layers"] = parse_layer_list(drop_layers)
        if keep_layers is not None:
            given["keep_layers"] = parse_layer_list(keep_layers, "--keep-layers")
        cfg = ExportConfig(model=model, **{k: v for k, v in given.items() if v is not None},
                           **budget)
        result = run_export(cfg, stages=rich_stages)
    except (ValueError, FileNotFoundError, OSError, ImportError) as e:
        raise click.ClickException(_one_line(e)) from None
    if result.report is not None:
        from rich.console import Console

        from exporters.report import summary, table

        Console().print(table(result.report))
        click.echo(summary(result.report))
        for path in result.report_paths:
            click.echo(f"report {path}")
    dropped = ",".join(map(str, result.dropped_layers))
    where = "  (in the Hugging Face cache, not copied: --copy-full copies it)" \
        if result.full_in_cache else ""
    click.echo(f"full   {result.full_path}{where}")
    click.echo(f"draft  {result.draft_path}  ({len(result.kept_layers)}/{result.n_layers} "
               f"layers; dropped {dropped} by '{result.method}')")
    if result.full_in_cache:
        run = f"{model} --revision {revision}" if revision else model
        click.echo(f"run    bridge chat {run}  (finds this draft by the full file's sha256)")


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _exit_on_signal(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)
