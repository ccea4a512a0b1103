"""Upper bound for any layer-choice method: try *every* n-layer drop set on held-out text.

A scorer chooses layers on calibration prompts; this script instead scores all
C(L-2, n) sets (first and last layers protected, as in ``bridge export``) directly on the
held-out prompts, the very text acceptance is reported on. No method that only chooses
layers can beat the best set it finds there, so it says whether a target acceptance is
reachable by layer choice at all, and where each method's choice ranks.

Cost is kept down by sharing prefixes: the search walks drop sets in order, and the
hidden state before the next candidate layer is computed once for all sets that share
the layers before it (about C(L-2, n) x L/4 layer passes instead of x L).

    python -m bench.investigations.oracle_layers [--model PATH] [--drop 3]
        [--show 3,14,17 --show 13,14,17] [--bench-prompts]
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from bench.common import arg_parser


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("--model", type=Path,
                    default=Path("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--drop", type=int, default=3, help="layers per drop set")
    ap.add_argument("--show", action="append", default=[],
                    help="a drop set (comma-separated) whose rank to print; repeatable")
    ap.add_argument("--bench-prompts", action="store_true",
                    help="add the runtime's bench prompts to the held-out set "
                         "(as python -m bench.layers does)")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args(argv)

    import torch  # after the arguments: --help needs no torch

    from exporters import calibration
    from exporters.loading import resolve_model
    from exporters.scoring import agreement, prepare
    from exporters.torch_model import LayerRunner, load_for_scoring
    from runtime.bench_prompts import BENCH_PROMPTS

    model, tok, _ = load_for_scoring(resolve_model(str(args.model)))
    runner = LayerRunner(model)
    L = runner.n_layers
    _, held_p = calibration.split_holdout(calibration.builtin_prompts())
    if args.bench_prompts:
        held_p += [text for _, text in BENCH_PROMPTS]
    held = prepare(runner, calibration.build_samples(model, tok, runner, held_p))
    n_tokens = sum(len(p.sample.top1) for p in held)
    middle = range(1, L - 1)
    total = math.comb(len(middle), args.drop)
    print(f"{len(held)} held-out prompts, {n_tokens} tokens; {total} sets of {args.drop} "
          f"of layers 1..{L - 2}", flush=True)

    results: dict[tuple[int, ...], int] = {}
    started = time.perf_counter()

    @torch.no_grad()
    def leaf(states: list[torch.Tensor], start: int, dropped: tuple[int, ...]) -> None:
        hits = 0
        for p, h in zip(held, states, strict=True):
            h = runner.run(p.trace, h, start, frozenset())
            hits += agreement(runner.logits(h, p.sample.positions), p.sample)[0]
        results[dropped] = hits
        if len(results) % 100 == 0:
            rate = (time.perf_counter() - started) / len(results)
            print(f"  {len(results)}/{total} sets, ETA {rate * (total - len(results)):.0f} s",
                  flush=True)

    @torch.no_grad()
    def search(states: list[torch.Tensor], start: int, left: int,
               dropped: tuple[int, ...]) -> None:
        """Every way to drop ``left`` more layers from ``start`` on, given ``states``
        (each prompt's hidden state entering layer ``start``)."""
        if left == 0:
            leaf(states, start, dropped)
            return
        for d in range(start, L - 1):
            if L - 1 - d < left:  # no room for the rest before the last layer
                break
            if d >= 1:
                search(states, d + 1, left - 1, dropped + (d,))
            states = [runner.layer(d, h, p.trace) for p, h in zip(held, states, strict=True)]

    search([p.trace.h_in[0] for p in held], 0, args.drop, ())
    ranked = sorted(results, key=lambda s: -results[s])
    print(f"\nsearched {len(results)} sets in {time.perf_counter() - started:.0f} s")
    print(f"best {args.top} of {len(results)} (held-out agreement):")
    for s in ranked[:args.top]:
        print(f"  {list(s)}  {results[s] / n_tokens:.3f}")
    alphas = sorted((v / n_tokens for v in results.values()), reverse=True)
    print(f"median {alphas[len(alphas) // 2]:.3f}, worst {alphas[-1]:.3f}")
    for text in args.show:
        s = tuple(sorted(int(x) for x in text.split(",")))
        if s in results:
            print(f"{list(s)}: {results[s] / n_tokens:.3f}, rank {ranked.index(s) + 1} "
                  f"of {len(ranked)}")


if __name__ == "__main__":
    main()
