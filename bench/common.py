"""What every benchmark shares: a free port, a server process started and stopped, its RSS,
the CPU's facts, `bridge` run from this checkout, llama.cpp's own llama-server, the
``openai`` client for a local server, and the JSON-schema check of an answer.

Written once here so the benchmarks stop copying them (issue 36): a fix to how a server is
waited for, or to how a CPU is named in a results file, then reaches every benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

# the CPU's name and SIMD flags have one home, in the runtime (`bridge bench` names them
# too); the benchmarks take them from here with the rest
from runtime.native import cpu_facts

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
# `bridge` from this checkout's code: children run with ROOT first on PYTHONPATH
# (checkout_env), so ``-m`` finds the checkout's packages, whatever a console script on
# PATH would import
BRIDGE = (sys.executable, "-m", "bridge.cli")


class ServerError(SystemExit):
    """A server that exited or never answered. A ``SystemExit``, so a benchmark that does not
    catch it ends with the server's stderr as its message; a sweep catches it and goes on."""


def arg_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of the benchmark ``module`` (its ``__spec__.name``): ``--help``
    names the command that runs it and the first paragraph of its docstring."""
    return argparse.ArgumentParser(prog=f"python -m {module}",
                                   description=(doc or "").split("\n\n")[0])


def checkout_env(env: dict | None = None) -> dict:
    """``env`` (None: this process's environment) with this checkout first on PYTHONPATH,
    for children that run ``python -m`` on the project's packages."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _answers(port: int, health_path: str | None) -> bool:
    """Whether the server on ``port`` is up: ``health_path`` answers 200, or (None) the
    port accepts a TCP connection (servers that speak no HTTP, such as ggml-rpc-server)."""
    try:
        if health_path is None:
            socket.create_connection((LOOPBACK, port), timeout=2).close()
            return True
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{health_path}", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):  # refused, 503 while loading, reset
        return False


def start_server(argv: Sequence[str], port: int, what: str, env: dict | None = None,
                 health_path: str | None = "/health", timeout: float = 300.0,
                 log_path: Path | None = None) -> subprocess.Popen:
    """Start a server and wait until it answers on 127.0.0.1:``port``.

    bridge and llama-server answer ``/health`` (llama-server with 503 while it loads);
    servers without it (llama-cpp-python's) answer ``/v1/models`` once the model is loaded.

    Args:
        argv: the command line; it must make the server listen on 127.0.0.1:``port``.
        port: the port the server listens on.
        what: the server's name in messages.
        env: the environment for the process (None: this one's); this checkout goes
            first on its PYTHONPATH (``checkout_env``).
        health_path: the path polled until it answers 200 (None: until the port accepts a
            connection).
        timeout: seconds to wait for it.
        log_path: where its stdout and stderr go, kept to read after a crash (None: an
            unnamed temporary file, gone when the process ends).

    Returns:
        The running process.

    Raises:
        ServerError: the process exited first (the message holds its output) or did not
            answer in time.
    """
    # a file, not a pipe: nobody reads a running server's log, and a full pipe would block it
    with (open(log_path, "w+") if log_path else tempfile.TemporaryFile("w+")) as out:
        log.info("starting %s: %s", what, shlex.join(argv))
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, text=True,
                                env=checkout_env(env))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                out.seek(0)
                raise ServerError(f"{what} exited {proc.returncode} before answering:\n"
                                  f"$ {shlex.join(argv)}\n{out.read().strip()}")
            if _answers(port, health_path):
                return proc  # the child keeps its own descriptor of the log
            time.sleep(0.3)
        stop_server(proc)
        out.seek(0)
        tail = "\n".join(out.read().strip().splitlines()[-20:])
    raise ServerError(f"{what} did not answer on port {port} within {timeout:.0f} s:\n{tail}")


def stop_server(proc: subprocess.Popen, timeout: float = 30.0,
                sig: int = signal.SIGINT) -> int:
    """Stop a server as Ctrl-C would (SIGINT lets it finish cleanly; ``sig`` another
    signal), killing it after ``timeout`` seconds. Returns its exit code."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("pid %d ignored signal %d for %.0f s; killing it", proc.pid, sig, timeout)
        proc.kill()
        return proc.wait()


def rss_mib(pid: int, field: str = "VmRSS") -> float | None:
    """Resident memory of a process in MiB, from /proc (None: gone, or no /proc).
    ``field="RssAnon"``: its anonymous part, what must fit in RAM (file pages of mapped
    model files, also in VmRSS, are dropped by the kernel under pressure)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) / 1024 if m else None


def cpu_slug(cpu: str | None = None) -> str:
    """The CPU's name as a file-name part ("AMD EPYC 7B13" -> "amd-epyc-7b13")."""
    cpu = (cpu or cpu_facts()[0]).lower()
    cpu = re.sub(r"\((r|tm)\)|\bcpu\b|@.*", "", cpu)
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", cpu)).strip("-")


def results_path(out: Path, kind: str) -> Path:
    """``out/<date>-<kind>-<cpu>.md``, the name of a results file (``out`` created)."""
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{datetime.date.today().isoformat()}-{kind}-{cpu_slug()}.md"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks,
    as numpy's default; None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in 0..100, got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def bridge_generate(model: Path | str, prompt: str, n: int, extra: Sequence[str] = (),
                    threads: int | None = None) -> dict:
    """One greedy chat answer of `bridge generate` in its own process, as a user types
    it: its ``--json`` output (text, tokens, the engine's stats; model load excluded)."""
    argv = [*BRIDGE, "generate", str(model), "--chat", "--temp", "0", "-n", str(n),
            "--json", "-p", prompt, *extra]
    if threads:
        argv += ["--threads", str(threads)]
    out = subprocess.run(argv, capture_output=True, text=True, env=checkout_env())
    if out.returncode:
        raise SystemExit(f"bridge generate failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def openai_client(port: int, timeout: float = 600.0):
    """The ``openai`` client for the server on 127.0.0.1:``port`` (no retries: a failure
    is a finding, not something to hide)."""
    import openai  # the dev extra, as every benchmark that speaks the OpenAI API

    return openai.OpenAI(base_url=f"http://{LOOPBACK}:{port}/v1", api_key="unused",
                         max_retries=0, timeout=timeout)


def schema_valid(value: object, schema: dict | None) -> bool:
    """Whether a parsed JSON ``value`` validates against ``schema`` (None: no schema, as
    for a tool the request did not offer, is not valid)."""
    import jsonschema

    if schema is None:
        return False
    try:
        jsonschema.validate(value, schema)
        return True
    except jsonschema.ValidationError:
        return False


def json_valid(text: str | None, schema: dict | None) -> bool:
    """Whether ``text`` parses as JSON and validates against ``schema``."""
    try:
        return schema_valid(json.loads(text or ""), schema)
    except ValueError:
        return False


def llama_server(binary: Path | None = None, skip_build: bool = False) -> tuple[Path, dict]:
    """llama.cpp's llama-server: ``binary`` when given, else the build from the sources
    bridge's llama-cpp-python pins (``exporters.llamacpp_tools``), built once and cached
    in ~/.cache/bridge (``skip_build``: only a cached one); and how it was built ({} for a
    given binary)."""
    if binary:
        return binary, {}
    from exporters.llamacpp_tools import LLAMA_SERVER, build_tool

    try:
        return build_tool(LLAMA_SERVER, skip_build=skip_build)
    except (FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: {e}; or pass --llama-server PATH") from None


def llama_server_facts(binary: Path) -> dict:
    """Version line and the speculative options of a llama-server, from --version/--help:
    ``spec_types`` (its ``--spec-type`` values), ``spec_options`` and their ``defaults``."""
    def run(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(binary), *a], capture_output=True, text=True, timeout=60)

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

