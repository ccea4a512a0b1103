"""What serving costs: `bridge serve` against `bridge generate`, and against llama-cpp-python's
own server, on the same model and prompts, through the official `openai` client.

    .venv/bin/python scripts/bench_serve.py MODEL.gguf [--draft PATH | --no-draft]
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
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

from runtime.bench_prompts import BENCH_PROMPTS

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], port: int, what: str) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited {proc.returncode}:\n{proc.stderr.read()}")
        try:  # llama-cpp-python has no /health; /v1/models answers once the model is loaded
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{what} did not start within 300 s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def one_request(client: openai.OpenAI, model: str, prompt: str, n: int) -> dict:
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
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                           max_retries=0, timeout=600)
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
    argv = [str(BIN / "bridge"), "generate", str(args.model), "--chat", "--temp", "0",
            "-n", str(args.n), "-c", str(args.ctx), "--json", "-p", prompt, *draft_args(args)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    res = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    s = res["stats"]
    return {"engine": s["prompt_seconds"] + s["decode_seconds"], "ttft": s["prompt_seconds"],
            "tokens": s["n_tokens"], "text": res["text"]}


def draft_args(args) -> list[str]:
    if args.no_draft:
        return ["--no-draft"]
    return ["--draft", str(args.draft)] if args.draft else []


def summarize(name: str, r: dict, base: list[dict]) -> dict:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--draft", type=Path)
    ap.add_argument("--no-draft", action="store_true")
    ap.add_argument("-n", type=int, default=64, help="tokens per answer")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--threads", type=int)
    ap.add_argument("-c", "--ctx", type=int, default=2048)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    prompts = [BENCH_PROMPTS[i % len(BENCH_PROMPTS)][1] for i in range(args.requests)]
    threads = ["--threads", str(args.threads)] if args.threads else []

    port = free_port()
    print(f"bridge serve and bridge generate, interleaved: {len(prompts)} prompts, "
          f"{args.n} tokens each", file=sys.stderr)
    proc = start([str(BIN / "bridge"), "serve", str(args.model), "--port", str(port),
                  "-c", str(args.ctx), *threads, *draft_args(args)], port, "bridge serve")
    try:
        served, base = drive(port, args.model.name, prompts, args.n, args)
    finally:
        stop(proc)
    rows = [{"server": "bridge generate (engine time)",
             "seq_ttft_ms": 1e3 * statistics.mean(b["ttft"] for b in base),
             "seq_wall_s": statistics.mean(b["engine"] for b in base),
             "seq_tok_s": sum(b["tokens"] for b in base) / sum(b["engine"] for b in base),
             "seq_req_s": len(base) / sum(b["engine"] for b in base)},
            summarize("bridge serve", served, base)]

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
        proc = start(argv, port, "llama_cpp.server")
        try:
            rows.append(summarize("llama_cpp.server (plain)",
                                  *drive(port, str(args.model), prompts, args.n, args)))
        finally:
            stop(proc)

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
