"""The whole chain on the bundled models: export at several prune ratios with each scoring
method, `bridge bench` each draft, and write one markdown summary to bench/results/.

    python -m bench.chain                       # defaults below
    python -m bench.chain --models smollm2 --ratios 0.1 --methods bi -n 32

Every step runs the real CLI in a subprocess, exactly as a user would.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
from pathlib import Path

from bench.common import BRIDGE, ROOT, arg_parser, checkout_env


def run_cli(cmd: list[str]) -> str:
    """One `bridge` command of this checkout; its stdout (its stderr in the error)."""
    print("$", " ".join(["bridge", *cmd[3:]] if tuple(cmd[:3]) == BRIDGE else cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=checkout_env())
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def export_methods() -> list[str]:
    """Scoring methods the exporter offers (read from its --help, so the script follows it)."""
    help_text = run_cli([*BRIDGE, "export", "--help"])
    if "--method" not in help_text:
        return ["even"]
    return [m for m in ("greedy", "bi", "angular", "fit") if m in help_text]


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--ratios", default="0.1,0.2,0.4")
    ap.add_argument("--methods", default=None, help="default: every method export offers")
    ap.add_argument("--plan", default=None,
                    help="explicit MODEL:METHOD:RATIO list instead of the full product, "
                         "e.g. smollm2:greedy:0.1,gemma3:bi:0.1")
    ap.add_argument("-n", "--max-tokens", type=int, default=64)
    ap.add_argument("--draft-max", default="1,2,4")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reuse-exports", action="store_true",
                    help="bench drafts already exported in --work instead of exporting again")
    ap.add_argument("--reuse-bench", action="store_true",
                    help="with --reuse-exports: keep a draft's earlier bench.json too (the "
                         "summary marks such rows)")
    args = ap.parse_args(argv)
    if args.plan:
        plan = [tuple(item.split(":")) for item in args.plan.split(",")]
    else:
        methods = args.methods.split(",") if args.methods else export_methods()
        plan = [(m, meth, r) for m in args.models.split(",") for meth in methods
                for r in args.ratios.split(",")]
    rows, machine = [], None
    for model, method, ratio in plan:
        outdir = args.work / model / f"{method}-{ratio}"
        export = [*BRIDGE, "export", model, "--prune", ratio, "-o", str(outdir), "--force"]
        if method != "even":
            export += ["--method", method]
        if not (args.reuse_exports and list(outdir.glob("*.draft.gguf"))):
            run_cli(export)
        full = next(p for p in outdir.glob("*.gguf") if not p.name.endswith(".draft.gguf"))
        result_json = outdir / "bench.json"
        bench = [*BRIDGE, "bench", str(full), "-n", str(args.max_tokens),
                 "--draft-max", args.draft_max, "--json", str(result_json)]
        if args.threads:
            bench += ["--threads", str(args.threads)]
        reused = args.reuse_exports and args.reuse_bench and result_json.is_file()
        if not reused:
            run_cli(bench)
        r = json.loads(result_json.read_text())
        r["reused"] = reused
        r["dropped"] = json.loads(full.with_name(full.name[:-5] + ".layers.json").read_text()
                                  ).get("dropped") if method != "even" else None
        machine = r["machine"]
        rows.append((model, method, ratio, r))
    write_summary(rows, machine, args)


def write_summary(rows, machine: dict, args) -> None:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or ROOT / "bench" / "results" / f"{stamp}-cpu-{machine['cores']}core.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# bridge whole-chain benchmark, {stamp}",
        "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, "
        f"GPU offload: {'yes' if machine['gpu_offload'] else 'no (CPU build)'}",
        f"- llama.cpp: llama-cpp-python {machine['llama_cpp_python']}; "
        f"Python {machine['python']} on {platform.platform()}",
        f"- {args.max_tokens} tokens per prompt, greedy, the default prompt set "
        "(chat, code, math, summarization, creative); modes interleaved in one process",
        "",
        "| model | method | prune | dropped | plain tok/s | adaptive | best fixed γ | α (γ=1) | "
        "c | theory (best γ) | identical |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, method, ratio, r in rows:
        modes = r["modes"]
        fixed = {k: v for k, v in modes.items() if k.startswith("gamma=")}
        best = max(fixed, key=lambda k: fixed[k]["speedup"]) if fixed else None
        alpha = modes.get("gamma=1", {}).get("alpha", float("nan"))
        same = min(m["identical_to_plain"] for m in modes.values())
        lines.append(
            f"| {model} | {method}{' *' if r.get('reused') else ''} | {ratio} | "
            f"{r.get('dropped') or ''} | "
            f"{modes['plain']['tokens_per_s']:.1f} | "
            f"{modes['adaptive']['speedup']:.2f}x | "
            + (f"{best}: {fixed[best]['speedup']:.2f}x | " if best else "| ")
            + f"{alpha:.2f} | {r['costs']['c']} | "
            + (f"{fixed[best].get('theoretical_speedup', float('nan')):.2f}x | " if best
               else "| ")
            + f"{same}/{r['n_prompts']} |")
    note = next((m.get("note") for _, _, _, r in rows for m in r["modes"].values()
                 if m.get("note")), None)
    if note:
        lines += ["", f"Adaptive mode's verdict: {note}."]
    if any(r.get("reused") for *_, r in rows):
        lines += ["", "\\* benchmarked in an earlier run of this script (--reuse-bench); "
                  "other rows in this run."]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
