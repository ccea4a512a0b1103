"""One-shot `bridge generate` runs against `--no-draft`, as a user types them.

Each prompt runs as two separate processes, alternating which goes first, each printing
its figures with --json; the ratio of decode speeds (tokens/s) is taken per prompt and the
median reported. A one-shot run pays any calibration again, unless a device profile stored
by an earlier run applies (issue 11); ``--recalibrate`` measures the cold case.

    python -m bench.oneshot MODEL.gguf [-n 128] [--threads 2] [--recalibrate]
"""

from __future__ import annotations

import statistics

from bench.common import arg_parser, bridge_generate
from runtime.bench_prompts import BENCH_PROMPTS, COPY_PROMPTS

PROMPTS = [p for _, p in BENCH_PROMPTS] + [p for _, p in COPY_PROMPTS[:3]]


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("model")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--recalibrate", action="store_true",
                    help="measure costs afresh in every run (the cold case)")
    args = ap.parse_args(argv)
    spec = ["--recalibrate"] if args.recalibrate else []
    ratios = []
    for i, prompt in enumerate(PROMPTS):
        pair = [("plain", ["--no-draft"]), ("auto", spec)]
        if i % 2:
            pair.reverse()
        res = {name: bridge_generate(args.model, prompt, args.n, extra, args.threads)
               for name, extra in pair}
        a, p = res["auto"]["stats"], res["plain"]["stats"]
        ratio = a["tokens_per_s"] / p["tokens_per_s"]
        ratios.append(ratio)
        same = res["auto"]["tokens"] == res["plain"]["tokens"]
        print(f"{i + 1:2d}. plain {p['tokens_per_s']:6.1f} tok/s, auto {a['tokens_per_s']:6.1f} "
              f"({ratio:.2f}x, {a['mode']}, {a['tokens_per_step']:.2f} tok/step, "
              f"identical: {same})", flush=True)
    print(f"median one-shot speed vs --no-draft over {len(ratios)} prompts: "
          f"{statistics.median(ratios):.3f}x (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
