"""The pure parts of the bench package: percentiles, inter-token gaps, what a sweep cell adds
up to, the SSE reader, the table and the server presets; and bench.common's helpers, with a
tiny stand-in server (Python's http.server) where one is started. No model: the stream is
served by httpx's mock transport."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from bench.common import (
    ROOT,
    ServerError,
    arg_parser,
    checkout_env,
    cpu_facts,
    cpu_slug,
    free_port,
    json_valid,
    percentile,
    rss_mib,
    start_server,
    stop_server,
)
from bench.concurrency import (
    ServerSettings,
    client_bodies,
    parse_args,
    per_client_count,
    preset_argv,
    workload,
)
from bench.loadgen import RequestResult, itl_gaps, stream_chat, summarize
from bench.report import format_table


@pytest.mark.parametrize("values, q, expected", [
    ([], 50, None),                      # no requests completed: no figure, not a crash
    ([7.0], 95, 7.0),                    # one value is every percentile
    ([4.0, 1.0, 3.0, 2.0], 50, 2.5),     # unsorted input; even count interpolates
    ([float(i) for i in range(1, 101)], 95, 95.05),  # numpy's default (linear)
    ([1.0, 2.0], 0, 1.0),
    ([1.0, 2.0], 100, 2.0),
])
def test_percentile(values, q, expected):
    got = percentile(values, q)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_percentile_refuses_q_out_of_range():
    with pytest.raises(ValueError, match="0..100"):
        percentile([1.0], 101)


@pytest.mark.parametrize("times, gaps", [
    ([], []),
    ([1.0], []),                          # one chunk: a first token, no gap
    ([1.0, 1.5, 1.75], [0.5, 0.25]),
])
def test_itl_gaps(times, gaps):
    assert itl_gaps(times) == pytest.approx(gaps)


def result(client, start, chunks, tokens, end, timings=None, error=None) -> RequestResult:
    return RequestResult(client, start, end, chunks, tokens, timings, error)


def test_summarize_pools_streams_and_counts_errors():
    steps = {"predicted_n": 5, "n_steps": 2, "draft_n": 4, "draft_n_accepted": 2}
    rs = [result(0, 0.0, [0.5, 0.6, 0.8], 5, 1.0, steps),
          result(1, 0.2, [1.2, 1.3], 3, 2.0, {"predicted_n": 3, "n_steps": 2}),
          result(1, 2.0, [], 0, 4.0, error="ReadTimeout: timed out")]
    s = summarize([rs])
    assert s["wall_s"] == pytest.approx(4.0)          # first start 0.0 to last end 4.0
    assert s["tok_s"] == pytest.approx(8 / 4.0)       # failed requests add no tokens
    assert (s["completed"], s["errors"]) == (2, 1)
    assert s["first_error"].startswith("ReadTimeout")
    assert s["ttft_p50"] == pytest.approx(0.75)       # 0.5 and 1.0
    # gaps 0.1, 0.2 and 0.1 pooled across streams
    assert s["itl_p50"] == pytest.approx(0.1)
    assert s["tokens_per_step"] == pytest.approx((4 + 2) / (2 + 2))
    assert s["timings"] == {"predicted_n": 8, "n_steps": 4, "draft_n": 4,
                            "draft_n_accepted": 2}


def test_summarize_sums_rounds_and_keeps_each_rate():
    one = [result(0, 0.0, [0.5], 10, 1.0)]
    two = [result(0, 10.0, [10.5], 10, 12.0)]
    s = summarize([one, two])
    assert s["tok_s"] == pytest.approx(20 / 3.0)
    assert s["tok_s_rounds"] == pytest.approx([10.0, 5.0])
    assert "tokens_per_step" not in s and s["timings"] == {}  # no timings: left out


def sse(*events: dict | str) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode()
                    for e in events)


@pytest.mark.parametrize("status, body, error", [
    (200, sse({"choices": [{"delta": {"role": "assistant"}}]},
              {"choices": [{"delta": {"content": "Hi"}}]},
              {"choices": [{"delta": {"content": " there"}}]},
              {"choices": [{"delta": {}, "finish_reason": "stop"}],
               "timings": {"predicted_n": 2, "n_steps": 1}},
              {"choices": [], "usage": {"completion_tokens": 2}}, "[DONE]"), None),
    (500, b'{"error": "boom"}', "HTTP 500"),
    (200, sse({"error": {"message": "the server is shutting down"}}), "error event"),
    (200, sse({"choices": [{"delta": {"content": "Hi"}}]}), "without data: [DONE]"),
])
def test_stream_chat_reads_sse(status, body, error):
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    with httpx.Client(transport=transport) as http:
        res = stream_chat(http, "http://127.0.0.1:1/v1", {"messages": []}, 3, timeout=5)
    assert res.client == 3 and res.end >= res.start
    if error:
        assert res.error and error in res.error
        return
    assert res.error is None
    assert len(res.chunk_times) == 2 and res.tokens == 2  # role and finish chunks: no content
    assert res.timings == {"predicted_n": 2, "n_steps": 1}


def row(server, clients, tok_s, ttft, errors=0):
    return {"server": server, "clients": clients, "requests": 4, "completed": 4 - errors,
            "errors": errors, "first_error": "HTTP 503: busy" if errors else None,
            "tok_s": tok_s, "tok_s_rounds": [tok_s], "ttft_p50": ttft, "ttft_p95": ttft,
            "itl_p50": 0.02, "itl_p95": 0.03, "timings": {}}


def test_format_table_ratios_within_a_client_count():
    rows = [row("bridge", 1, 50.0, 0.2), row("llama-server", 1, 100.0, 0.1),
            row("bridge", 4, 60.0, 2.0), row("llama-server", 4, 90.0, 0.5, errors=1)]
    lines = format_table(rows, "bridge")
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:6]]
    assert cells[0][:6] == ["1", "bridge", "4/4", "0", "50.0", "1.00x"]
    assert cells[1][5] == "2.00x" and cells[1][8] == "0.50x"    # vs bridge at 1 client
    assert cells[3][5] == "1.50x" and cells[3][8] == "0.25x"    # vs bridge at 4 clients
    assert cells[3][9:11] == ["20.0", "30.0"] and cells[3][11] == "-"  # ITL in ms, no steps
    assert lines[-1] == "- 4 clients, llama-server: 1 of 4 failed; first: HTTP 503: busy"


def test_format_table_without_baseline_leaves_ratios_out():
    lines = format_table([row("a", 1, 10.0, None)], "missing")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[5] == cells[6] == cells[8] == "-"  # both ratios, and no TTFT at all


SETTINGS = ServerSettings(Path("m.gguf"), 2, 8192, Path("/v/bridge"), Path("/b/llama-server"),
                          ("--api-key", "k"), ("--seed", "1"))


@pytest.mark.parametrize("name, clients, expected", [
    ("bridge", 4, ["/v/bridge", "serve", "m.gguf", "--host", "127.0.0.1", "--port", "9",
                   "--threads", "2", "-c", "8192", "--api-key", "k"]),
    ("bridge-p1", 4, ["/v/bridge", "serve", "m.gguf", "--host", "127.0.0.1", "--port", "9",
                      "--threads", "2", "-c", "8192", "--parallel", "1", "--api-key", "k"]),
    ("bridge-plain", 1, ["/v/bridge", "serve", "m.gguf", "--host", "127.0.0.1", "--port",
                         "9", "--threads", "2", "-c", "8192", "--drafter", "none",
                         "--api-key", "k"]),
    ("llama-server", 16, ["/b/llama-server", "-m", "m.gguf", "--host", "127.0.0.1", "--port",
                          "9", "-t", "2", "-c", "8192", "--seed", "1"]),
    # -np follows the client count
    ("llama-server-np", 16, ["/b/llama-server", "-m", "m.gguf", "--host", "127.0.0.1",
                             "--port", "9", "-t", "2", "-c", "8192", "-np", "16", "-kvu",
                             "--seed", "1"]),
])
def test_preset_argv(name, clients, expected):
    assert preset_argv(name, SETTINGS, 9, clients) == expected
    assert per_client_count(name) == (name == "llama-server-np")


def test_preset_argv_needs_a_llama_server():
    s = ServerSettings(Path("m.gguf"), 2, 8192, Path("/v/bridge"))
    with pytest.raises(ValueError, match="llama-server binary"):
        preset_argv("llama-server", s, 9, 1)


def test_client_bodies_offset_per_client():
    bodies = client_bodies(["a", "b", "c"], clients=2, requests=2, model="m", n=8, extra={})
    asked = [[b["messages"][0]["content"] for b in bs] for bs in bodies]
    assert asked == [["a", "c"], ["b", "a"]]  # (client + request * clients) % prompts
    assert bodies[0][0]["temperature"] == 0 and bodies[0][0]["max_tokens"] == 8
    assert bodies[0][0]["stream_options"] == {"include_usage": True}


def test_workloads_and_arguments():
    assert len(workload("copy")) == 24 and len(workload("open")) >= 24
    with pytest.raises(ValueError, match="unknown --set"):
        workload("nope")
    args = parse_args(["--model", "m.gguf", "--servers", "bridge,llama-server-np",
                       "--clients", "1,4", "--bridge-args", "--drafter lookup"])
    assert args.clients == [1, 4] and args.bridge_args == ["--drafter", "lookup"]
    with pytest.raises(SystemExit):
        parse_args(["--model", "m.gguf", "--servers", "bridge,vllm"])


def test_machine_facts():
    name, flags = cpu_facts()
    # the flags that choose llama.cpp's kernels, and only those
    assert name and all(f == "avx2" or f.startswith(("avx512", "amx")) for f in flags)
    assert list(flags) == sorted(flags)
    assert 0 < free_port() < 65536
    assert rss_mib(os.getpid()) > 1 and 0 < rss_mib(os.getpid(), "RssAnon") <= rss_mib(
        os.getpid())
    assert rss_mib(2**22 + 12345) is None  # no such process (pid_max is at most 2**22)


@pytest.mark.parametrize("cpu, slug", [
    ("AMD EPYC 7B13", "amd-epyc-7b13"),
    ("Intel(R) Xeon(R) Processor @ 2.60GHz", "intel-xeon-processor"),
    ("Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz", "intel-core-i7-8650u"),
])
def test_cpu_slug(cpu, slug):
    assert cpu_slug(cpu) == slug


@pytest.mark.parametrize("text, schema, ok", [
    ('{"a": 1}', {"type": "object", "required": ["a"]}, True),
    ('{"b": 1}', {"type": "object", "required": ["a"]}, False),
    ('{"a": 1', {"type": "object"}, False),        # cut off: not JSON
    (None, {"type": "object"}, False),              # no content at all
    ('{"a": 1}', None, False),                      # a tool the request did not offer
])
def test_json_valid(text, schema, ok):
    pytest.importorskip("jsonschema")
    assert json_valid(text, schema) is ok


def test_checkout_env_puts_this_checkout_first():
    env = checkout_env({"PYTHONPATH": "/elsewhere", "X": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"] and env["X"] == "1"
    assert checkout_env({})["PYTHONPATH"] == str(ROOT)


def test_arg_parser_names_the_command():
    ap = arg_parser("bench.serve", "What serving costs.\n\n    python -m bench.serve ...")
    assert ap.prog == "python -m bench.serve" and ap.description == "What serving costs."


def http_server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


@pytest.mark.parametrize("health_path", ["/", None])  # an HTTP answer, or a TCP connection
def test_start_and_stop_a_server(tmp_path, health_path):
    port = free_port()
    proc = start_server(http_server(port), port, "http.server", health_path=health_path,
                        timeout=60, log_path=tmp_path / "log")
    assert proc.poll() is None
    assert stop_server(proc, 10, signal.SIGTERM) == -signal.SIGTERM and proc.poll() is not None
    assert stop_server(proc) == -signal.SIGTERM  # already stopped: its code, no signal


def test_a_server_that_exits_says_why(tmp_path):
    argv = [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"]
    with pytest.raises(ServerError, match=r"(?s)exited 3 before answering.*no model here"):
        start_server(argv, free_port(), "fake", timeout=60, log_path=tmp_path / "log")


def test_a_server_that_never_answers_is_stopped(tmp_path):
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(ServerError, match="did not answer on port"):
        start_server(argv, free_port(), "silent", timeout=1, log_path=tmp_path / "log")
