"""A real `bridge serve` subprocess for the server tests: started from this checkout's
venv on a free port, returned once /health answers, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.common import free_port

BRIDGE = Path(sys.executable).with_name("bridge")


def start_serve(model: Path, *argv: str, env: dict | None = None, log: Path | None = None
                ) -> tuple[subprocess.Popen, str, int]:
    """(process, url, port) of `bridge serve MODEL ARGV...` once /health answers. Its
    output goes to ``log`` when given, else to a pipe (wide lines: the log handler wraps at
    COLUMNS); a server that exits or never answers fails the test with its output."""
    port = free_port()
    cmd = [str(BRIDGE), "serve", str(model), "--port", str(port), *map(str, argv)]
    out = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(cmd, env={**os.environ, "COLUMNS": "400", **(env or {})},
                            stdout=out, stderr=subprocess.STDOUT, text=True)
    if log:
        out.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = log.read_text() if log else proc.stdout.read()
            raise AssertionError(f"bridge serve exited {proc.returncode}:\n{output}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, port
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("bridge serve did not answer /health within 120 s")


def stop_serve(proc: subprocess.Popen, timeout: float = 20) -> int:
    """SIGTERM, then the exit status (killed, and the test failed, after ``timeout``)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
