"""bridge's own time per step, and its speed against llama.cpp's own loops, per thread count.

bridge's step does Python work between two llama_decode calls (the controller, the draft
sources, bookkeeping); llama.cpp's own loops do almost none, with its default CPU sampler
or with the argmax inside its graph (backend sampling, which bridge uses for greedy steps
too). With more than one thread, llama.cpp's OpenMP workers spin for a while after each
decode and then sleep, so the Python gap decides whether the next decode finds them awake.

For each thread count and OpenMP wait policy, a fresh process runs, interleaved prompt by
prompt over the open-ended prompts: llama.cpp's two loops, bridge plain (no draft source)
and bridge ``auto`` with the lookup, a drafting memory and the pruned draft on offer (the
memory first holds the answers to the copy-heavy prompts, as a server's would hold other
requests, and then each answer, so it never holds the answer asked for). bridge's own
time per step is measured from outside the decode loop: the wall time between two steps
less the time spent in llama_decode. Prints tok/s, each bridge mode's ratio to the faster
llama.cpp loop, and the median and mean µs per step.

    python -m bench.overhead [MODEL.gguf] --draft DRAFT.gguf [-n 128]
        [--threads 1,2] [--policies default,passive]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import arg_parser, checkout_env

POLICIES = {"default": {}, "active": {"OMP_WAIT_POLICY": "active"},
            "passive": {"OMP_WAIT_POLICY": "passive"}}
# a fresh process per setting: OpenMP reads OMP_WAIT_POLICY once, when llama.cpp loads
CHILD = "import sys; from bench.overhead import measure; measure(*sys.argv[1:])"


def measure(path: str, draft: str, threads: str, n: str) -> None:
    """The child's run: every loop interleaved over the open prompts; prints one JSON line
    of tok/s and bridge's µs per step (median, mean) per loop."""
    from runtime.bench_prompts import PROMPT_SETS
    from runtime.chat import ChatSession
    from runtime.config import GenerationConfig, RuntimeConfig, SamplingConfig, SpeculativeConfig
    from runtime.drafters.memory import DraftMemory
    from runtime.engine import Engine

    rt = RuntimeConfig(n_ctx=2048, n_threads=int(threads))
    greedy, gen = SamplingConfig(temp=0.0), GenerationConfig(max_tokens=int(n))
    plain = Engine(path, draft=None, runtime=rt, sampling=greedy,
                   speculative=SpeculativeConfig(drafter="none"))
    auto = Engine(path, draft=draft, runtime=rt, sampling=greedy,
                  speculative=SpeculativeConfig(drafter="auto"), memory=DraftMemory())
    chat = ChatSession(plain)

    def render(s: str) -> list[list[int]]:
        return [chat.render([{"role": "user", "content": p}]) for _, p in PROMPT_SETS[s]]

    for ids in render("copy"):  # the memory's other requests; calibrates auto's costs too
        auto.reset()
        auto.complete(ids, gen)

    def run_bridge(eng, ids):
        ctxs = [eng.ctx] + [c for d in eng.drafters.values() if (c := getattr(d, "ctx", None))]
        eng.reset()
        last, us = None, []
        for chunk in eng.generate(ids, gen):
            # bridge's own time: the wall time between two steps less llama_decode's
            now, llama = time.perf_counter(), sum(c.eval_seconds for c in ctxs)
            if last is not None and chunk.tokens:
                us.append(1e6 * ((now - last[0]) - (llama - last[1])))
            last = now, llama
        st = eng.last_stats
        return st.n_tokens - 1, st.decode_seconds, us

    def run_lean(eng, ids, backend):
        eng.reset()
        first = eng.ctx.eval_argmax(ids)[-1]
        toks, secs = eng.ctx.greedy_native(first, int(n) - 1, eng.model.is_eog,
                                           backend=backend)
        return len(toks), secs, []

    runs = {"llama.cpp": lambda ids: run_lean(plain, ids, False),
            "llama.cpp backend": lambda ids: run_lean(plain, ids, True),
            "plain": lambda ids: run_bridge(plain, ids),
            "auto": lambda ids: run_bridge(auto, ids)}
    names = list(runs)
    out = {k: [0, 0.0, []] for k in names}
    for i, ids in enumerate(render("open")):
        for which in names[i % 4:] + names[:i % 4]:  # rotate the order: shared noise
            toks, secs, us = runs[which](ids)
            out[which][0] += toks
            out[which][1] += secs
            out[which][2] += us
    print(json.dumps({k: {"tok_s": v[0] / v[1],
                          "us_median": statistics.median(v[2]) if v[2] else 0.0,
                          "us_mean": statistics.mean(v[2]) if v[2] else 0.0}
                      for k, v in out.items()}))


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--draft", type=Path, required=True,
                    help="the model's pruned draft (bridge export MODEL --prune ...)")
    ap.add_argument("-n", "--max-tokens", type=int, default=128)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--policies", default="default",
                    help=f"OpenMP wait policies to run, of {', '.join(POLICIES)}")
    args = ap.parse_args(argv)
    from exporters import testmodels
    from runtime.bench import cpu_summary

    model = args.model or testmodels.fetch_gguf(testmodels.SMOLLM2)
    policies = args.policies.split(",")
    if bad := [p for p in policies if p not in POLICIES]:
        raise SystemExit(f"error: unknown --policies {bad}; choose from {', '.join(POLICIES)}")
    print(f"# {model.name}, greedy, {args.max_tokens} tokens x 9 open prompts; "
          f"{cpu_summary()}\n")
    print("| threads | OMP_WAIT_POLICY | llama.cpp loop | llama.cpp, backend argmax | "
          "bridge plain | bridge auto | plain vs faster llama.cpp | auto vs it | "
          "plain µs/step median (mean) | auto µs/step median (mean) |")
    print("| --- " * 10 + "|")
    for threads in (int(t) for t in args.threads.split(",")):
        for name in policies:
            r = subprocess.run([sys.executable, "-c", CHILD, str(model), str(args.draft),
                                str(threads), str(args.max_tokens)], capture_output=True,
                               text=True, env=checkout_env({**os.environ, **POLICIES[name]}))
            if r.returncode:
                raise SystemExit(f"error: the {threads}-thread run failed:\n{r.stderr[-2000:]}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            best = max(res["llama.cpp"]["tok_s"], res["llama.cpp backend"]["tok_s"])
            p, a = res["plain"], res["auto"]
            print(f"| {threads} | {name} | {res['llama.cpp']['tok_s']:.1f} | "
                  f"{res['llama.cpp backend']['tok_s']:.1f} | {p['tok_s']:.1f} | "
                  f"{a['tok_s']:.1f} | {p['tok_s'] / best:.3f} | {a['tok_s'] / best:.3f} | "
                  f"{p['us_median']:.0f} ({p['us_mean']:.0f}) | "
                  f"{a['us_median']:.0f} ({a['us_mean']:.0f}) |", flush=True)


if __name__ == "__main__":
    main()
