"""Which llama.cpp settings make a verify batch's logits equal a one-token step's.

For each bundled model (or the GGUFs given) and each combination of KV cache type, flash
attention, weight repacking and minimum batch rows, it measures the largest logit
difference between one-token and batched evaluation of the same greedy tokens
(``runtime.numerics.measure_bound``) and prints one row per setting, with the CPU named.

    python -m bench.numerics [MODEL.gguf ...] [-n 96] [--threads 2] [--quick]
"""

from __future__ import annotations

import itertools
from pathlib import Path

from bench.common import arg_parser
from exporters import testmodels
from runtime.bench import cpu_summary
from runtime.context import LlamaContext, LlamaModel, Numerics
from runtime.numerics import exact_width, measure_bound

PROMPT = "Write a Python function that returns the n-th Fibonacci number, then explain it."


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("-n", "--positions", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="default and exact settings only")
    args = ap.parse_args(argv)
    models = args.models or [testmodels.fetch_gguf(testmodels.SMOLLM2),
                             testmodels.fetch_gguf(testmodels.GEMMA3)]
    if args.quick:
        settings = [Numerics(), Numerics.exact()]
    else:
        settings = [Numerics(min_rows=r, flash_attn=fa, kv_type=kv, repack=rp)
                    for r, fa, kv, rp in itertools.product(
                        (1, 2), (None, False), ("f16", "f32"), (True, False))]
    print(f"# {cpu_summary()}")
    print("| model | min rows | flash attn | KV | repack | max abs | median | bitwise equal "
          "rows | argmax flips | widest equal batch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in models:
        for num in settings:
            with LlamaModel(path, repack=num.repack) as model:
                ids = model.tokenize(PROMPT, True, True)
                def make(m=model, n=num):
                    return LlamaContext(m, n_ctx=512, n_threads=args.threads, numerics=n)

                b = measure_bound(make, ids, args.positions)
                with make() as ctx:
                    widest = exact_width(ctx, ids, 17)
            total = b.n_positions * len(b.widths)
            fa = {None: "auto", True: "on", False: "off"}[num.flash_attn]
            print(f"| {path.name} | {num.min_rows} | {fa} | {num.kv_type} | "
                  f"{'on' if num.repack else 'off'} | {b.max_abs:.4g} | {b.median_abs:.3g} | "
                  f"{b.n_identical}/{total} | {b.argmax_flips} | "
                  f"{widest if widest < 17 else '17+'} |", flush=True)


if __name__ == "__main__":
    main()
