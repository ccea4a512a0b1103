#!/usr/bin/env python3
"""Wall time and peak RSS of ``bridge export`` on the bundled SmolLM2.

(a) the HF fixture (float32 safetensors) -> Q8_0 full GGUF + draft: convert, quantize, cut
    (layers given with --drop-layers: the conversion alone, no scoring);
(b) the bundled Q4_1 GGUF -> full (a copy) + draft, likewise;
(c) as (a), with the layers chosen by scoring (--method, default bi): the model is then
    also loaded in PyTorch (float32 on a CPU), which dominates the peak.

Peak RSS is compared with the model's F16 size: the target is under about 2x.

Each export runs as its own ``bridge export`` process, so every peak RSS is that run's
alone (read with os.wait4). Run from the checkout: ``.venv/bin/python scripts/bench_export.py``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a script, not library code: find the checkout's packages

from bridge import testmodels  # noqa: E402


def run(label: str, args: list[str], out_dir: Path, f16_mib: float) -> None:
    cmd = [sys.executable, "-m", "bridge.cli", "export", *args, "-o", str(out_dir), "--force"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{label}: export failed:\n{err}")
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.0f} MiB"
                      for p in sorted(out_dir.glob("*.gguf")))
    # ru_maxrss is in KiB on Linux
    rss = usage.ru_maxrss / 1024
    print(f"{label:36s} wall {wall:6.1f} s   peak RSS {rss:6.0f} MiB = {rss / f16_mib:.2f}x F16"
          f"   ({sizes})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drop-layers", default="13,14,17", help="layers for (a), (b)")
    parser.add_argument("--prune", default="0.1", help="--prune for (c)")
    parser.add_argument("--method", default="bi", help="--method for (c)")
    args = parser.parse_args()
    gguf_path = testmodels.fetch_gguf(testmodels.SMOLLM2)
    hf = testmodels.build_hf_fixture(gguf_path, gguf_path.parent / testmodels.HF_FIXTURE_DIRNAME)
    f16_mib = (hf / "model.safetensors").stat().st_size / 2**20 / 2
    print(f"SmolLM2-135M: F16 size {f16_mib:.0f} MiB (HF fixture: float32); "
          f"{os.cpu_count()} CPU cores")
    drop = ["--drop-layers", args.drop_layers]
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        run("(a) HF fixture -> Q8_0 + draft", [str(hf), "--quant", "Q8_0", *drop],
            Path(tmp, "a"), f16_mib)
        run("(b) Q4_1 GGUF -> copy + draft", [str(gguf_path), *drop], Path(tmp, "b"), f16_mib)
        run(f"(c) as (a), scored by {args.method}", [str(hf), "--quant", "Q8_0", "--prune",
                                                      args.prune, "--method", args.method],
            Path(tmp, "c"), f16_mib)


if __name__ == "__main__":
    main()
