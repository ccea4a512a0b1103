"""Time ``bridge export`` per layer-scoring method on SmolLM2.

Each run is a whole export (calibration text, scoring, held-out acceptance, report,
draft) into a temporary folder, so the time is what a user waits.

    python -m bench.scoring [--model PATH]
        [--methods shortlist,bi,angular,fit,greedy]
        [--prune 0.1] [--threads N]
"""

from __future__ import annotations

import tempfile
import time

from bench.common import arg_parser


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--methods", default="shortlist,bi,angular,fit,greedy")
    ap.add_argument("--prune", default="0.1")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default, all cores)")
    args = ap.parse_args(argv)
    import torch  # after the arguments: --help needs no torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}", flush=True)

    from exporters.config import ExportConfig
    from exporters.export import run_export

    rows = []
    for method in args.methods.split(","):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            result = run_export(ExportConfig(model=args.model, out_dir=out, prune=args.prune,
                                             method=method, device_profile="cpu"))
            total = time.perf_counter() - start
        rep = result.report
        stages = ", ".join(f"{k} {v:.0f}s" for k, v in rep.seconds.items())
        rows.append((method, total, rep.dropped, rep.heldout_alpha, stages))
        print(f"{method}: {total:.0f}s ({stages})", flush=True)
    print(f"\n{'method':<10}{'total s':>9}  {'held-out a':>10}  dropped  (stages)")
    for method, total, dropped, alpha, stages in rows:
        print(f"{method:<10}{total:>9.0f}  {alpha:>10.3f}  {dropped}  ({stages})")


if __name__ == "__main__":
    main()
