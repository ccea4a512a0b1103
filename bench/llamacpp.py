"""bridge side by side with llama.cpp's own llama-server speculation (optional; not a test).

    python scripts/bench_llamacpp.py [--model GGUF] [--draft DRAFT.gguf] [-n 128]
        [--threads 2] [--sets copy,open] [--skip-build] [--server PATH]

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

import argparse
import datetime
import json
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporters.llamacpp_tools import CACHE, LLAMA_SERVER, build_tool, pinned_version  # noqa: E402
from runtime import config as cfg  # noqa: E402
from runtime.bench_prompts import PROMPT_SETS  # noqa: E402
from runtime.chat import ChatSession  # noqa: E402
from runtime.engine import Engine  # noqa: E402

log = logging.getLogger("bench_llamacpp")
SEED = 42
N_CTX = 4096
DROP_LAYERS = "13,14,17"


# -- build ------------------------------------------------------------------------------

def build_server(version: str, skip_build: bool) -> tuple[Path, dict]:
    """The cached llama-server binary, built first if absent; and how it was built."""
    try:
        return build_tool(LLAMA_SERVER, version, skip_build)
    except (FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: {e}; or pass --server PATH") from None


def server_facts(binary: Path) -> dict:
    """Version line and the speculative options of this llama-server, from --version/--help."""
    run = lambda *a: subprocess.run([str(binary), *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=60)
    ver = run("--version")
    lines = (ver.stdout + ver.stderr).splitlines()
    version = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("version:")),
                   lines[0] if lines else "unknown")
    help_text = run("--help").stdout
    spec_opts = sorted(set(re.findall(r"(--(?:spec|draft|lookup)[\w-]*|-md)\b", help_text)))
    m = re.search(r"--spec-type\s+\[?([\w|,-]+)", help_text)
    types = [t for t in re.split(r"[|,]", m.group(1)) if t] if m else []
    defaults: dict[str, str] = {}
    for opt, default in re.findall(r"^(--spec-draft-n-max|--spec-draft-n-min|--spec-draft-p-min)"
                                   r"\b[^\n]*(?:\n {20,}[^\n]*)?\(default: ([^)]*)\)",
                                   help_text, re.M):
        defaults.setdefault(opt, default)
    return {"version": version, "spec_options": spec_opts, "spec_types": types,
            "defaults": defaults}


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
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        t = str(threads)
        self.cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1",
                    "--port", str(self.port), "-t", t, "-tb", t, "-c", str(N_CTX), "-np", "1",
                    "--seed", str(SEED), *extra]
        self.log_path = logdir / ("llama-server-" + re.sub(r"[^\w-]", "_", name) + ".log")
        log.info("starting %s", shlex.join(self.cmd))
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log_path, "w"),
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return True
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        return False

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
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


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
    cmd = [str(Path(sys.executable).parent / "bridge"), "export", str(model),
           "--drop-layers", DROP_LAYERS, "-o", str(outdir)]
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


def table(modes: list[Mode], set_name: str) -> list[str]:
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


def cpu_info() -> tuple[str, list[str]]:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = re.search(r"^Model name:\s*(.+)$", out, re.M)
    flags = re.search(r"^Flags:\s*(.+)$", out, re.M)
    simd = [f for f in (flags.group(1).split() if flags else []) if re.match(r"(avx|amx)", f)]
    return (name.group(1).strip() if name else "unknown CPU"), simd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--draft", type=Path, help="bridge draft of --model [default: export one "
                    f"with --drop-layers {DROP_LAYERS} into {CACHE / 'drafts'}]")
    ap.add_argument("-n", type=int, default=128, help="tokens per prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sets", default="copy,open", help="prompt sets: " + ",".join(PROMPT_SETS))
    ap.add_argument("--prompts", type=int, default=0, help="first N prompts per set (0: all)")
    ap.add_argument("--skip-build", action="store_true", help="never build; use the cache")
    ap.add_argument("--server", type=Path, help="a llama-server binary to use instead")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%X")
    set_names = [s for s in args.sets.split(",") if s]
    bad = [s for s in set_names if s not in PROMPT_SETS]
    if bad or not set_names:
        raise SystemExit(f"error: unknown prompt set {bad}; choose from {', '.join(PROMPT_SETS)}")

    version = pinned_version()
    if args.server:
        binary, build = args.server, {}
    else:
        binary, build = build_server(version, args.skip_build)
    facts = server_facts(binary)
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
        servers += [ServerMode(name, binary, args.model, args.threads, extra, logdir)
                   for name, extra in server_cfgs]
        for s in servers:
            if s.wait_ready():
                modes.append(s)
            else:
                s.close()
                tail = s.log_path.read_text().strip().splitlines()[-3:]
                log.warning("%s did not start; skipped (%s)", s.name, " / ".join(tail))
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

    cpu, simd = cpu_info()
    today = datetime.date.today().isoformat()
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", re.sub(
        r"\((r|tm)\)|\bcpu\b|@.*", "", cpu.lower()))).strip("-")
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
        md_out += [f"## {name} prompts ({len(sets[name])})", "", *table(modes, name), ""]
    md_out += ["## Commands", "", "```",
               f"python scripts/bench_llamacpp.py {shlex.join(sys.argv[1:])}",
               *server_lines, "# each request: POST /completion " + json.dumps(
                   {"prompt": "[chat-template token ids]", "n_predict": args.n,
                    "temperature": 0.0, "top_k": 1, "seed": SEED, "cache_prompt": False}),
               "```", ""]
    text = "\n".join(md_out)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{today}-llamacpp-{slug}.md"
    path.write_text(text)
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
