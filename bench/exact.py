"""What ``--exact`` costs, and whether it delivers: plain and adaptive decoding, each in the
default and in exact mode, interleaved on the same prompts in one process.

For each bundled model (or the GGUFs given) it prints tokens/s and tokens per target step
of the four runs (ratios against default plain decoding of the same run), how many greedy
answers of each drafting run equal plain decoding's in the same mode, the memory each
engine took (RSS growth when it was built), and this machine's measured bound.

    python -m bench.exact [MODEL.gguf ...] [-n 64] [--threads 2]
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.common import arg_parser, rss_mib
from exporters import testmodels
from runtime.bench import cpu_summary, measure_numerics
from runtime.bench_prompts import PROMPT_SETS
from runtime.chat import ChatSession
from runtime.config import (
    GenerationConfig,
    RuntimeConfig,
    SamplingConfig,
    SpeculativeConfig,
)
from runtime.engine import Engine

RUNS = {"plain": (False, "none"), "auto": (False, "auto"),
        "plain --exact": (True, "none"), "auto --exact": (True, "auto")}


def bench_model(path: Path, n_tokens: int, threads: int | None) -> None:
    engines, mem = {}, {}
    for name, (exact, drafter) in RUNS.items():
        before = rss_mib(os.getpid()) or 0.0
        engines[name] = Engine(path, draft=None, sampling=SamplingConfig(temp=0.0),
                               runtime=RuntimeConfig(n_ctx=2048, n_threads=threads,
                                                     exact=exact),
                               speculative=SpeculativeConfig(drafter=drafter))
        mem[name] = (rss_mib(os.getpid()) or 0.0) - before
    first = engines["plain"]
    chat = first.model.chat_template() is not None
    prompts = [p for name in ("open", "copy") for _, p in PROMPT_SETS[name]]
    ids = [ChatSession(first).render([{"role": "user", "content": p}]) if chat
           else first.model.tokenize(p, True, True) for p in prompts]
    secs = dict.fromkeys(RUNS, 0.0)
    toks = dict.fromkeys(RUNS, 0)
    steps = dict.fromkeys(RUNS, 0)
    outs: dict[str, list[list[int]]] = {n: [] for n in RUNS}
    gen = GenerationConfig(max_tokens=n_tokens)
    names = list(RUNS)
    for i, prompt in enumerate(ids):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]  # rotate: the runs share the machine's noise
            eng = engines[name]
            eng.reset()
            _, out, st = eng.complete(prompt, gen)
            secs[name] += st.decode_seconds
            toks[name] += st.n_tokens
            steps[name] += st.n_steps
            outs[name].append(out)
    base = toks["plain"] / secs["plain"]
    print(f"## {path.name}: {len(ids)} prompts x {n_tokens} tokens, greedy")
    print(f"- {engines['auto --exact'].max_rows} rows: the widest verify batch equal to "
          f"one-token steps in exact mode")
    print(f"- default: {measure_numerics(engines['auto'])['describe']}")
    print(f"- exact: {measure_numerics(engines['auto --exact'])['describe']}")
    print("\n| run | tok/s | vs plain | tokens per target step | same as plain (same mode) "
          "| RSS at load |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in RUNS:
        ref = outs["plain --exact" if "exact" in name else "plain"]
        same = sum(a == b for a, b in zip(outs[name], ref, strict=True))
        rate = toks[name] / secs[name]
        per_step = (toks[name] - len(ids)) / steps[name] if steps[name] else 1.0
        print(f"| {name} | {rate:.1f} | {rate / base:.3f}x | {per_step:.2f} | "
              f"{same}/{len(ids)} | {mem[name]:.0f} MiB |")
    print()
    for eng in engines.values():
        eng.close()


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("-n", "--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    models = args.models or [testmodels.fetch_gguf(testmodels.SMOLLM2),
                             testmodels.fetch_gguf(testmodels.GEMMA3)]
    print(f"# --exact on {cpu_summary()}\n")
    for path in models:
        bench_model(path, args.max_tokens, args.threads)


if __name__ == "__main__":
    main()
