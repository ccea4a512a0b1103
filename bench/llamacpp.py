"""bridge side by side with llama.cpp's own llama-server speculation (optional; not a test).

    python -m bench.llamacpp [--model GGUF] [--draft DRAFT.gguf] [-n 128]
        [--threads 2] [--sets copy,open] [--skip-build] [--llama-server PATH]

Builds ``llama-server`` for the CPU from the llama.cpp that the pinned llama-cpp-python sdist
vendors (scripts/constraints.txt), cached in ~/.cache/bridge/llama.cpp-<version>/ so later
runs reuse it; reads which speculative types that server knows from its --help; then decodes
the same prompts, greedy and with the same token budget, with llama-server plain, each of its
n-gram speculation types, llama-server with a bridge draft as ``-md``, and bridge's own
plain / auto / lookup modes through the Python API. All servers stay up at once and the order
of modes rotates from prompt to prompt, so every mode shares the machine's noise. Prompts
are rendered by bridge with the model's chat template and sent to the server as token ids
(native /completion, ``cache_prompt: false``), so both sides decode the very same tokens.
Writes bench/results/<date>-llamacpp-<cpu>.md.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    BRIDGE,
    ROOT,
    ServerError,
    arg_parser,
    cpu_facts,
    free_port,
    llama_server,
    llama_server_facts,
    results_path,
    start_server,
    stop_server,
)
from exporters.llamacpp_tools import CACHE, pinned_version
from runtime import config as cfg
from runtime.bench_prompts import PROMPT_SETS
from runtime.chat import ChatSession
from runtime.engine import Engine

log = logging.getLogger("bench.llamacpp")
SEED = 42
N_CTX = 4096
DROP_LAYERS = "13,14,17"


# -- runners ----------------------------------------------------------------------------

@dataclass
class Result:
    n: int
    seconds: float
    drafted: int
    accepted: int
    text: str


@dataclass
class Mode:
    name: str
    engine: str                       # "llama-server" or "bridge"
    results: dict[str, list[Result]] = field(default_factory=dict)

    def run(self, ids: list[int], n: int) -> Result:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ServerMode(Mode):
    """One llama-server process on a free loopback port."""

    def __init__(self, name: str, binary: Path, model: Path, threads: int, extra: list[str],
                 logdir: Path):
        super().__init__(name, "llama-server")
        self.port = free_port()
        t = str(threads)
        self.cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1",
                    "--port", str(self.port), "-t", t, "-tb", t, "-c", str(N_CTX), "-np", "1",
                    "--seed", str(SEED), *extra]
        self.log_path = logdir / ("llama-server-" + re.sub(r"[^\w-]", "_", name) + ".log")
        self.proc = start_server(self.cmd, self.port, name, timeout=180,
                                 log_path=self.log_path)

    def run(self, ids: list[int], n: int) -> Result:
        body = {"prompt": ids, "n_predict": n, "temperature": 0.0, "top_k": 1, "seed": SEED,
                "cache_prompt": False, "stream": False}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion",
                                     json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.load(r)
        t = out["timings"]
        return Result(t["predicted_n"], t["predicted_ms"] / 1e3, t.get("draft_n", 0),
                      t.get("draft_n_accepted", 0), out["content"])

    def close(self) -> None:
        stop_server(self.proc, 10)


class BridgeMode(Mode):
    """A bridge Engine in this process; ``drafter`` is SpeculativeConfig's."""

    def __init__(self, name: str, model: Path, draft: Path | None, drafter: str, threads: int):
        super().__init__(name, "bridge")
        self.eng = Engine(model, draft=draft, runtime=cfg.RuntimeConfig(n_ctx=N_CTX,
                                                                    n_threads=threads),
                          speculative=cfg.SpeculativeConfig(drafter=drafter),
                          sampling=cfg.SamplingConfig(temp=0.0, top_k=1, seed=SEED))

    def run(self, ids: list[int], n: int) -> Result:
        self.eng.reset()
        text, _, st = self.eng.complete(ids, cfg.GenerationConfig(max_tokens=n))
        self.eng.reset()
        return Result(st.n_tokens, st.decode_seconds, st.n_drafted, st.n_accepted, text)

    def close(self) -> None:
        self.eng.close()


# -- the run ----------------------------------------------------------------------------

def make_draft(model: Path) -> Path:
    """A bridge draft of ``model`` (layers 13, 14, 17 dropped), exported once and cached."""
    outdir = CACHE / "drafts" / model.stem
    found = sorted(outdir.glob("*.draft.gguf"))
    if found:
        return found[0]
    outdir.mkdir(parents=True, exist_ok=True)
    cmd = [*BRIDGE, "export", str(model), "--drop-layers", DROP_LAYERS, "-o", str(outdir)]
    log.info("exporting a draft: %s", shlex.join(cmd))
    subprocess.run(cmd, check=True)
    return sorted(outdir.glob("*.draft.gguf"))[0]


def run_all(modes: list[Mode], sets: dict[str, list[list[int]]], n: int) -> None:
    warm = next(iter(sets.values()))[0]
    for m in modes:  # the first request of a process pays page faults and allocations
        m.run(warm, 8)
    for set_name, prompts in sets.items():
        for i, ids in enumerate(prompts):
            for j in range(len(modes)):
                m = modes[(i + j) % len(modes)]  # rotate the order: shared noise
                m.results.setdefault(set_name, []).append(m.run(ids, n))
            log.info("%s: prompt %d/%d done", set_name, i + 1, len(prompts))


def rate(rs: list[Result]) -> float:
    secs = sum(r.seconds for r in rs)
    return sum(r.n for r in rs) / secs if secs else 0.0


def speed_table(modes: list[Mode], set_name: str) -> list[str]:
    by = {m.name: m for m in modes}
    ref_s, ref_b = by.get("llama-server plain"), by.get("bridge plain")
    rows = ["| mode | tok/s | vs llama-server plain | vs bridge plain | drafted | accepted "
            "| same text as own plain | same text as llama-server plain |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in modes:
        rs = m.results[set_name]
        tps = rate(rs)
        own = ref_s if m.engine == "llama-server" else ref_b
        vs = [f"{tps / rate(r.results[set_name]):.2f}x" if r else "-" for r in (ref_s, ref_b)]
        same = [f"{sum(a.text == b.text for a, b in zip(rs, r.results[set_name], strict=True))}"
                f"/{len(rs)}" if r else "-" for r in (own, ref_s)]
        d, a = sum(r.drafted for r in rs), sum(r.accepted for r in rs)
        acc = f"{a} ({100 * a / d:.0f}%)" if d else "0"
        rows.append(f"| {m.name} | {tps:.1f} | {vs[0]} | {vs[1]} | {d} | {acc} "
                    f"| {same[0]} | {same[1]} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("--model", type=Path, default=ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--draft", type=Path, help="bridge draft of --model [default: export one "
                    f"with --drop-layers {DROP_LAYERS} into {CACHE / 'drafts'}]")
    ap.add_argument("-n", type=int, default=128, help="tokens per prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sets", default="copy,open", help="prompt sets: " + ",".join(PROMPT_SETS))
    ap.add_argument("--prompts", type=int, default=0, help="first N prompts per set (0: all)")
    ap.add_argument("--skip-build", action="store_true", help="never build; use the cache")
    ap.add_argument("--llama-server", "--server", type=Path,
                    help="a llama-server binary to use instead")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%X")
    set_names = [s for s in args.sets.split(",") if s]
    bad = [s for s in set_names if s not in PROMPT_SETS]
    if bad or not set_names:
        raise SystemExit(f"error: unknown prompt set {bad}; choose from {', '.join(PROMPT_SETS)}")

    version = pinned_version()
    binary, build = llama_server(args.llama_server, args.skip_build)
    facts = llama_server_facts(binary)
    log.info("llama-server %s at %s", facts["version"], binary)
    log.info("speculative types: %s", ", ".join(facts["spec_types"]) or "none (no --spec-type)")
    draft = args.draft or make_draft(args.model)

    logdir = CACHE / "bench-llamacpp-logs"
    logdir.mkdir(parents=True, exist_ok=True)
    ngram = [t for t in facts["spec_types"] if t.startswith("ngram")]
    md = ["-md", str(draft), "-td", str(args.threads)]
    if "draft-simple" in facts["spec_types"]:
        md += ["--spec-type", "draft-simple"]
    server_cfgs = [("llama-server plain", [])] + \
        [(f"llama-server {t}", ["--spec-type", t]) for t in ngram] + \
        [("llama-server -md bridge draft", md)]
    modes: list[Mode] = []
    servers: list[ServerMode] = []
    try:
        for name, extra in server_cfgs:
            try:
                servers.append(ServerMode(name, binary, args.model, args.threads, extra,
                                          logdir))
            except ServerError as e:  # e.g. a speculative type this build cannot run
                tail = [ln for ln in str(e).splitlines() if ln.strip()][-3:]
                log.warning("%s did not start; skipped (%s)", name, " / ".join(tail))
        modes += servers
        modes += [BridgeMode("bridge plain", args.model, None, "none", args.threads),
                  BridgeMode("bridge auto", args.model, draft, "auto", args.threads),
                  BridgeMode("bridge lookup", args.model, None, "lookup", args.threads)]
        bridge = next(m for m in modes if isinstance(m, BridgeMode)).eng
        session = ChatSession(bridge)
        sets = {}
        for name in set_names:
            prompts = [p for _, p in PROMPT_SETS[name]]
            prompts = prompts[:args.prompts] if args.prompts else prompts
            sets[name] = [session.render([{"role": "user", "content": p}]) for p in prompts]
        # bridge last in the list, llama-server plain first; the order rotates per prompt
        modes = [m for m in modes if m.engine == "llama-server"] + \
                [m for m in modes if m.engine == "bridge"]
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        run_all(modes, sets, args.n)
        wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    finally:
        for m in {id(m): m for m in [*servers, *modes]}.values():
            m.close()

    cpu, simd = cpu_facts()
    today = datetime.date.today().isoformat()
    import llama_cpp
    server_lines = [f"    {shlex.join([c if c != str(s.port) else 'PORT' for c in s.cmd])}"
                    for s in modes if isinstance(s, ServerMode)]
    md_out = [
        f"# bridge and llama-server speculation side by side, {today}", "",
        f"- CPU: {cpu}; {os.cpu_count()} cores; SIMD flags: {' '.join(simd) or 'none'}",
        f"- llama-server: {facts['version']} (llama.cpp vendored by llama-cpp-python "
        f"{version}); bridge on llama-cpp-python {llama_cpp.__version__}",
        f"- model: {args.model.name}; bridge draft: {draft.name} (layers {DROP_LAYERS} "
        f"dropped); {args.n} tokens per prompt, greedy (temperature 0, top-k 1, seed {SEED}),"
        f" --threads {args.threads}, context {N_CTX}, one slot",
        f"- llama-server speculative types in this build: {', '.join(facts['spec_types'])}; "
        f"defaults: {', '.join(f'{k} {v}' for k, v in facts['defaults'].items()) or '-'}",
        f"- build: {build.get('build_seconds', '?')} s of `nice -n 10 {build.get('build', '')}`"
        f" after `{build.get('configure', '')}`" if build else f"- server binary: {binary}",
        f"- all modes interleaved in one run ({wall:.0f} s): every server up at once, bridge "
        "in-process, the order of modes rotating from prompt to prompt; tok/s is generated "
        "tokens over decode time (llama-server `timings.predicted_n / predicted_ms`, bridge "
        "`Stats.decode_seconds`), prompt processing excluded",
        f"- 1-minute load average {load0:.1f} at the start, {load1:.1f} at the end (other "
        "jobs on the machine inflate it; compare rows, not runs)", ""]
    for name in set_names:
        md_out += [f"## {name} prompts ({len(sets[name])})", "", *speed_table(modes, name), ""]
    md_out += ["## Commands", "", "```",
               f"python -m bench.llamacpp {shlex.join(sys.argv[1:])}",
               *server_lines, "# each request: POST /completion " + json.dumps(
                   {"prompt": "[chat-template token ids]", "n_predict": args.n,
                    "temperature": 0.0, "top_k": 1, "seed": SEED, "cache_prompt": False}),
               "```", ""]
    text = "\n".join(md_out)
    print(text)
    path = results_path(args.out, "llamacpp")
    path.write_text(text)
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
