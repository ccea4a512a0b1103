"""runtime.rpc and ``--rpc`` end to end.

The slow tests start their own ``ggml-rpc-server`` workers on 127.0.0.1, built once from the
llama.cpp that the pinned llama-cpp-python vendors (``exporters.llamacpp_tools``, cached
under ~/.cache/bridge; about 5 minutes on 2 cores the first time). A fake worker answers
the handshake with another protocol version, a free port stands for a worker that is down,
and one test kills a worker in the middle of an answer from ``bridge serve``.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.common import free_port as _free_port
from runtime import rpc
from runtime.rpc import Endpoint, RpcError, parse_endpoints

BRIDGE = Path(sys.executable).with_name("bridge")
N = 24


# -- parsing and trust: pure functions ----------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:50052", [("127.0.0.1", 50052)]),
    ("10.0.0.2:1,10.0.0.3:65535", [("10.0.0.2", 1), ("10.0.0.3", 65535)]),
    (" worker-a:50052 , worker-b:50053 ", [("worker-a", 50052), ("worker-b", 50053)]),
])
def test_parse_endpoints(text, want):
    assert [(e.host, e.port) for e in parse_endpoints(text)] == want


@pytest.mark.parametrize("text, says", [
    ("", "HOST:PORT"),
    ("127.0.0.1", "not HOST:PORT"),           # no port
    ("127.0.0.1:", "not HOST:PORT"),
    (":50052", "not HOST:PORT"),              # no host
    ("127.0.0.1:0", "1..65535"),
    ("127.0.0.1:70000", "1..65535"),
    ("127.0.0.1:50x", "not HOST:PORT"),
    ("a:1,,b:2", "HOST:PORT"),                # an empty item
    ("[::1]:50052", "IPv4"),                  # ggml-rpc connects over IPv4 only
    ("a:1,a:1", "twice"),
])
def test_parse_endpoints_refuses(text, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_endpoints(text)


@pytest.mark.parametrize("host, trusted", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("localhost", True),
    ("10.1.2.3", True), ("192.168.0.7", True), ("172.16.4.4", True), ("169.254.1.1", True),
    ("8.8.8.8", False), ("172.32.0.1", False),  # just outside 172.16/12
    ("gpu-box.example.com", False),              # names are not resolved: untrusted
])
def test_trusted(host, trusted):
    assert Endpoint(host, 50052).trusted is trusted


def test_untrusted_endpoints_get_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="runtime.rpc"):
        rpc.warn_untrusted(parse_endpoints("127.0.0.1:1,8.8.8.8:2,10.0.0.1:3,1.1.1.1:4"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "8.8.8.8:2, 1.1.1.1:4" in warnings[0].getMessage()
    assert "10.0.0.1" not in warnings[0].getMessage()


# -- fake and absent workers -------------------------------------------------------------

class FakeWorker:
    """Answers ggml-rpc's HELLO with ``version``, or closes at once (``version=None``), as
    a worker of another protocol would."""

    def __init__(self, version: tuple[int, int, int] | None):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.version = version
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(1 + 8 + rpc.RPC_CONN_CAPS_SIZE)
                if self.version is not None:
                    rsp = struct.pack("<BBBB24s", *self.version, 0, bytes(24))
                    conn.sendall(struct.pack("<Q", len(rsp)) + rsp)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("version, says", [
    ((rpc.RPC_PROTO_MAJOR + 1, 0, 0), "speaks RPC protocol"),
    ((rpc.RPC_PROTO_MAJOR - 1, 5, 0), "speaks RPC protocol"),
    ((rpc.RPC_PROTO_MAJOR, rpc.RPC_PROTO_MINOR + 1, 0), "speaks RPC protocol"),  # newer minor
    (None, "closed the connection during the handshake"),
])
def test_probe_names_a_worker_of_another_version(version, says):
    fake = FakeWorker(version)
    try:
        with pytest.raises(RpcError, match=re.escape(says)) as e:
            rpc.probe(parse_endpoints(fake.endpoint)[0], timeout=5)
        assert fake.endpoint in str(e.value) and "\n" not in str(e.value)
    finally:
        fake.close()


def test_probe_accepts_the_same_version():
    fake = FakeWorker((rpc.RPC_PROTO_MAJOR, rpc.RPC_PROTO_MINOR, 3))
    try:
        assert rpc.probe(parse_endpoints(fake.endpoint)[0]) == (rpc.RPC_PROTO_MAJOR,
                                                                 rpc.RPC_PROTO_MINOR, 3)
    finally:
        fake.close()


def test_probe_times_out_on_a_silent_worker():
    # accepts (the kernel's backlog) but never answers: a hung worker, never a hang here
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        ep = parse_endpoints(f"127.0.0.1:{silent.getsockname()[1]}")[0]
        with pytest.raises(RpcError, match="did not answer the handshake within 1 s"):
            rpc.probe(ep, timeout=1)
    finally:
        silent.close()


def test_watchdog_fires_on_a_decode_that_waits_too_long():
    fired: list[str] = []
    began = [None]
    dead = socket.create_server(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there now: the message names it as the lost worker
    eps = parse_endpoints(f"127.0.0.1:{port},127.0.0.1:{_free_port()}")
    dog = rpc.Watchdog([lambda: began[0]], eps[:1], timeout=1.0, fire=fired.append)
    try:
        time.sleep(1.5)
        assert fired == []  # idle: nothing to time
        began[0] = time.monotonic()
        deadline = time.monotonic() + 10
        while not fired and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        dog.close()
    assert len(fired) == 1 and f"127.0.0.1:{port} did not finish a decode within 1 s" in fired[0]


def _cli_error(*args: str) -> str:
    out = subprocess.run([str(BRIDGE), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0, out
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), out.stderr
    return last


def test_cli_bad_rpc_syntax_is_one_line(smollm2_gguf):
    last = _cli_error("generate", str(smollm2_gguf), "-p", "hi", "--rpc", "127.0.0.1:5x")
    assert "--rpc: '127.0.0.1:5x'" in last
    last = _cli_error("serve", str(smollm2_gguf), "--draft-rpc", "nohost")
    assert "--draft-rpc" in last


def test_cli_refused_worker_is_one_line(smollm2_gguf):
    port = _free_port()  # nothing listens there
    last = _cli_error("generate", str(smollm2_gguf), "-p", "hi", "-n", "4",
                      "--rpc", f"127.0.0.1:{port}")
    assert f"127.0.0.1:{port} refused the connection" in last


def test_cli_worker_of_another_version_is_one_line(smollm2_gguf):
    fake = FakeWorker((rpc.RPC_PROTO_MAJOR + 1, 0, 0))
    try:
        for cmd in ("generate", "bench"):
            args = ["-p", "hi", "-n", "4"] if cmd == "generate" else ["-n", "4"]
            last = _cli_error(cmd, str(smollm2_gguf), *args, "--rpc", fake.endpoint)
            assert fake.endpoint in last and "speaks RPC protocol" in last
    finally:
        fake.close()


# -- real workers ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def rpc_server_binary() -> Path:
    from exporters.llamacpp_tools import RPC_SERVER, build_tool

    binary, _ = build_tool(RPC_SERVER)
    return binary


def test_protocol_constants_match_the_vendored_sources(rpc_server_binary):
    # the Python handshake mirrors ggml-rpc's; the worker binary is built from these files
    from exporters.llamacpp_tools import pinned_version, source_dir

    src = source_dir(pinned_version()) / "ggml"
    header = (src / "include" / "ggml-rpc.h").read_text()
    assert int(re.search(r"RPC_PROTO_MAJOR_VERSION\s+(\d+)", header)[1]) == rpc.RPC_PROTO_MAJOR
    assert int(re.search(r"RPC_PROTO_MINOR_VERSION\s+(\d+)", header)[1]) == rpc.RPC_PROTO_MINOR
    body = (src / "src" / "ggml-rpc" / "ggml-rpc.cpp").read_text()
    assert f"RPC_CMD_HELLO == {rpc.RPC_CMD_HELLO}" in body
    transport = (src / "src" / "ggml-rpc" / "transport.h").read_text()
    assert f"RPC_CONN_CAPS_SIZE = {rpc.RPC_CONN_CAPS_SIZE};" in transport


class Workers:
    """``ggml-rpc-server`` processes on 127.0.0.1, one thread each."""

    def __init__(self, binary: Path, n: int = 2):
        self.binary = binary
        self.ports = [_free_port() for _ in range(n)]
        self.procs = [self.start(p) for p in self.ports]

    def start(self, port: int) -> subprocess.Popen:
        proc = subprocess.Popen([str(self.binary), "-H", "127.0.0.1", "-p", str(port),
                                 "-t", "1"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"rpc-server on {port} exited {proc.returncode}"
            try:
                rpc.probe(Endpoint("127.0.0.1", port), timeout=2)
                return proc
            except RpcError:
                time.sleep(0.1)
        raise AssertionError(f"rpc-server on {port} did not answer within 30 s")

    @property
    def arg(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def kill(self, i: int) -> None:
        self.procs[i].kill()
        self.procs[i].wait(10)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.fixture(scope="module")
def workers(rpc_server_binary):
    w = Workers(rpc_server_binary)
    yield w
    w.close()


PROMPTS = ["Name three colours.", "Write a Python function that reverses a string."]


def _generate(model: Path, prompt: str, *extra: str) -> dict:
    out = subprocess.run([str(BRIDGE), "generate", str(model), "--chat", "--temp", "0",
                          "-n", str(N), "--threads", "1", "-c", "1024", "--exact", "--json",
                          "-p", prompt, *extra], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_generate_over_rpc_matches_local(smollm2_gguf, workers, prompt):
    # --exact on both sides: a row's logits do not depend on its batch, so the answer over
    # two workers, drafting by lookup every step, must be plain local decoding's, token
    # for token (README: "What identical means")
    local = _generate(smollm2_gguf, prompt, "--no-draft")
    remote = _generate(smollm2_gguf, prompt, "--rpc", workers.arg, "--drafter", "lookup",
                       "--fixed-gamma", "--draft-max", "4")
    assert remote["tokens"] == local["tokens"], (remote["text"], local["text"])
    assert remote["stats"]["n_steps"] > 0


def _serve(model: Path, rpc_arg: str):
    import httpx

    port = _free_port()
    proc = subprocess.Popen([str(BRIDGE), "serve", str(model), "--port", str(port),
                             "--threads", "1", "-c", "1024", "--exact", "--rpc", rpc_arg],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    _wait_health(url, proc, 200)
    return proc, url, httpx.Client(base_url=url, timeout=120)


def _wait_health(url: str, proc: subprocess.Popen, status: int, timeout: float = 120) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"bridge serve exited {proc.returncode}"
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == status:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"/health did not answer {status} within {timeout} s")


def _chat(client, prompt: str, **kw):
    return client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": prompt}], "temperature": 0,
        "max_tokens": N, **kw})


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err
    return err


@pytest.mark.server
@pytest.mark.slow
def test_serve_over_rpc_matches_local_and_survives_a_killed_worker(smollm2_gguf,
                                                                   rpc_server_binary):
    w = Workers(rpc_server_binary)  # its own: one of them is killed
    proc, url, client = _serve(smollm2_gguf, w.arg)
    try:
        r = _chat(client, PROMPTS[0])
        assert r.status_code == 200, r.text
        local = _generate(smollm2_gguf, PROMPTS[0], "--no-draft")
        assert r.json()["choices"][0]["message"]["content"] == local["text"]

        # kill a worker while an answer streams: that request ends with an error object
        # naming the worker, and the server keeps answering
        events = []
        with client.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                "temperature": 0, "max_tokens": 900, "stream": True}) as s:
            for line in s.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                events.append(json.loads(line[6:]))
                if len(events) == 3:
                    w.kill(1)
        assert "error" in events[-1], events[-3:]
        err = events[-1]["error"]
        assert f"127.0.0.1:{w.ports[1]}" in err["message"], err
        assert err["code"] == "rpc_worker_lost" and "\n" not in err["message"]

        down = _wait_health(url, proc, 503, timeout=60)
        assert f"127.0.0.1:{w.ports[1]}" in down["error"]
        r = _chat(client, PROMPTS[0])
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"

        # the worker comes back on its port: the server recovers by itself
        w.procs[1] = w.start(w.ports[1])
        _wait_health(url, proc, 200)
        r = _chat(client, PROMPTS[0])
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == local["text"]
    finally:
        client.close()
        err = _stop(proc)
        w.close()
    assert f"Error: RPC worker 127.0.0.1:{w.ports[1]} stopped answering" in err


@pytest.mark.slow
def test_generate_with_a_killed_worker_ends_in_one_line(smollm2_gguf, rpc_server_binary):
    w = Workers(rpc_server_binary)
    try:
        proc = subprocess.Popen([str(BRIDGE), "generate", str(smollm2_gguf), "--chat",
                                 "--temp", "0", "-n", "2000", "--threads", "1", "--no-draft",
                                 "--rpc", w.arg, "-p", "Write a long story about a dragon."],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.read(20)  # the answer is streaming: the workers are in use
        w.kill(0)
        _, err = proc.communicate(timeout=120)
    finally:
        w.close()
    from bridge.run_cli import EXIT_RPC_LOST

    assert proc.returncode == EXIT_RPC_LOST
    lines = err.decode().strip().splitlines()
    assert lines[-1].startswith(f"Error: RPC worker 127.0.0.1:{w.ports[0]} stopped answering")
    assert not any("Traceback" in ln or "#0 " in ln for ln in lines), err


def test_an_rpc_build_without_a_gpu_is_not_a_gpu_machine():
    """llama.cpp says "GPU offload supported" for any build with the RPC backend; the
    export's --prune auto must still take the CPU verify profile on a CPU-only machine."""
    import llama_cpp

    from exporters import autoprune
    from runtime.native import gpu_offload_supported, local_accelerators

    if local_accelerators():
        assert gpu_offload_supported() and autoprune.default_profile() == "gpu"
        return
    if rpc.rpc_supported():  # the case this guards: the flag alone says yes
        assert llama_cpp.llama_supports_gpu_offload()
    assert not gpu_offload_supported()
    assert autoprune.default_profile() == "cpu"
