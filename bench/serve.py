"""What serving costs: `bridge serve` against `bridge generate`, and against llama-cpp-python's
own server, on the same model and prompts, through the official `openai` client.

    python -m bench.serve MODEL.gguf [--draft PATH | --no-draft]
        [-n 64] [--requests 8] [--threads N] [-c 2048] [--json OUT]

For each server: N sequential streamed requests (time to first token, wall time, tokens/s
per request) then the same N at once (requests/s, aggregate tokens/s; time to first token
then includes the wait in the queue). The `bridge generate` figures are the engine's own
prompt + decode time for the same prompts (model load excluded), so
``overhead = server wall per request / generate engine time - 1`` is what HTTP, JSON, SSE
and the worker hand-off add (target <= 5%); ``http_ms`` is the same cost read from the
server's own timings. Greedy decoding (temperature 0) throughout, and the answers are
compared with `bridge generate`'s: a prompt prefix reused from the previous request changes
how llama.cpp batches the prompt, so a near-tie can round the other way (llama-server's
prompt cache does the same).

llama-cpp-python's server needs `pip install 'llama-cpp-python[server]'` (fastapi,
sse-starlette, uvicorn, pydantic-settings, starlette-context); without it that part is
skipped with a message.

    python -m bench.serve MODEL.gguf --sessions [--draft PATH]
        [-n 96] [--threads 1] [--md OUT.md] [--llama-server PATH]

The session workload (issue 17): 4 sessions x 6 similar requests (records to JSON, edits
of one code file, questions about one document, log lines to JSON), sent in order to
several `bridge serve` processes that all stay up, each request to every server in turn
so all share the machine's noise: plain, forced lookup (`--drafter lookup --fixed-gamma
--draft-max 16`) and `auto`, each with the drafting memory on and off
(`--no-shared-drafts`). Reported per server: tokens per target step ((predicted_n - 1) /
n_steps summed over requests), decode tokens/s, how many answers equal plain's. Then 24
open-ended requests (``bench.workloads``) on plain and on `auto` with the memory
(which has read the sessions) and without it, and the memory's own cost per step:
lookups timed on the memory the forced-lookup server saved, against a plain step.
A llama-server binary (``--llama-server``, or the one ``bench.llamacpp`` builds in
~/.cache/bridge) adds llama-server plain and each of its n-gram speculation types (their
default sizes) to the session table.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.common import (
    BRIDGE,
    arg_parser,
    bridge_generate,
    free_port,
    llama_server,
    llama_server_facts,
    openai_client,
    percentile,
    start_server,
    stop_server,
)
from bench.workloads import OPEN_REQUESTS, SESSIONS
from runtime.bench_prompts import BENCH_PROMPTS


def one_request(client, model: str, prompt: str, n: int) -> dict:
    """One streamed chat request: time to first token, wall time, tokens, text."""
    t0 = time.perf_counter()
    ttft, parts, usage, timings = None, [], None, None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0,
        max_tokens=n, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
        timings = (chunk.model_extra or {}).get("timings") or timings
    wall = time.perf_counter() - t0
    n_tok = usage.completion_tokens if usage else len(parts)
    return {"ttft": ttft or wall, "wall": wall, "tokens": n_tok, "text": "".join(parts),
            "engine": (timings["prompt_ms"] + timings["predicted_ms"]) / 1e3
            if timings else None}


def drive(port: int, model: str, prompts: list[str], n: int, args) -> tuple[dict, list]:
    """The sequential requests, each right after `bridge generate` on the same prompt (on a
    shared machine, load drifts: interleaving compares like with like), then the
    concurrent ones. Returns the server's figures and the generate baseline."""
    client = openai_client(port)
    one_request(client, model, prompts[0], 4)  # warm-up: first-call allocations
    base, seq = [], []
    for p in prompts:
        base.append(generate_one(args, p))
        seq.append(one_request(client, model, p, n))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        conc = list(pool.map(lambda p: one_request(client, model, p, n), prompts))
    conc_wall = time.perf_counter() - t0
    return {"sequential": seq, "concurrent": conc, "concurrent_wall": conc_wall}, base


def generate_one(args, prompt: str) -> dict:
    """`bridge generate` in a subprocess: its engine's prompt + decode time (load aside)."""
    res = bridge_generate(args.model, prompt, args.n, ["-c", str(args.ctx), *draft_args(args)],
                          args.threads)
    s = res["stats"]
    return {"engine": s["prompt_seconds"] + s["decode_seconds"], "ttft": s["prompt_seconds"],
            "tokens": s["n_tokens"], "text": res["text"]}


def draft_args(args) -> list[str]:
    if args.no_draft:
        return ["--no-draft"]
    return ["--draft", str(args.draft)] if args.draft else []


def summarize_server(name: str, r: dict, base: list[dict]) -> dict:
    seq, conc = r["sequential"], r["concurrent"]
    mean = statistics.mean
    row = {
        "server": name,
        "seq_ttft_ms": 1e3 * mean(x["ttft"] for x in seq),
        "seq_wall_s": mean(x["wall"] for x in seq),
        "seq_tok_s": sum(x["tokens"] for x in seq) / sum(x["wall"] for x in seq),
        "seq_req_s": len(seq) / sum(x["wall"] for x in seq),
        "conc_req_s": len(conc) / r["concurrent_wall"],
        "conc_tok_s": sum(x["tokens"] for x in conc) / r["concurrent_wall"],
        "conc_ttft_ms": 1e3 * mean(x["ttft"] for x in conc),
        "overhead": mean(x["wall"] / b["engine"] - 1 for x, b in zip(seq, base, strict=True)),
        "same_text": sum(x["text"] == b["text"] for x, b in zip(seq, base, strict=True)),
        # concurrent answers identical to the same server's sequential ones: a server that
        # interrupts or drops queued requests shows here
        "conc_same": sum(x["text"] == y["text"] for x, y in zip(conc, seq, strict=True)),
    }
    if all(x["engine"] is not None for x in seq):  # bridge's own timings: HTTP cost alone
        row["http_ms"] = 1e3 * mean(x["wall"] - x["engine"] for x in seq)
    return row

# -- the session workload (issue 17): similar requests, one after another ----------------

LOOKUP16 = ["--drafter", "lookup", "--fixed-gamma", "--draft-max", "16"]


def chat_once(port: int, prompt: str, n: int) -> dict:
    """One whole (non-streamed) greedy chat answer with the server's timings."""
    t0 = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=600, json={
        "messages": [{"role": "user", "content": prompt}], "temperature": 0,
        "max_tokens": n})
    r.raise_for_status()
    body = r.json()
    t = body.get("timings") or {}
    n_tok = t.get("predicted_n", body["usage"]["completion_tokens"])
    # a step emits its accepted drafts + 1; the first token comes with the prompt
    steps = t["n_steps"] if "n_steps" in t else \
        max(1, n_tok - 1 - t.get("draft_n_accepted", 0))
    return {"text": body["choices"][0]["message"]["content"], "tokens": n_tok,
            "steps": steps, "decode_s": t.get("predicted_ms", 0) / 1e3 or None,
            "wall": time.perf_counter() - t0, "sources": t.get("sources", {})}


def session_servers(args, memory_file: Path) -> list[tuple[str, list[str]]]:
    draft = ["--draft", str(args.draft)] if args.draft else []
    return [
        ("plain", ["--no-draft"]),
        ("lookup γ≤16, memory off", [*LOOKUP16, "--no-shared-drafts"]),
        ("lookup γ≤16, memory on", [*LOOKUP16, "--draft-memory-file", str(memory_file)]),
        ("auto, memory off", [*draft, "--no-shared-drafts"]),
        ("auto, memory on", draft),
    ]


def run_sessions(args) -> None:
    threads = ["--threads", str(args.threads)] if args.threads else []
    memory_file = Path(tempfile.mkdtemp()) / "memory.npz"
    servers: list[tuple[str, int, subprocess.Popen]] = []
    try:
        for name, extra in session_servers(args, memory_file):
            port = free_port()
            argv = [*BRIDGE, "serve", str(args.model), "--port", str(port),
                    "-c", str(args.ctx), *threads, *extra]
            servers.append((name, port, start_server(argv, port, f"bridge serve ({name})")))
        try:
            binary = llama_server(args.llama_server, skip_build=True)[0]
        except SystemExit as e:  # none given, none built (python -m bench.llamacpp builds one)
            print(f"{e}: llama-server's n-gram modes are left out", file=sys.stderr)
        else:
            ngram = [t for t in llama_server_facts(binary)["spec_types"] if t.startswith("ngram")]
            # each n-gram type with its own default sizes (their n-max options differ)
            for t in ["plain", *ngram]:
                port = free_port()
                argv = [str(binary), "-m", str(args.model), "--port", str(port), "-c",
                        str(args.ctx), "-t", str(args.threads or os.cpu_count()),
                        *(["--spec-type", t] if t != "plain" else [])]
                servers.append((f"llama-server {t}", port, start_server(argv, port, t)))
        load = [os.getloadavg()[0]]
        requests = [p for ps in SESSIONS.values() for p in ps]
        for _, port, _ in servers:  # warm-up: first-call allocations, stored profiles
            chat_once(port, "Hi", 4)
        results: dict[str, list[dict]] = {name: [] for name, _, _ in servers}
        for i, prompt in enumerate(requests):  # each request to every server, in turn
            for name, port, _ in servers[i % len(servers):] + servers[:i % len(servers)]:
                results[name].append(chat_once(port, prompt, args.n))
        load.append(os.getloadavg()[0])
        # open-ended requests: plain against auto with the memory (which has the sessions)
        # and without it, each request to the three in a rotating order
        names = ["plain", "auto, memory on", "auto, memory off"]
        open_res: dict[str, list[dict]] = {name: [] for name in names}
        ports = {name: port for name, port, _ in servers}
        for i, prompt in enumerate(OPEN_REQUESTS):
            for name in names[i % 3:] + names[:i % 3]:
                open_res[name].append(chat_once(ports[name], prompt, args.n))
        load.append(os.getloadavg()[0])
    finally:
        for _, _, proc in servers:
            stop_server(proc)
    plain_step = statistics.median(r["decode_s"] / r["tokens"] for r in results["plain"])
    cost = memory_step_cost(memory_file, plain_step)
    lines = session_report(results, open_res, cost, load, args)
    print("\n".join(lines))
    if args.md:
        args.md.write_text("\n".join(lines) + "\n")


def memory_step_cost(path: Path, plain_step: float) -> dict:
    """Per-step cost of drafting from the memory the forced-lookup server saved: a
    lookup (n_max 16) at every 3rd position of every stored request, as the decode loop
    asks it; every context was stored, so each lookup finds and walks a match."""
    import numpy as np

    from runtime.drafters.memory import DraftMemory, MemoryDrafter

    with np.load(path) as z:  # the saved file's own arrays: the stored token sequences
        tokens, lengths = z["tokens"].tolist(), z["lengths"].tolist()
        fingerprint = json.loads(str(z["header"]))["fingerprint"]
    memory = DraftMemory.load(path, fingerprint)
    drafter, times, at = MemoryDrafter(memory), [], 0
    for length in lengths:
        seq = tokens[at:at + length]
        at += length
        for i in range(16, length, 3):
            t0 = time.perf_counter()
            drafter.propose(seq[:i], 16, 0.0)
            times.append(time.perf_counter() - t0)
    med, p90 = percentile(times, 50), percentile(times, 90)
    return {"tokens": memory.n_tokens, "bytes": memory.nbytes, "lookups": len(times),
            "median_us": med * 1e6, "p90_us": p90 * 1e6, "plain_step_ms": plain_step * 1e3,
            "share": med / plain_step, "share_p90": p90 / plain_step}


def memory_counts(rs: list[dict]) -> tuple[int, int]:
    """(accepted, drafted) tokens the drafting memory contributed over these answers."""
    mem = [r["sources"].get("memory", {}) for r in rs]
    return sum(m.get("accepted", 0) for m in mem), sum(m.get("drafted", 0) for m in mem)


def session_report(results: dict, open_res: dict, cost: dict, load: list, args) -> list[str]:
    def agg(rs: list[dict]) -> tuple[float, float]:
        per_step = sum(r["tokens"] - 1 for r in rs) / sum(r["steps"] for r in rs)
        tok_s = sum(r["tokens"] for r in rs) / sum(r["decode_s"] or r["wall"] for r in rs)
        return per_step, tok_s

    plain = results["plain"]
    base_tps = agg(plain)[1]
    out = [f"## Session workload: {len(SESSIONS)} sessions x 6 requests, up to {args.n} "
           "tokens each, greedy", "",
           "| server | tokens per target step | decode tok/s | vs plain | memory accepted / "
           "drafted | same text as plain |", "| --- | --- | --- | --- | --- | --- |"]
    for name, rs in results.items():
        per_step, tps = agg(rs)
        acc, drafted = memory_counts(rs)
        same = sum(r["text"] == p["text"] for r, p in zip(rs, plain, strict=True))
        out.append(f"| {name} | {per_step:.2f} | {tps:.1f} | {tps / base_tps:.2f}x | "
                   f"{f'{acc}/{drafted}' if drafted else '-'} | {same}/{len(rs)} |")
    on, off = (agg(results[f"lookup γ≤16, memory {x}"])[0] for x in ("on", "off"))
    o_plain, o_auto, o_off = (agg(open_res[k])[1] for k in open_res)
    o_acc, o_drafted = memory_counts(open_res["auto, memory on"])
    out += ["", f"- forced lookup, memory on: {on:.2f} tokens per target step (target >= 3.0), "
            f"{on / off - 1:+.0%} against memory off (target >= +15%)",
            f"- open-ended requests ({len(OPEN_REQUESTS)}, bench.workloads): "
            f"`auto` with the memory {o_auto:.1f} tok/s, plain {o_plain:.1f} tok/s: "
            f"{o_auto / o_plain:.2f}x (target >= 0.97x); `auto` without it {o_off:.1f} "
            f"tok/s ({o_off / o_plain:.2f}x); the memory drafted {o_drafted} tokens on "
            f"them, {o_acc} accepted",
            f"- memory cost per step: median {cost['median_us']:.0f} µs (p90 "
            f"{cost['p90_us']:.0f} µs) per lookup of up to 16 tokens, {cost['lookups']} "
            f"lookups on the {cost['tokens']:,}-token memory ({cost['bytes'] / 1024:.0f} KiB) "
            f"the forced-lookup server saved; a plain step costs {cost['plain_step_ms']:.2f} "
            f"ms: {cost['share']:.2%} (p90 {cost['share_p90']:.2%}; target <= 2%)",
            f"- load average (1 min) at start, after the sessions, at the end: "
            f"{', '.join(f'{x:.2f}' for x in load)} on {os.cpu_count()} cores; servers ran "
            f"with --threads {args.threads or 'all'}"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("model", type=Path)
    ap.add_argument("--draft", type=Path)
    ap.add_argument("--no-draft", action="store_true")
    ap.add_argument("-n", type=int, default=64, help="tokens per answer")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--threads", type=int)
    ap.add_argument("-c", "--ctx", type=int, default=2048)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--sessions", action="store_true",
                    help="the session workload with the drafting memory on and off")
    ap.add_argument("--md", type=Path, help="--sessions: also write the report here")
    ap.add_argument("--llama-server", type=Path, help="--sessions: a llama-server binary")
    args = ap.parse_args(argv)
    if args.sessions:
        run_sessions(args)
        return
    prompts = [BENCH_PROMPTS[i % len(BENCH_PROMPTS)][1] for i in range(args.requests)]
    threads = ["--threads", str(args.threads)] if args.threads else []

    port = free_port()
    print(f"bridge serve and bridge generate, interleaved: {len(prompts)} prompts, "
          f"{args.n} tokens each", file=sys.stderr)
    proc = start_server([*BRIDGE, "serve", str(args.model), "--port", str(port),
                         "-c", str(args.ctx), *threads, *draft_args(args)], port, "bridge serve")
    try:
        served, base = drive(port, args.model.name, prompts, args.n, args)
    finally:
        stop_server(proc)
    rows = [{"server": "bridge generate (engine time)",
             "seq_ttft_ms": 1e3 * statistics.mean(b["ttft"] for b in base),
             "seq_wall_s": statistics.mean(b["engine"] for b in base),
             "seq_tok_s": sum(b["tokens"] for b in base) / sum(b["engine"] for b in base),
             "seq_req_s": len(base) / sum(b["engine"] for b in base)},
            summarize_server("bridge serve", served, base)]

    probe = subprocess.run([sys.executable, "-c", "import llama_cpp.server.app"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        print(f"llama-cpp-python server skipped: {last}; install it with "
              "pip install 'llama-cpp-python[server]'", file=sys.stderr)
    else:
        port = free_port()
        print("python -m llama_cpp.server and bridge generate, interleaved", file=sys.stderr)
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(args.model),
                "--n_ctx", str(args.ctx), "--port", str(port), "--verbose", "False"]
        if args.threads:
            argv += ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
        # llama-cpp-python's server has no /health: /v1/models answers once the model is loaded
        proc = start_server(argv, port, "llama_cpp.server", health_path="/v1/models")
        try:
            rows.append(summarize_server("llama_cpp.server (plain)",
                                         *drive(port, str(args.model), prompts, args.n, args)))
        finally:
            stop_server(proc)

    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps({"n": args.n, "requests": args.requests,
                                         "rows": rows}, indent=1))


def print_table(rows: list[dict], args) -> None:
    cols = [("server", "{}", 30), ("seq_ttft_ms", "{:.0f}", 9), ("seq_tok_s", "{:.1f}", 9),
            ("seq_req_s", "{:.2f}", 9), ("overhead", "{:+.1%}", 9), ("http_ms", "{:.1f}", 8),
            ("conc_req_s", "{:.2f}", 10), ("conc_tok_s", "{:.1f}", 10),
            ("conc_ttft_ms", "{:.0f}", 12), ("conc_same", "{}", 9), ("same_text", "{}", 9)]
    print(f"{args.requests} requests x {args.n} tokens, greedy, {os.cpu_count()} cores; "
          "same_text: answers identical to bridge generate's; conc_same: concurrent "
          "answers identical to the same server's sequential ones")
    print(" ".join(f"{c:>{w}}" for c, _, w in cols))
    for r in rows:
        print(" ".join(f"{fmt.format(r[c]) if c in r else '-':>{w}}" for c, fmt, w in cols))


if __name__ == "__main__":
    main()
