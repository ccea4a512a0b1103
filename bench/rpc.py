"""bridge over llama.cpp's RPC backend on this machine: the verify curve and the workloads,
against local decoding, with round-trip latency added by a relay (not a test).

    python -m bench.rpc [--model GGUF] [--rtts 0,0.5,2,5] [--workload-rtts 0,2]
        [-n 64] [--threads 1] [--reps 5] [--out DIR]

Starts two ``ggml-rpc-server`` workers on 127.0.0.1 (built from the pinned llama-cpp-python's
own llama.cpp, ``exporters.llamacpp_tools``), each behind ``bench.rpc_proxy``, which
holds every chunk for half the round trip in each direction and counts round trips (this
kernel has no sch_netem, so ``tc ... netem`` cannot delay the loopback device). The target's
layers are split over the two workers; the client keeps the embeddings.

1. Verify curve: V(k), the time of one ``llama_decode`` of k tokens after a 64-token
   context, k = 1..16, median of ``--reps``, locally and over RPC at each round trip, with
   the round trips each decode waited for.
2. Workloads, at each of ``--workload-rtts``: plain decoding, forced lookup (``--drafter
   lookup --fixed-gamma --draft-max 16``) and ``auto``, one engine each on the same workers,
   interleaved request by request: the copy-heavy prompts of ``bridge bench`` and the
   session workload of ``python -m bench.serve --sessions`` (4 sessions x 6 similar
   requests, with the drafting memory). Speed ratios are against plain in the same run.
Writes bench/results/<date>-rpc-<cpu>.md.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    ROOT,
    arg_parser,
    cpu_facts,
    free_port,
    results_path,
    start_server,
    stop_server,
)
from bench.workloads import SESSIONS
from exporters.llamacpp_tools import RPC_SERVER, build_tool
from runtime import config as cfg
from runtime.bench_prompts import PROMPT_SETS
from runtime.chat import ChatSession
from runtime.context import LlamaContext, LlamaModel
from runtime.drafters.memory import DraftMemory
from runtime.engine import Engine
from runtime.rpc import RpcDevices, parse_endpoints, probe

log = logging.getLogger("bench.rpc")
K_MAX = 16


class Link:
    """One relay per worker at one round-trip time, and its round-trip counters."""

    def __init__(self, workers: list[int], rtt_ms: float, tmp: Path):
        self.rtt_ms = rtt_ms
        self.procs, self.files, ports = [], [], []
        for w in workers:
            port, count = free_port(), tmp / f"count-{w}-{rtt_ms}"
            argv = [sys.executable, "-m", "bench.rpc_proxy", "--listen", str(port), "--to",
                    str(w), "--rtt-ms", str(rtt_ms), "--count", str(count)]
            self.procs.append(start_server(argv, port, "rpc_proxy", health_path=None,
                                           timeout=10))
            self.files.append(count)
            ports.append(port)
        self.endpoints = parse_endpoints(",".join(f"127.0.0.1:{p}" for p in ports))
        for ep in self.endpoints:
            probe(ep)

    def round_trips(self) -> int:
        time.sleep(0.05)  # the relay writes the count after forwarding
        return sum(int(f.read_text() or 0) for f in self.files if f.is_file())

    def close(self) -> None:
        for p in self.procs:
            stop_server(p, 5, signal.SIGTERM)


def verify_curve(model_path: Path, threads: int, reps: int, link: Link | None) -> dict:
    """{k: (median ms, round trips per decode, round trips of the first decode of width k)}
    for k = 1..K_MAX. The first decode of a new width is timed apart: llama.cpp re-plans
    the graph when the batch shape changes, which over RPC costs extra round trips."""
    devices = RpcDevices(link.endpoints) if link else None
    trips = (lambda: link.round_trips()) if link else (lambda: 0)
    with LlamaModel(model_path, devices=devices) as model, \
            LlamaContext(model, 512, n_threads=threads) as ctx:
        ids = model.tokenize("The history of the printing press begins in Mainz. " * 16,
                             True)[:64]
        assert len(ids) == 64
        ctx.eval(ids)
        ctx.truncate(64)
        out = {}
        for k in range(1, K_MAX + 1):
            before = trips()
            ctx.eval(ids[1:k + 1], all_logits=True)  # a new width: re-planned
            first = trips() - before
            ctx.truncate(64)
            times, counts = [], []
            for _ in range(reps):
                before = trips()
                t0 = time.perf_counter()
                ctx.eval(ids[1:k + 1], all_logits=True)
                times.append((time.perf_counter() - t0) * 1e3)
                counts.append(trips() - before)
                ctx.truncate(64)
            out[k] = (statistics.median(times), statistics.median(counts), first)
        return out


MODES = {
    "plain": cfg.SpeculativeConfig(drafter="none"),
    "forced lookup γ≤16": cfg.SpeculativeConfig(drafter="lookup", adaptive=False, draft_max=16),
    "auto": cfg.SpeculativeConfig(drafter="auto", draft_max=16),
}


def run_workloads(model_path: Path, threads: int, n: int, link: Link | None) -> dict:
    """Per workload and mode: tokens, decode seconds, target steps, round trips, texts."""
    rt = cfg.RuntimeConfig(n_ctx=4096, n_threads=threads, rpc=link.endpoints if link else ())
    engines = {name: Engine(model_path, draft=None, runtime=rt, speculative=spec,
                            sampling=cfg.SamplingConfig(temp=0.0),
                            memory=DraftMemory() if name != "plain" else None)
               for name, spec in MODES.items()}
    try:
        session = ChatSession(engines["plain"])
        workloads = {"copy-heavy": [[p for _, p in PROMPT_SETS["copy"]]],
                     "sessions": list(SESSIONS.values())}
        res: dict = {}
        for wname, groups in workloads.items():
            r = res[wname] = {m: {"n": 0, "n1": 0, "s": 0.0, "steps": 0, "trips": 0, "texts": []}
                              for m in MODES}
            for gi, prompts in enumerate(groups):
                for pi, prompt in enumerate(prompts):
                    ids = session.render([{"role": "user", "content": prompt}])
                    order = list(MODES)[(gi + pi) % 3:] + list(MODES)[:(gi + pi) % 3]
                    for m in order:  # rotate: every mode shares the machine's noise
                        eng = engines[m]
                        eng.reset()
                        before = link.round_trips() if link else 0
                        text, _, st = eng.complete(ids, cfg.GenerationConfig(max_tokens=n),
                                                   scope=f"{wname}{gi}")
                        x = r[m]
                        x["n"] += st.n_tokens
                        x["n1"] += st.n_tokens - 1  # the first token comes from the prompt
                        x["s"] += st.decode_seconds
                        x["steps"] += st.n_steps
                        x["trips"] += (link.round_trips() - before) if link else 0
                        x["texts"].append(text)
                log.info("%s: group %d/%d done", wname, gi + 1, len(groups))
        return res
    finally:
        for eng in engines.values():
            eng.close()


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("--model", type=Path, default=ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--rtts", default="0,0.5,2,5", help="round trips (ms) for the curve")
    ap.add_argument("--workload-rtts", default="0,2", help="round trips (ms) for workloads")
    ap.add_argument("-n", type=int, default=64, help="tokens per answer")
    ap.add_argument("--threads", type=int, default=1, help="threads of client and workers")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%X")
    rtts = [float(x) for x in args.rtts.split(",") if x]
    wrtts = [float(x) for x in args.workload_rtts.split(",") if x]
    binary, _ = build_tool(RPC_SERVER)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rpc-"))
    workers, wprocs = [free_port(), free_port()], []
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    try:
        for w in workers:  # ggml-rpc-server speaks no HTTP: up once it accepts a connection
            wprocs.append(start_server([str(binary), "-H", "127.0.0.1", "-p", str(w), "-t",
                                        str(args.threads)], w, "ggml-rpc-server",
                                       health_path=None, timeout=10))
        curves = {"local": verify_curve(args.model, args.threads, args.reps, None)}
        work = {"local": run_workloads(args.model, args.threads, args.n, None)}
        for rtt in sorted(set(rtts) | set(wrtts)):
            link = Link(workers, rtt, tmp)
            try:
                if rtt in rtts:
                    curves[f"RPC {rtt:g} ms"] = verify_curve(args.model, args.threads,
                                                             args.reps, link)
                    log.info("curve at %g ms done", rtt)
                if rtt in wrtts:
                    work[f"RPC {rtt:g} ms"] = run_workloads(args.model, args.threads, args.n,
                                                            link)
            finally:
                link.close()
    finally:
        for p in wprocs:
            stop_server(p, 5, signal.SIGTERM)
    wall, load1 = time.perf_counter() - t_start, os.getloadavg()[0]
    text = rpc_report(args, curves, work, wall, load0, load1)
    print(text)
    path = results_path(args.out, "rpc")
    path.write_text(text)
    log.info("wrote %s", path)


def rpc_report(args, curves: dict, work: dict, wall: float, load0: float, load1: float
               ) -> str:
    cpu, simd = cpu_facts()
    ks = [1, 2, 3, 4, 6, 8, 12, 16]
    md = [f"# bridge over llama.cpp RPC, {datetime.date.today().isoformat()}", "",
          f"- CPU: {cpu}; {os.cpu_count()} cores; SIMD flags: {' '.join(simd) or 'none'}",
          f"- model: {args.model.name}, greedy, {args.n} tokens per answer; client and each "
          f"of the two `ggml-rpc-server` workers on 127.0.0.1 with {args.threads} thread(s); "
          "the target's layers split over the two workers, embeddings on the client",
          "- latency: `bench.rpc_proxy` in front of each worker holds every chunk for "
          "half the round trip each way (no sch_netem in this kernel, so no `tc netem`); "
          "\"round trips\" are the waits it counted: the worker answering after the client "
          "spoke, summed over both workers",
          f"- run: {wall:.0f} s, load average {load0:.1f} at the start, {load1:.1f} at the end "
          "(the machine is shared; compare rows of one run)", "",
          "## Verify curve: one decode of k tokens after a 64-token context", "",
          "Median ms of repeated decodes of the same width (round trips each; round trips "
          "of the first decode after the width changed, when llama.cpp re-plans the graph):",
          "",
          "| where | " + " | ".join(f"k={k}" for k in ks) + " | V(8)/V(1) | V(16)/V(1) |",
          "| --- |" + " ---: |" * (len(ks) + 2)]
    for name, c in curves.items():
        cells = [f"{c[k][0]:.1f}" + (f" ({c[k][1]:.0f}; {c[k][2]:.0f})" if name != "local"
                                     else "") for k in ks]
        md.append(f"| {name} | " + " | ".join(cells) +
                  f" | {c[8][0] / c[1][0]:.2f} | {c[16][0] / c[1][0]:.2f} |")
    md += ["", "Full curve (ms), k = 1..16:", ""]
    for name, c in curves.items():
        md.append(f"- {name}: " + ", ".join(f"{c[k][0]:.1f}" for k in range(1, K_MAX + 1)))
    for wname in next(iter(work.values())):
        md += ["", f"## {wname}", "",
               "| where | mode | tok/s | vs plain (same run) | tokens per target step "
               "| round trips per token | same text as plain |",
               "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for where, res in work.items():
            r = res[wname]
            base = r["plain"]["n"] / r["plain"]["s"]
            for m, x in r.items():
                tps = x["n"] / x["s"] if x["s"] else 0.0
                same = sum(a == b for a, b in zip(x["texts"], r["plain"]["texts"],
                                                  strict=True))
                trips = f"{x['trips'] / x['n']:.2f}" if where != "local" else "-"
                md.append(f"| {where} | {m} | {tps:.1f} | {tps / base:.2f}x | "
                          f"{x['n1'] / max(1, x['steps']):.2f} | {trips} | "
                          f"{same}/{len(x['texts'])} |")
    md += ["", "## Command", "", "```", f"python -m bench.rpc {' '.join(sys.argv[1:])}",
           "```", ""]
    return "\n".join(md)


if __name__ == "__main__":
    main()
