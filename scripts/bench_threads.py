#!/usr/bin/env python3
"""Plain decoding against llama.cpp's own loop at each thread count and OpenMP wait policy.

bridge's plain step does Python work between two llama_decode calls (the controller,
bookkeeping); llama.cpp's own loops do almost none, with its default CPU sampler or with
the argmax inside its graph (backend sampling, which bridge uses for greedy steps too).
With more than one thread, llama.cpp's OpenMP workers spin for a while after each decode
and then sleep, so the Python gap decides whether the next decode finds them awake. This
runs the three loops in fresh processes for each setting, interleaved prompt by prompt, and
prints tokens/s and bridge's ratio to the faster llama.cpp loop.

    .venv/bin/python scripts/bench_threads.py [MODEL.gguf] [-n 64] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POLICIES = {"default": {}, "OMP_WAIT_POLICY=active": {"OMP_WAIT_POLICY": "active"},
            "OMP_WAIT_POLICY=passive": {"OMP_WAIT_POLICY": "passive"}}

CHILD = r"""
import json, sys, time
from runtime.bench_prompts import PROMPT_SETS
from runtime.chat import ChatSession
from runtime.config import GenerationConfig, RuntimeConfig, SamplingConfig, SpeculativeConfig
from runtime.engine import Engine
path, threads, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rt = RuntimeConfig(n_ctx=2048, n_threads=threads)
with Engine(path, draft=None, runtime=rt, sampling=SamplingConfig(temp=0.0),
            speculative=SpeculativeConfig(drafter="none")) as eng:
    chat = ChatSession(eng)
    prompts = [chat.render([{"role": "user", "content": p}]) for _, p in PROMPT_SETS["open"]]
    names = ["bridge", "llama.cpp", "llama.cpp backend"]
    out = {k: [0, 0.0] for k in names}
    for i, ids in enumerate(prompts * 2):
        for which in names[i % 3:] + names[:i % 3]:  # rotate the order: shared noise
            eng.reset()
            if which == "bridge":
                _, toks, st = eng.complete(ids, GenerationConfig(max_tokens=n))
                out[which][0] += st.n_tokens - 1
                out[which][1] += st.decode_seconds
            else:
                first = eng.ctx.eval_argmax(ids)[-1]
                toks, secs = eng.ctx.greedy_native(first, n - 1, eng.model.is_eog,
                                                   backend=which.endswith("backend"))
                out[which][0] += len(toks)
                out[which][1] += secs
    print(json.dumps({k: v[0] / v[1] for k, v in out.items()}))
"""


def main() -> None:
    from exporters import testmodels
    from runtime.bench import cpu_summary

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("-n", "--max-tokens", type=int, default=64)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    model = args.model or testmodels.fetch_gguf(testmodels.SMOLLM2)
    print(f"# {model.name}, greedy, {args.max_tokens} tokens x 18 prompts; {cpu_summary()}\n")
    print("| threads | OpenMP wait policy | llama.cpp loop tok/s | llama.cpp loop, backend "
          "argmax | bridge plain tok/s | vs the faster |")
    print("| --- | --- | --- | --- | --- | --- |")
    for threads in (int(t) for t in args.threads.split(",")):
        for name, env in POLICIES.items():
            r = subprocess.run([sys.executable, "-c", CHILD, str(model), str(threads),
                                str(args.max_tokens)], capture_output=True, text=True,
                               cwd=ROOT, env={**os.environ, **env}, check=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            best = max(res["llama.cpp"], res["llama.cpp backend"])
            print(f"| {threads} | {name} | {res['llama.cpp']:.1f} | "
                  f"{res['llama.cpp backend']:.1f} | {res['bridge']:.1f} | "
                  f"{res['bridge'] / best:.3f} |", flush=True)


if __name__ == "__main__":
    main()
