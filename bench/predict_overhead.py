"""What bridge's own time per step costs on a fast device: a prediction, not a measurement.

The cost model (``runtime.costmodel``) with a verify curve fed in instead of measured: flat
up to ``--k-flat`` tokens, as GPUs give. A step of the target costs ``--step-ms``; bridge
adds its own time per step (``--overhead-us``, measured here on a CPU with
``bridge bench``'s "py µs/step" column) and llama.cpp's own loop adds its sampler's
(``--lean-us``). Printed per acceptance alpha of a lookup-like draft (a draft token costs
~0): plain decoding and the best speculation, each as a ratio to llama.cpp's own loop.

    python -m bench.predict_overhead --step-ms 3 --overhead-us 300,90 \
        --spec-extra-us 60 --lean-us 25 --alphas 0,0.5,0.7,0.9
"""

from __future__ import annotations

from bench.common import arg_parser
from runtime import costmodel


def ratios(step: float, overhead: float, extra: float, lean: float, alpha: float,
           k_flat: int, gamma_max: int) -> tuple[float, float, int]:
    """(plain vs llama.cpp, best speculation vs llama.cpp, its gamma), all in seconds."""
    flat = costmodel.flat_verify(k_flat)

    def verify(k: int) -> float:
        return step * flat(k)

    lean_rate = 1.0 / (step + lean)
    plain = 1.0 / (step + overhead)
    if alpha <= 0:
        return plain / lean_rate, plain / lean_rate, 0
    gamma, rate = costmodel.best_gamma(alpha, 0.0, verify, gamma_max, 0,
                                       (overhead, overhead + extra))
    return plain / lean_rate, rate / lean_rate, gamma


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("--step-ms", type=float, default=3.0, help="a target step on the device")
    ap.add_argument("--overhead-us", default="300,90",
                    help="bridge's own µs per step to compare, e.g. before,after")
    ap.add_argument("--spec-extra-us", type=float, default=60.0,
                    help="what a drafting step adds to bridge's µs (asking the sources, "
                         "the bookkeeping of several tokens)")
    ap.add_argument("--lean-us", type=float, default=25.0,
                    help="llama.cpp's own loop's µs per token outside llama_decode")
    ap.add_argument("--alphas", default="0,0.5,0.7,0.9")
    ap.add_argument("--k-flat", type=int, default=8, help="the verify curve is flat to here")
    ap.add_argument("--draft-max", type=int, default=8)
    args = ap.parse_args(argv)
    step, lean = args.step_ms * 1e-3, args.lean_us * 1e-6
    overheads = [float(x) for x in args.overhead_us.split(",")]
    print(f"# predicted: target step {args.step_ms} ms, verify flat to k = {args.k_flat}, "
          f"llama.cpp's loop +{args.lean_us:.0f} µs per token, a drafting step +"
          f"{args.spec_extra_us:.0f} µs, lookup-like drafts (c = 0)\n")
    print("| bridge µs/step | alpha | plain vs llama.cpp | best speculation vs llama.cpp "
          "| its gamma |")
    print("| --- | --- | --- | --- | --- |")
    for o in overheads:
        for a in (float(x) for x in args.alphas.split(",")):
            p, s, g = ratios(step, o * 1e-6, args.spec_extra_us * 1e-6, lean, a, args.k_flat,
                             args.draft_max)
            print(f"| {o:.0f} | {a:.2f} | {p:.3f} | {s:.3f} | {g} |")


if __name__ == "__main__":
    main()
