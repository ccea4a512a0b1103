"""What every benchmark shares: a free port, a server process started and stopped, its RSS,
the CPU's facts, percentiles, and the request workloads in ``scripts/serve_workloads.py``.

Written once here so the benchmarks stop copying them (issue 36): a fix to how a server is
waited for, or to how a CPU is named in a results file, then reaches every benchmark.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import shlex
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


class ServerError(SystemExit):
    """A server that exited or never answered. A ``SystemExit``, so a benchmark that does not
    catch it ends with the server's stderr as its message; a sweep catches it and goes on."""


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def start_server(argv: Sequence[str], port: int, what: str, env: dict | None = None,
                 health_path: str = "/health", timeout: float = 300.0,
                 log_path: Path | None = None) -> subprocess.Popen:
    """Start a server and wait until ``http://127.0.0.1:{port}{health_path}`` answers 200.

    bridge and llama-server answer ``/health`` (llama-server with 503 while it loads);
    servers without it (llama-cpp-python's) answer ``/v1/models`` once the model is loaded.

    Args:
        argv: the command line; it must make the server listen on 127.0.0.1:``port``.
        port: the port the server listens on.
        what: the server's name in messages.
        env: the environment for the process (None: this one's).
        health_path: the path polled until it answers 200.
        timeout: seconds to wait for it.
        log_path: where its stderr goes, kept to read after a crash (None: an unnamed
            temporary file, gone when the process ends).

    Returns:
        The running process (stdout discarded).

    Raises:
        ServerError: the process exited first (the message holds its stderr) or did not answer
            in time.
    """
    # a file, not a pipe: nobody reads a running server's log, and a full pipe would block it
    with (open(log_path, "w+") if log_path else tempfile.TemporaryFile("w+")) as err:
        log.info("starting %s: %s", what, shlex.join(argv))
        proc = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=err, text=True,
                                env=env)
        url = f"http://{LOOPBACK}:{port}{health_path}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err.seek(0)
                raise ServerError(f"{what} exited {proc.returncode} before answering "
                                  f"{health_path}:\n$ {shlex.join(argv)}\n{err.read().strip()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return proc  # the child keeps its own descriptor of the log
            except (urllib.error.URLError, OSError):  # refused, 503 while loading, reset
                pass
            time.sleep(0.3)
        stop_server(proc)
        err.seek(0)
        tail = "\n".join(err.read().strip().splitlines()[-20:])
    raise ServerError(f"{what} did not answer {health_path} within {timeout:.0f} s:\n{tail}")


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop a server as Ctrl-C would (SIGINT lets it finish cleanly), killing it after
    ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("pid %d ignored SIGINT for %.0f s; killing it", proc.pid, timeout)
        proc.kill()
        proc.wait()


def rss_mib(pid: int) -> float | None:
    """Resident memory of a process in MiB, from /proc (None: gone, or no /proc)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) / 1024 if m else None


def cpu_facts() -> tuple[str, list[str]]:
    """The CPU's model name and its AVX-512 / AMX flags: what decides llama.cpp's kernels,
    hence what a results file must name for its figures to be compared."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    if not out:  # no lscpu (minimal images): /proc/cpuinfo has the same two fields
        try:
            out = Path("/proc/cpuinfo").read_text()
        except OSError:
            out = ""
    name = re.search(r"^(?:Model name|model name)\s*:\s*(.+)$", out, re.M)
    flags = re.search(r"^(?:Flags|flags)\s*:\s*(.+)$", out, re.M)
    simd = sorted({f for f in (flags.group(1).split() if flags else [])
                   if f.startswith(("avx512", "amx"))})
    return (name.group(1).strip() if name else "unknown CPU"), simd


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


def load_script(name: str) -> ModuleType:
    """A module of ``scripts/`` (e.g. ``serve_workloads``), loaded from its path: the
    workloads stay in one file for the scripts and the package, with no ``sys.path`` edit."""
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no script {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
