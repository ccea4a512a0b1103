"""`bridge bench`: plain against speculative decoding on the same prompts, same process."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bridge.run_cli import (
    resolve_models,
    rpc_settings,
    user_errors,
    with_model_options,
    with_rpc_options,
)
from runtime.bench_prompts import PROMPT_SETS
from runtime.config import DRAFTERS


def _int_list(_ctx, _param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected a comma-separated list of integers, got {value!r}"
                                 ) from None


@click.command("bench")
@click.argument("model")
@with_model_options
@click.option("--drafter", type=click.Choice(DRAFTERS),
              help="Sources to compare: auto (lookup, plus the pruned draft when there is "
                   "one), lookup or pruned [default: auto].")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help="Prompt file: .txt (one per line) or .jsonl ({\"prompt\": ...}); "
                   "replaces the built-in sets.")
@click.option("--set", "prompt_sets", multiple=True, type=click.Choice(list(PROMPT_SETS)),
              help="Built-in prompt set (repeatable): open-ended or copy-heavy "
                   "[default: both].")
@click.option("-n", "--max-tokens", type=int, help="Tokens generated per prompt.")
@click.option("--gammas", "gammas", callback=_int_list,
              help="Fixed pruned-draft gammas to run besides the adaptive modes, e.g. 2,4,8.")
@click.option("--lookup-gamma", type=int, help="Forced lookup mode's gamma (0: none).")
@click.option("--temp", type=float, default=0.0, show_default=True,
              help="Sampling temperature (greedy by default, so outputs can be compared).")
@click.option("-c", "--ctx", "n_ctx", type=int, help="Context length in tokens.")
@click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", type=int, help="GPU layers (-1: all).")
@click.option("--threads", "n_threads", type=int,
              help="CPU threads [default: every core this process may use].")
@with_rpc_options
@click.option("--exact", is_flag=True, default=None,
              help="Exact mode: verify batches whose logits equal one-token steps bitwise.")
@click.option("--no-backend-argmax", "backend_argmax", flag_value=False, default=None,
              help="bridge's modes read greedy choices from the logits in Python.")
@click.option("--json", "json_out", type=click.Path(path_type=Path),
              help="Also write the figures to this JSON file ('-' for stdout only).")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path),
              help="Write a PNG chart of speed and the verify-cost curve.")
@user_errors
def bench_cmd(model, revision, draft, drafter, prompts_file, prompt_sets, max_tokens, gammas,
              lookup_gamma, temp, n_ctx, n_gpu_layers, n_threads, exact, backend_argmax,
              json_out, plot_out, **rpc_opts) -> None:
    """Compare plain decoding and each draft source side by side on this machine.

    MODEL: a .gguf file, a folder, a bundled name, or a Hugging Face id such as
    org/name-GGUF:Q4_K_M (downloaded once into the HF cache; see `bridge --help`).
    """
    from runtime.bench import BenchConfig, run_bench
    from runtime.config import RuntimeConfig, SamplingConfig, SpeculativeConfig
    from runtime.engine import Engine
    from runtime.prompts_file import read_prompts

    given = {k: v for k, v in dict(max_tokens=max_tokens, fixed_gammas=gammas,
                                   lookup_gamma=lookup_gamma).items() if v is not None}
    if prompts_file:
        given["prompts"] = tuple(read_prompts(prompts_file))
    if prompt_sets:
        given["prompt_sets"] = tuple(prompt_sets)
    cfg = BenchConfig(**given)
    if drafter == "none":
        raise ValueError("bench compares draft sources; --drafter none leaves nothing to "
                         "compare (plain decoding is always one of the modes)")
    runtime = RuntimeConfig(**{k: v for k, v in dict(
        n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n_threads,
        exact=exact, backend_argmax=backend_argmax).items() if v is not None},
        **rpc_settings(rpc_opts))
    spec = SpeculativeConfig(**({"drafter": drafter} if drafter else {}))
    files = resolve_models({"model": model, "revision": revision, "draft": draft})
    model, draft = files["model"], files["draft"]
    use_draft = None if drafter == "lookup" else (draft or "auto")
    with Engine(model, draft=use_draft, runtime=runtime, speculative=spec,
                sampling=SamplingConfig(temp=temp)) as engine:
        result = run_bench(engine, cfg)
    if json_out and str(json_out) == "-":
        click.echo(json.dumps(result, indent=1))
        return
    if json_out:
        json_out.write_text(json.dumps(result, indent=1))
    _print_tables(result)
    if plot_out:
        _plot(result, plot_out)


def _print_tables(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from runtime.bench import cpu_summary

    console = Console(width=max(150, Console().width))
    greedy = "greedy" if r["greedy"] else "sampled"
    for set_name, res in r["sets"].items():
        t = Table(title=f"{r['model']}: '{set_name}' prompts ({res['n_prompts']} x "
                        f"{r['max_tokens']} tokens, {greedy})")
        for col in ("mode", "tok/s", "speedup", "vs llama.cpp", "theory", "tok/step", "accept",
                    "by source", "same", "margins", "mean γ", "py µs/step",
                    "median"):
            t.add_column(col, justify="right", no_wrap=col != "by source")
        for name, m in res["modes"].items():
            by = " ".join(f"{s} {v['accepted']}/{v['drafted']}" for s, v in m["sources"].items())
            vs = m.get("vs_llama_cpp")
            t.add_row(name, f"{m['tokens_per_s']:.1f}", f"{m['speedup']:.2f}x",
                      f"{vs:.3f}x" if vs else "",
                      f"{m['theoretical_speedup']:.2f}x" if "theoretical_speedup" in m else "",
                      f"{m['tokens_per_step']:.2f}",
                      f"{m['acceptance_rate']:.0%}" if name != "plain" else "", by,
                      f"{m['identical_to_plain']}/{res['n_prompts']}",
                      " ".join(f"{x:.2f}" for x in m["divergence_margins"]),
                      f"{m['mean_gamma']:.2f}", f"{m['python_us_per_step']:.0f}",
                      f"{m['python_us_per_step_median']:.0f}")
        console.print(t)
        for name, m in res["modes"].items():
            if m.get("note"):
                console.print(f"{set_name} / {name}: {m['note']}")
    console.print("speedup: against plain in the same run; theory: the cost model from "
                  "measured alpha and costs; tok/step: tokens per target evaluation; same: "
                  "outputs identical to plain; margins: the full model's top-2 logit gap "
                  "where an output first differs (small = a near-tie); vs llama.cpp: "
                  "against the faster of llama.cpp's own greedy loops (llama_decode + its "
                  "CPU sampler, or + its in-graph argmax) with no Python per token; py "
                  "µs/step: bridge's own time per target step, outside llama_decode (mean, "
                  "and the median step)")
    c = r["costs"]
    curve = ", ".join(f"{k}:{v:.2f}" for k, v in c["verify_curve"].items())
    console.print(f"cpu: {cpu_summary(r['machine'])}; {r['numerics']['describe']}")
    console.print(f"target step {c['target_step_ms']:.2f} ms; "
                  f"draft step {c['draft_step_ms']} ms (c = {c['c']}); verify k tokens / "
                  f"1 token: {curve}")


def _plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib (the export extra): pip install matplotlib"
                         ) from None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    modes = next(iter(r["sets"].values()))["modes"]
    names = list(modes)
    a.bar(names, [modes[n]["tokens_per_s"] for n in names], color="#4a7")
    a.tick_params(axis="x", rotation=30)
    a.set_ylabel("tokens/s")
    a.set_title("decode speed")
    ks = [int(k) for k in r["costs"]["verify_curve"]]
    b.plot(ks, list(r["costs"]["verify_curve"].values()), "o-", label="measured")
    b.plot(ks, ks, "--", color="grey", label="k x one step")
    b.set_xlabel("tokens verified in one batch (k)")
    b.set_ylabel("cost / one-token step")
    b.set_title("verify cost curve")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
