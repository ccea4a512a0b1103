"""What one llama_decode of w rows costs on this machine, in one-row steps: the curve V(w)
the controller prices drafts and shared rounds with.

The rows are one sequence's, after ``--context`` tokens of it; each width is timed
``--repeats`` times and the lowest kept. On CPUs the curve is not a line where weights are
repacked for a 4-row gemm (Q4_0, Q4_K, IQ4_NL on AVX2/AVX-512): rows beyond a multiple of
four take the one-row kernel, so three rows can cost more than four.

    python -m bench.widths bench/work/synth-7b.gguf --max 9
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import arg_parser
from runtime.context import LlamaContext, LlamaModel


def widths(model: Path, max_width: int, context: int, repeats: int, threads: int | None
           ) -> dict[int, float]:
    """Seconds of the fastest of ``repeats`` decodes of w rows, for w in 1..max_width."""
    with LlamaModel(model) as m, LlamaContext(m, n_ctx=context + max_width + 1,
                                              n_batch=max(512, max_width),
                                              n_threads=threads) as ctx:
        ctx.decode_rows([0] * context, list(range(context)), [0] * context,
                        [False] * context)
        best: dict[int, float] = {}
        for _ in range(repeats):  # widths interleaved, so drift spreads over all of them
            for w in range(1, max_width + 1):
                start = time.perf_counter()
                ctx.decode_rows([5] * w, list(range(context, context + w)), [0] * w,
                                [True] * w)
                best[w] = min(best.get(w, float("inf")), time.perf_counter() - start)
                ctx.remove_seq(0, context)
    return best


def main(argv: list[str] | None = None) -> None:
    p = arg_parser(__spec__.name, __doc__)
    p.add_argument("model", type=Path)
    p.add_argument("--max", type=int, default=9, help="widest batch timed")
    p.add_argument("--context", type=int, default=64, help="tokens before the rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.max < 1 or a.context < 1 or a.repeats < 1:
        p.error("--max, --context and --repeats must be >= 1")
    best = widths(a.model, a.max, a.context, a.repeats, a.threads)
    print(f"{a.model.name}: one row {1000 * best[1]:.1f} ms")
    print(" ".join(f"V({w})={t / best[1]:.2f}" for w, t in best.items()))


if __name__ == "__main__":
    main()
