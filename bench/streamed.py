#!/usr/bin/env python3
"""Wall time and peak memory of ``bridge export SYNTH.gguf --prune 0.25 --method bi`` on a
random-weight llama GGUF (``scripts/synth_gguf.py``), scored layer by layer.

    .venv/bin/python scripts/bench_streamed.py                       # Llama-3-8B's shape
    .venv/bin/python scripts/bench_streamed.py --hidden 2048 --layers 16 --ffn 5632
    .venv/bin/python scripts/bench_streamed.py --prompts 4   # the first 4 built-in prompts

The GGUF is written once under bench/work/. The export runs as its own process
(``bench_export.run``: peak RSS from wait4, peak anonymous memory sampled from /proc);
the stage times come from the ``.layers.json`` it writes. RSS counts pages of the mapped
GGUF that llama.cpp reads while writing the calibration text (the kernel drops those
under pressure); anonymous memory is what must fit in RAM.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a script, not library code: find the checkout's packages
sys.path.insert(0, str(ROOT / "scripts"))

import bench_export  # noqa: E402
import synth_gguf  # noqa: E402

from exporters import calibration, testmodels  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    a = p.parse_args()
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
        bench_export.run(f"{model.stem} --method {a.method}", args, Path(tmp), mib, log)
        report = json.loads(next(Path(tmp).glob("*.layers.json")).read_text())
        print("stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in
                                         report["seconds"].items()))
        print(f"prompts: {report['calib_prompts']} scored + {report['heldout_prompts']} "
              f"held out of {report['prompts_offered']} offered "
              f"({report['calib_tokens']} scored tokens); the export's log: {log}")


if __name__ == "__main__":
    main()
