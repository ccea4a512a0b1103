"""Concurrency sweep: aggregate tok/s and latencies of OpenAI-compatible servers as the number
of clients grows (issue 33, item 6).

    python -m bench.concurrency --model MODEL.gguf [--servers bridge,bridge-p1,llama-server,...]
        [--clients 1,2,4,8,16,32] [--requests 3] [-n 48] [--set open,copy] [--rounds 1]
        [--threads T] [-c 8192] [--baseline NAME] [--md OUT.md] [--json OUT.json]
        [--llama-server PATH] [--bridge-args "..."] [--llama-args "..."]
    python -m bench.concurrency --url http://HOST:PORT/v1 [--api-key KEY] [same sweep options]

With ``--model``, every server of ``--servers`` is started once on a free port of 127.0.0.1
and kept up; for each client count and workload the servers take their turn in a rotating
order (and ``--rounds`` repeats the whole sweep), so all of them share the machine's noise.
Presets: ``bridge`` (``bridge serve``'s default), ``bridge-p1``, ``-p8``, ``-p16``
(``--parallel 1``, 8, 16),
``bridge-plain`` (``--drafter none``), ``bridge-np`` (``--parallel N`` with N the client
count, restarted for each client count), ``llama-server`` (its default: 4 slots, unified KV)
and ``llama-server-np`` (``-np N -kvu`` with N the client count, restarted for each client
count). llama-server is ``--llama-server`` or the build from the pinned llama.cpp sources
(``python -m exporters.llamacpp_tools llama-server``, cached in ~/.cache/bridge).

Each client sends ``--requests`` streamed greedy chat completions one after another, with
prompts taken in turn from the open set or the copy-heavy sessions of
``bench.workloads``; every server first answers one warm-up request. Reported per
server, client count and set: aggregate output tok/s (completion tokens over the wall time
from the first request's start to the last one's end), time to first token and inter-token
latency (gaps between content chunks, all streams pooled) at p50 and p95, errors, tokens per
target step where the server's ``timings`` carry ``n_steps`` (bridge), the ratios to
``--baseline`` at the same client count, and the RSS of the servers it started.
``--extra-body JSON`` is merged into every request (e.g. ``{"ignore_eos": true}`` for a fixed
answer length on llama-server; a server that refuses a field counts every request as an error).

Run it on a quiet machine: llama.cpp's threads spin while they wait for each other, so with
``--threads`` equal to the cores, any other busy process (a test run, a build) can slow a
server by 100x for as long as it runs. The log names the load average after every cell.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench.common import (
    LOOPBACK,
    ServerError,
    arg_parser,
    cpu_facts,
    free_port,
    llama_server,
    rss_mib,
    start_server,
    stop_server,
)
from bench.loadgen import RequestResult, run_clients, summarize
from bench.report import format_table
from bench.workloads import OPEN_REQUESTS, SESSIONS

log = logging.getLogger("bench.concurrency")

# name -> (program, extra arguments); "{np}" is the client count
PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "bridge": ("bridge", ()),
    "bridge-p1": ("bridge", ("--parallel", "1")),
    "bridge-plain": ("bridge", ("--drafter", "none")),
    "bridge-np": ("bridge", ("--parallel", "{np}")),
    "bridge-p8": ("bridge", ("--parallel", "8")),
    "bridge-p16": ("bridge", ("--parallel", "16")),
    "llama-server": ("llama-server", ()),
    "llama-server-np": ("llama-server", ("-np", "{np}", "-kvu")),
}
WARMUP = "Say hello in one short sentence."


@dataclass(frozen=True)
class ServerSettings:
    """What every started server shares: the model, threads, context and programs."""

    model: Path
    threads: int
    ctx: int
    bridge: Path
    llama_server: Path | None = None
    bridge_args: tuple[str, ...] = ()
    llama_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.threads < 1 or self.ctx < 1:
            raise ValueError("--threads and -c must be positive")


def per_client_count(name: str) -> bool:
    """Whether a preset's command line depends on the client count (then it is restarted
    for each one)."""
    return any("{np}" in a for a in PRESETS[name][1])


def preset_argv(name: str, s: ServerSettings, port: int, clients: int) -> list[str]:
    """The command line of preset ``name`` listening on 127.0.0.1:``port``."""
    program, extra = PRESETS[name]
    extra_args = [a.replace("{np}", str(clients)) for a in extra]
    if program == "bridge":
        return [str(s.bridge), "serve", str(s.model), "--host", LOOPBACK, "--port", str(port),
                "--threads", str(s.threads), "-c", str(s.ctx), *extra_args, *s.bridge_args]
    if s.llama_server is None:
        raise ValueError(f"preset {name} needs a llama-server binary")
    return [str(s.llama_server), "-m", str(s.model), "--host", LOOPBACK, "--port", str(port),
            "-t", str(s.threads), "-c", str(s.ctx), *extra_args, *s.llama_args]


def workload(set_name: str) -> list[str]:
    """The prompts of a set: ``open`` (different requests) or ``copy`` (the sessions of
    similar requests, flattened in order)."""
    if set_name == "open":
        return list(OPEN_REQUESTS)
    if set_name == "copy":
        return [p for ps in SESSIONS.values() for p in ps]
    raise ValueError(f"unknown --set {set_name!r}; choose open, copy or open,copy")


def client_bodies(prompts: list[str], clients: int, requests: int, model: str, n: int,
                  extra: dict) -> list[list[dict]]:
    """Per client, its request bodies: prompts round-robin, client i starting at prompt i, so
    the clients of one moment ask different things and every server gets the same ones."""
    return [[{"model": model, "messages": [{"role": "user", "content":
                                             prompts[(i + j * clients) % len(prompts)]}],
              "temperature": 0, "max_tokens": n, "stream_options": {"include_usage": True},
              **extra} for j in range(requests)] for i in range(clients)]


class Server:
    """One server under test: started here (``argv`` set) or already running (``--url``)."""

    def __init__(self, name: str, base_url: str | None = None):
        self.name, self.base_url = name, base_url
        self.proc, self.argv, self.model_id = None, None, "default"
        self.rss: dict[int, float | None] = {}  # client count -> MiB when it was last read

    def start(self, s: ServerSettings, clients: int, logdir: Path, timeout: float) -> None:
        port = free_port()
        self.argv = preset_argv(self.name, s, port, clients)
        self.proc = start_server(self.argv, port, self.name, timeout=timeout,
                                 log_path=logdir / f"{self.name}.log")
        self.base_url = f"http://{LOOPBACK}:{port}/v1"

    def stop(self, clients: int) -> None:
        if self.proc is not None:
            self.rss[clients] = rss_mib(self.proc.pid)
            stop_server(self.proc)
            self.proc = None

    def warm_up(self, headers: dict, timeout: float) -> None:
        """Learn the model id (bridge refuses another) and answer one short request, so no
        timed request pays first-call allocations."""
        try:
            r = httpx.get(f"{self.base_url}/models", headers=headers, timeout=30)
            self.model_id = r.json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
            log.warning("%s: no model id from /v1/models (%s); sending %r", self.name, e,
                        self.model_id)
        body = {"model": self.model_id, "messages": [{"role": "user", "content": WARMUP}],
                "temperature": 0, "max_tokens": 8}
        res = run_clients(self.base_url, [[body]], timeout, headers)[0]
        if res.error:
            log.warning("%s: the warm-up request failed: %s", self.name, res.error)


def sweep(args: argparse.Namespace, servers: list[Server], settings: ServerSettings | None,
          sets: dict[str, list[str]], logdir: Path, failed: dict[str, str]) -> dict:
    """Every (round, client count, set) cell on every server, in rotating order. Returns
    {(set, clients, server): [one result list per round]}; a server that does not start
    goes into ``failed`` and its cells stay empty."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    results: dict[tuple[str, int, str], list[list[RequestResult]]] = {}
    turn = 0
    for rnd in range(args.rounds):
        for clients in args.clients:
            restarted = [sv for sv in servers if settings and per_client_count(sv.name)]
            for sv in restarted:  # e.g. llama-server -np N: N follows the client count
                try:
                    sv.start(settings, clients, logdir, args.timeout)
                    sv.warm_up(headers, args.timeout)
                except ServerError as e:
                    log.error("%s", e)
                    failed[f"{sv.name} at {clients} clients"] = _last_lines(e)
            for set_name, prompts in sets.items():
                order = servers[turn % len(servers):] + servers[:turn % len(servers)]
                turn += 1
                for sv in order:
                    if sv.base_url is None:  # it did not start: its cells stay empty
                        continue
                    bodies = client_bodies(prompts, clients, args.requests, sv.model_id,
                                           args.n, args.extra_body)
                    t0 = time.perf_counter()
                    rs = run_clients(sv.base_url, bodies, args.timeout, headers)
                    results.setdefault((set_name, clients, sv.name), []).append(rs)
                    bad = sum(r.error is not None for r in rs)
                    log.info("round %d, %d clients, %s, %s: %.1f s, %d errors, load %.2f",
                             rnd + 1, clients, set_name, sv.name, time.perf_counter() - t0,
                             bad, os.getloadavg()[0])
                    if sv.proc is not None and sv.proc.poll() is not None:
                        # a crash under load is a finding: keep its stderr, skip its cells
                        tail = (logdir / f"{sv.name}.log").read_text().strip().splitlines()
                        failed[f"{sv.name} at {clients} clients"] = (
                            f"exited {sv.proc.returncode} during the sweep: "
                            + " / ".join(tail[-3:]))
                        log.error("%s exited %d:\n%s", sv.name, sv.proc.returncode,
                                  "\n".join(tail[-20:]))
                        sv.proc, sv.base_url = None, None
            for sv in restarted:
                sv.stop(clients)
                sv.base_url = None
    return results


def _last_lines(e: Exception, n: int = 3) -> str:
    return " / ".join([ln for ln in str(e).splitlines() if ln.strip()][-n:])


def header(args: argparse.Namespace, servers: list[Server], failed: dict[str, str],
           settings: ServerSettings | None, load: tuple[float, float]) -> list[str]:
    cpu, simd = cpu_facts()
    out = [f"# Concurrency sweep, {datetime.date.today().isoformat()}", "",
           f"- CPU: {cpu}; {os.cpu_count()} cores; {' '.join(simd) or 'no AVX2/AVX-512/AMX'}"]
    if settings:
        out.append(f"- model: {settings.model.name}; --threads {settings.threads}, "
                   f"context {settings.ctx}")
    else:
        out.append(f"- server: {args.url} (model {servers[0].model_id})")
    out += [f"- streamed greedy chat (temperature 0), up to {args.n} tokens per answer; each "
            f"client sends {args.requests} requests one after another; clients "
            f"{', '.join(map(str, args.clients))}; sets {', '.join(args.set)}; "
            f"{args.rounds} round(s), servers interleaved in rotating order",
            f"- 1-minute load average {load[0]:.2f} at the start, {load[1]:.2f} at the end",
            "- tok/s: completion tokens / wall from the first request's start to the last "
            "one's end; TTFT: to the first content chunk; ITL: gaps between content chunks, "
            "all streams pooled; tok/step: (predicted_n - 1) / n_steps summed over requests"]
    for sv in servers:
        if sv.argv:
            # the port differs from run to run: PORT keeps the line comparable
            argv = shlex.join(["PORT" if i and sv.argv[i - 1] == "--port" else a
                               for i, a in enumerate(sv.argv)])
            note = " (restarted for each client count, N = clients)" \
                if per_client_count(sv.name) else ""
            rss = ", ".join(f"{v:.0f} MiB" + (f" at {c} clients" if note else "")
                            for c, v in sv.rss.items() if v is not None) or "-"
            end = f"did not start: {failed[sv.name]}" if sv.name in failed \
                else f"RSS at the end: {rss}"
            out.append(f"- `{sv.name}`{note}: `{argv}`; {end}")
    out += [f"- `{name}`: {why}" for name, why in failed.items()
            if name not in {sv.name for sv in servers}]
    out += ["", "```", shlex.join(["python", "-m", "bench.concurrency", *sys.argv[1:]]),
            "```", ""]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = arg_parser(__spec__.name, __doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="an OpenAI-compatible server already running (…/v1)")
    src.add_argument("--model", type=Path, help="GGUF for the servers started here")
    ap.add_argument("--servers", default="bridge,llama-server",
                    help=f"comma list of presets: {', '.join(PRESETS)}")
    ap.add_argument("--baseline", help="ratios against this server (default: the first)")
    ap.add_argument("--clients", default="1,2,4,8,16,32", help="client counts")
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("-n", type=int, default=48, help="max_tokens per answer")
    ap.add_argument("--set", default="open", help="open, copy or open,copy")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole sweep")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("-c", "--ctx", type=int, default=8192, help="context of each server")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--api-key", help="sent as a Bearer token (with --url)")
    ap.add_argument("--extra-body", type=json.loads, default={},
                    help='JSON merged into every request, e.g. \'{"ignore_eos": true}\'')
    ap.add_argument("--bridge", type=Path, default=Path(sys.executable).parent / "bridge")
    ap.add_argument("--llama-server", type=Path, help="llama-server binary (default: build "
                    "or reuse the one from the pinned sources)")
    ap.add_argument("--bridge-args", type=shlex.split, default=[],
                    help="appended to the bridge presets")
    ap.add_argument("--llama-args", type=shlex.split, default=[],
                    help="appended to the llama-server presets")
    ap.add_argument("--md", type=Path, help="also write the report here")
    ap.add_argument("--json", type=Path, help="write the raw figures here")
    args = ap.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",") if c]
    args.set = [s for s in args.set.split(",") if s]
    args.servers = [s for s in args.servers.split(",") if s]
    unknown = [s for s in args.servers if s not in PRESETS]
    if unknown and not args.url:
        ap.error(f"unknown --servers {unknown}; presets: {', '.join(PRESETS)}")
    if min(args.clients, default=0) < 1 or args.requests < 1 or args.rounds < 1:
        ap.error("--clients, --requests and --rounds must be positive")
    return args


def llama_server_binary(args: argparse.Namespace) -> Path | None:
    if not any(PRESETS[s][0] == "llama-server" for s in args.servers):
        return None
    return llama_server(args.llama_server)[0]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%X")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request drowns the log
    sets = {s: workload(s) for s in args.set}
    settings = None
    if args.url:
        servers = [Server(args.url.split("//")[-1].split("/")[0], args.url.rstrip("/"))]
    else:
        settings = ServerSettings(args.model, args.threads, args.ctx, args.bridge,
                                  llama_server_binary(args), tuple(args.bridge_args),
                                  tuple(args.llama_args))
        servers = [Server(name) for name in args.servers]
    baseline = args.baseline or servers[0].name
    if baseline not in [sv.name for sv in servers]:
        raise SystemExit(f"error: --baseline {baseline} is not among the servers")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    failed: dict[str, str] = {}
    load0 = os.getloadavg()[0]
    if load0 > 0.5 * (os.cpu_count() or 1):  # llama.cpp's spinning threads amplify contention
        log.warning("1-minute load average %.2f on %d cores: other work will skew the figures",
                    load0, os.cpu_count())
    with tempfile.TemporaryDirectory(prefix="bench-concurrency-") as tmp:
        try:
            for sv in servers:
                if settings and not per_client_count(sv.name):
                    try:
                        sv.start(settings, 0, Path(tmp), args.timeout)
                    except ServerError as e:  # reported; the others still run
                        log.error("%s", e)
                        failed[sv.name] = _last_lines(e)
                        continue
                if sv.base_url:
                    sv.warm_up(headers, args.timeout)
            results = sweep(args, servers, settings, sets, Path(tmp), failed)
        finally:
            for sv in servers:
                sv.stop(max(args.clients))
    load = (load0, os.getloadavg()[0])
    order = [sv.name for sv in servers]
    rows = [{"set": k[0], "clients": k[1], "server": k[2], **summarize(v)} for k, v in
            sorted(results.items(), key=lambda kv: (kv[0][1], order.index(kv[0][2])))]
    lines = header(args, servers, failed, settings, load)
    for set_name in args.set:
        lines += [f"## {set_name} set", "",
                  *format_table([r for r in rows if r["set"] == set_name], baseline), ""]
    text = "\n".join(lines)
    print(text)
    if args.md:
        args.md.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({
            "argv": sys.argv, "rows": rows, "failed": failed,
            "servers": {sv.name: {"argv": sv.argv, "rss_mib": sv.rss} for sv in servers},
            "requests": [{"set": k[0], "clients": k[1], "server": k[2], "round": i,
                          **asdict(r)} for k, v in results.items()
                         for i, rs in enumerate(v) for r in rs]}, indent=1))


if __name__ == "__main__":
    main()
