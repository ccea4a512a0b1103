#!/usr/bin/env python3
"""Wall time and peak RSS of ``bridge export`` on the bundled SmolLM2.

(a) the HF fixture (float32 safetensors) -> Q8_0 full GGUF + draft: convert, quantize, cut;
(b) the bundled Q4_1 GGUF -> full (a copy) + draft.

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


def run(label: str, args: list[str], out_dir: Path) -> None:
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
    print(f"{label:34s} wall {wall:6.1f} s   peak RSS {usage.ru_maxrss / 1024:6.0f} MiB   "
          f"({sizes})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prune", default="0.1", help="--prune for both runs")
    args = parser.parse_args()
    gguf_path = testmodels.fetch_gguf(testmodels.SMOLLM2)
    hf = testmodels.build_hf_fixture(gguf_path, gguf_path.parent / testmodels.HF_FIXTURE_DIRNAME)
    f32_mib = (hf / "model.safetensors").stat().st_size / 2**20
    print(f"SmolLM2-135M: HF fixture {f32_mib:.0f} MiB float32 (F16 would be "
          f"{f32_mib / 2:.0f} MiB); {os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        a, b = Path(tmp, "hf"), Path(tmp, "gguf")
        run("(a) HF fixture -> Q8_0 + draft", [str(hf), "--quant", "Q8_0",
                                               "--prune", args.prune], a)
        run("(b) Q4_1 GGUF -> copy + draft", [str(gguf_path), "--prune", args.prune], b)


if __name__ == "__main__":
    main()
