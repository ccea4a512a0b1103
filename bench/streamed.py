"""Wall time and peak memory of ``bridge export SYNTH.gguf --prune 0.25 --method bi`` on a
random-weight llama GGUF (``bench.synth_gguf``), scored layer by layer.

    python -m bench.streamed                       # Llama-3-8B's shape
    python -m bench.streamed --hidden 2048 --layers 16 --ffn 5632
    python -m bench.streamed --prompts 4   # the first 4 built-in prompts

The GGUF is written once under bench/work/. The export runs as its own process
(``bench.export.measure_export``: peak RSS from wait4, peak anonymous memory sampled from /proc);
the stage times come from the ``.layers.json`` it writes. RSS counts pages of the mapped
GGUF that llama.cpp reads while writing the calibration text (the kernel drops those
under pressure); anonymous memory is what must fit in RAM.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench import synth_gguf
from bench.common import ROOT, arg_parser
from bench.export import measure_export
from exporters import testmodels


def main(argv: list[str] | None = None) -> None:
    p = arg_parser(__spec__.name, __doc__)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prune", default="0.25")
    p.add_argument("--method", default="bi")
    p.add_argument("--prompts", type=int, default=None,
                   help="calibrate on the first N built-in prompts (default: all)")
    p.add_argument("--time-budget", default=None,
                   help="the export's --time-budget in minutes, or none (default: its own)")
    a = p.parse_args(argv)
    from exporters import calibration  # torch: after the arguments, so --help needs none

    model = ROOT / "bench" / "work" / f"synth-{a.hidden}x{a.layers}-Q4_0.gguf"
    if not model.is_file():
        synth_gguf.write(model, a.hidden, a.layers, a.ffn, 32, 8,
                         testmodels.fetch_gguf(testmodels.SMOLLM2))
    mib = model.stat().st_size / 2**20
    print(f"{model.name}: {mib:.0f} MiB")
    args = [str(model), "--prune", a.prune, "--method", a.method]
    if a.threads:
        args += ["--threads", str(a.threads)]
    if a.time_budget:
        args += ["--time-budget", a.time_budget]
    log = ROOT / "bench" / "work" / f"{model.stem}.export.log"
    with tempfile.TemporaryDirectory(prefix="bench-streamed-", dir=ROOT / "bench" / "work") as tmp:
        if a.prompts:
            calib = Path(tmp) / "prompts.jsonl"
            calib.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in
                                     calibration.builtin_prompts()[:a.prompts]))
            args += ["--calib", str(calib)]
        measure_export(f"{model.stem} --method {a.method}", args, Path(tmp), mib, log)
        report = json.loads(next(Path(tmp).glob("*.layers.json")).read_text())
        print("stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in
                                         report["seconds"].items()))
        print(f"prompts: {report['calib_prompts']} scored + {report['heldout_prompts']} "
              f"held out of {report['prompts_offered']} offered "
              f"({report['calib_tokens']} scored tokens); the export's log: {log}")


if __name__ == "__main__":
    main()
