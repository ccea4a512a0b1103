"""Held-out acceptance of drafts chosen by each method, measured on llama.cpp.

For SmolLM2 (Q4_1 GGUF) and 1, 3, 6 layers removed: each method (and a random-layer
baseline, mean over a few draws) picks the layers in PyTorch on the built-in calibration
prompts; the draft is then cut from the Q4_1 GGUF by ``exporters.prune.write_draft`` and
measured by llama.cpp as teacher-forced top-1 agreement with the full GGUF's own greedy
output on held-out prompts (the calibration split's held-out part plus the runtime's
bench prompts, none seen by the scorers).

    python -m bench.layers [--model PATH.gguf] [--tokens 96]
        [--methods shortlist,greedy,bi,angular,fit] [--cache /tmp/bench_layers.json]

Layer choices are cached in --cache (reused when present) so a crash loses nothing.
``shortlist`` is scored once per count, as an export dropping that many layers would
(its shortlist grows with the count); the other methods give every count in one run.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import arg_parser

COUNTS = (1, 3, 6)
# methods whose choice for n layers depends on the largest count asked for
PER_COUNT = ("shortlist",)
RANDOM_DRAWS = 5


def choose(model_path: Path, methods: list[str], cache: Path) -> dict:
    """{method: {n: dropped}} plus timings, from cache or by scoring."""
    from exporters import calibration
    from exporters.loading import resolve_model
    from exporters.scoring import ScoringContext, make_scorer, prepare
    from exporters.torch_model import LayerRunner, load_for_scoring

    done = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [m for m in methods if m not in done]
    if not todo:
        return done
    model, tok, _ = load_for_scoring(resolve_model(str(model_path)))
    runner = LayerRunner(model)
    calib_p, _ = calibration.split_holdout(calibration.builtin_prompts())
    calib = prepare(runner, calibration.build_samples(model, tok, runner, calib_p))
    protected = frozenset({0, runner.n_layers - 1})
    for m in todo:
        t = time.perf_counter()
        ctx = ScoringContext(runner, calib, protected)
        if m in PER_COUNT:
            drops = {n: make_scorer(m)(ctx, n).drops[n] for n in COUNTS}
        else:
            drops = make_scorer(m)(ctx, max(COUNTS)).drops
        done[m] = {"drops": {str(n): list(drops[n]) for n in COUNTS},
                   "seconds": time.perf_counter() - t}
        cache.write_text(json.dumps(done, indent=1))
        print(f"{m}: {done[m]}", flush=True)
    return done


def heldout_texts(tok) -> list[list[int]]:
    from exporters import calibration
    from runtime.bench_prompts import BENCH_PROMPTS

    _, held = calibration.split_holdout(calibration.builtin_prompts())
    prompts = held + [text for _, text in BENCH_PROMPTS]
    return [calibration.format_prompt(tok, p) for p in prompts]


def greedy_continuations(full: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    from runtime.context import LlamaContext, LlamaModel

    out = []
    with LlamaModel(full) as model, LlamaContext(model, n_ctx=1024, n_threads=1) as ctx:
        for p in prompts:
            ctx.reset()
            logits = ctx.eval(p)
            new = []
            for _ in range(n):
                tok = int(np.argmax(logits[-1]))
                new.append(tok)
                if model.is_eog(tok):
                    break
                logits = ctx.eval([tok])
            out.append(new)
    return out


def alpha(draft: Path, prompts: list[list[int]], conts: list[list[int]]) -> float:
    """Teacher-forced top-1 agreement of ``draft`` with the full model's continuations."""
    from runtime.context import LlamaContext, LlamaModel

    hits = total = 0
    with LlamaModel(draft) as model, LlamaContext(model, n_ctx=1024, n_threads=1) as ctx:
        for p, c in zip(prompts, conts, strict=True):
            ctx.reset()
            logits = ctx.eval(p + c[:-1], all_logits=True)
            pred = logits[len(p) - 1:].argmax(-1)
            hits += int((pred == np.array(c)).sum())
            total += len(c)
    return hits / total


def draft_alpha(full: Path, dropped: list[int], n_layers: int, prompts, conts) -> float:
    from exporters.prune import DraftInfo, write_draft

    kept = [i for i in range(n_layers) if i not in set(dropped)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "draft.gguf"
        write_draft(full, path, kept, DraftInfo(method="bench", target_sha256=""))
        return alpha(path, prompts, conts)


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("--model", type=Path, default=Path("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--methods", default="shortlist,greedy,bi,angular,fit")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/bench_layers.json"))
    args = ap.parse_args(argv)
    import torch  # after the arguments: --help needs no torch

    torch.set_num_threads(1)  # the machine is shared; results are per-thread anyway

    from transformers import AutoTokenizer

    from exporters.loading import gguf_block_count, open_gguf

    methods = args.methods.split(",")
    n_layers = gguf_block_count(open_gguf(args.model))
    chosen = choose(args.model, methods, args.cache)
    tok = AutoTokenizer.from_pretrained(args.model.parent, gguf_file=args.model.name)
    prompts = heldout_texts(tok)
    conts = greedy_continuations(args.model, prompts, args.tokens)
    print(f"held-out: {len(prompts)} prompts, {sum(map(len, conts))} tokens of the full "
          f"model's greedy output (llama.cpp, {args.model.name})\n")
    rows = {m: [draft_alpha(args.model, chosen[m]["drops"][str(n)], n_layers, prompts, conts)
                for n in COUNTS] for m in methods}
    rng = random.Random(0)
    middle = list(range(1, n_layers - 1))
    rows[f"random (mean of {RANDOM_DRAWS})"] = [
        float(np.mean([draft_alpha(args.model, rng.sample(middle, n), n_layers, prompts, conts)
                       for _ in range(RANDOM_DRAWS)])) for n in COUNTS]
    print(f"{'method':<20}" + "".join(f"{f'-{n} layers':>12}" for n in COUNTS)
          + f"{'scoring s':>12}")
    for m, vals in rows.items():
        secs = chosen.get(m, {}).get("seconds")
        print(f"{m:<20}" + "".join(f"{v:>12.3f}" for v in vals)
              + (f"{secs:>12.1f}" if secs is not None else ""))
    for m in methods:
        print(f"{m}: " + "; ".join(f"-{n}: {chosen[m]['drops'][str(n)]}" for n in COUNTS))


if __name__ == "__main__":
    main()
