"""`bridge bench`: plain against speculative decoding on the same prompts, same process."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bridge.run_cli import user_errors


def _int_list(_ctx, _param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected a comma-separated list of integers, got {value!r}"
                                 ) from None


def _read_prompts(path: Path) -> tuple[str, ...]:
    """One prompt per line (.txt) or per {"prompt": ...} object (.jsonl)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        try:
            return tuple(json.loads(ln)["prompt"] for ln in text.splitlines() if ln.strip())
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: each line must be a JSON object with a 'prompt' "
                             f"field ({e})") from None
    return tuple(ln.strip() for ln in text.splitlines() if ln.strip())


@click.command("bench")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--draft", type=click.Path(path_type=Path),
              help="Draft GGUF (default: MODEL.draft.gguf beside the model).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help="Prompt file: .txt (one per line) or .jsonl ({\"prompt\": ...}).")
@click.option("-n", "--max-tokens", type=int, help="Tokens generated per prompt.")
@click.option("--draft-max", "gammas", callback=_int_list,
              help="Fixed gammas to run besides plain and adaptive, e.g. 2,4,8.")
@click.option("--temp", type=float, default=0.0, show_default=True,
              help="Sampling temperature (greedy by default, so outputs can be compared).")
@click.option("-c", "--ctx", "n_ctx", type=int, help="Context length in tokens.")
@click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", type=int, help="GPU layers (-1: all).")
@click.option("--threads", "n_threads", type=int, help="CPU threads.")
@click.option("--json", "json_out", type=click.Path(path_type=Path),
              help="Also write the figures to this JSON file ('-' for stdout only).")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path),
              help="Write a PNG chart of speed and the verify-cost curve.")
@user_errors
def bench_cmd(model, draft, prompts_file, max_tokens, gammas, temp, n_ctx, n_gpu_layers,
              n_threads, json_out, plot_out) -> None:
    """Compare plain and speculative decoding side by side on this machine."""
    from runtime.bench import BenchConfig, run_bench
    from runtime.config import RuntimeConfig, SamplingConfig
    from runtime.engine import Engine

    given = {k: v for k, v in dict(max_tokens=max_tokens, fixed_gammas=gammas).items()
             if v is not None}
    if prompts_file:
        given["prompts"] = _read_prompts(prompts_file)
    cfg = BenchConfig(**given)
    runtime = RuntimeConfig(**{k: v for k, v in dict(
        n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n_threads).items() if v is not None})
    with Engine(model, draft=draft or "auto", runtime=runtime,
                sampling=SamplingConfig(temp=temp)) as engine:
        result = run_bench(engine, cfg)
    if json_out and str(json_out) == "-":
        click.echo(json.dumps(result, indent=1))
        return
    if json_out:
        json_out.write_text(json.dumps(result, indent=1))
    _print_table(result)
    if plot_out:
        _plot(result, plot_out)


def _print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = r["costs"]
    t = Table(title=f"{r['model']} + {r['draft']}  ({r['n_prompts']} prompts x "
                    f"{r['max_tokens']} tokens, {'greedy' if r['greedy'] else 'sampled'})")
    for col in ("mode", "tok/s", "speedup", "theory", "accept", "acc/step", "same",
                "mean γ", "python"):
        t.add_column(col, justify="right", no_wrap=True)
    for name, m in r["modes"].items():
        t.add_row(name, f"{m['tokens_per_s']:.1f}", f"{m['speedup']:.2f}x",
                  f"{m['theoretical_speedup']:.2f}x" if "theoretical_speedup" in m else "",
                  f"{m['acceptance_rate']:.0%}" if name != "plain" else "",
                  f"{m['mean_accepted_per_step']:.2f}" if name != "plain" else "",
                  f"{m['identical_to_plain']}/{r['n_prompts']}",
                  f"{m['mean_gamma']:.2f}", f"{m['python_overhead']:.1%}")
    console = Console(width=max(100, Console().width))
    console.print(t)
    console.print("speedup: against plain in this run; theory: from measured alpha, gamma and "
                  "costs; same: greedy outputs identical to plain; python: time outside "
                  "llama_decode")
    curve = ", ".join(f"{k}:{v:.2f}" for k, v in c["verify_curve"].items())
    console.print(f"target step {c['target_step_ms']:.2f} ms; draft step {c['draft_step_ms']} ms"
                  f" (c = {c['c']}); verify k tokens / 1 token: {curve}")
    for name, m in r["modes"].items():
        if m.get("note"):
            console.print(f"{name}: {m['note']}")


def _plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib (the export extra): pip install matplotlib"
                         ) from None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(r["modes"])
    a.bar(names, [r["modes"][n]["tokens_per_s"] for n in names], color="#4a7")
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
