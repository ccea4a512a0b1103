"""`bridge serve --parallel N` end to end: several clients at once on one server process
(SmolLM2), through the official `openai` client and raw httpx."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="bridge serve needs the serve extra")
openai = pytest.importorskip("openai", reason="the server tests need the dev extra")
httpx = pytest.importorskip("httpx", reason="the server tests need the dev extra")
parser = pytest.importorskip("prometheus_client.parser",
                             reason="the metrics test needs the dev extra")

pytestmark = pytest.mark.slow

from tests.serving import BRIDGE, start_serve  # noqa: E402
from tests.serving import stop_serve as _stop  # noqa: E402  (other tests import it)

PROMPTS = ["Name three colours.", "Write a haiku about the sea.", "What is 12 times 12?",
           "Give one tip for learning Python."]


def _start(model: Path, *extra: str):
    """(process, url) of `bridge serve MODEL --threads 1 -c 1024 EXTRA...`."""
    return start_serve(model, "--threads", "1", "-c", "1024", *extra)[:2]


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    proc, url = _start(smollm2_gguf, "--parallel", "3")
    yield url
    assert _stop(proc) == 0


@pytest.fixture(scope="module")
def client(server, smollm2_gguf):
    c = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    c.model_id = smollm2_gguf.name
    return c


def _ask(client, prompt: str, **kw):
    kw.setdefault("max_tokens", 24)
    return client.chat.completions.create(
        model=client.model_id, messages=[{"role": "user", "content": prompt}],
        temperature=0, **kw)


def _together(fns) -> list:
    out: list = [None] * len(fns)

    def run(i):
        out[i] = fns[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return out


def test_concurrent_answers_equal_each_alone(client, smollm2_gguf):
    """Concurrent answers (rounds shared by several sequences) against each request alone:
    identical, or first different where the full model's top-2 margin is within twice
    the bound measured on this machine for sequences in shared rounds (bitwise equal on
    the machines measured so far, with the default stream per sequence)."""
    from runtime.chat import ChatSession
    from runtime.engine import Engine
    from tests.exactness import same_or_near_tie, shared_bound

    def ask(p):
        r = _ask(client, p, extra_body={"return_tokens": True})
        return r.choices[0].model_extra["tokens"]

    alone = [ask(p) for p in PROMPTS]
    together = _together([lambda p=p: ask(p) for p in PROMPTS])
    if together == alone:
        return
    bound = shared_bound(smollm2_gguf)
    with Engine(smollm2_gguf, draft=None) as engine:
        session = ChatSession(engine)
        for p, got, want in zip(PROMPTS, together, alone, strict=True):
            ids = session.render([{"role": "user", "content": p}])
            same_or_near_tie(engine.model, ids, got, want, bound)


def test_requests_overlap_and_timings_say_so(client, server):
    """Three requests at once take about the time of one, not three: they share rounds."""
    def decode_seconds() -> float:
        fams = {f.name: f for f in parser.text_string_to_metric_families(
            httpx.get(f"{server}/metrics").text)}
        return fams["bridge_batch_decode_seconds"].samples[0].value

    decode0 = decode_seconds()
    results = _together([lambda p=p: _ask(client, p, max_tokens=32) for p in PROMPTS[:3]])
    rows = [r.model_extra["timings"] for r in results]
    assert all(r.choices[0].message.content for r in results)
    stats = httpx.get(f"{server}/stats").json()
    assert stats["parallel"] == 3 and len(stats["slots"]) == 3
    metrics = httpx.get(f"{server}/metrics").text
    fams = {f.name: f for f in parser.text_string_to_metric_families(metrics)}
    rounds = fams["bridge_batch_rounds"].samples[0].value
    batch_rows = fams["bridge_batch_rows"].samples[0].value
    assert batch_rows > rounds  # some rounds held several sequences
    # llama_decode's share of the rounds: some time, and no more than the rounds took
    decode = decode_seconds() - decode0  # these three requests' rounds
    assert 0 < decode < sum(t["predicted_ms"] + t["prompt_ms"] for t in rows) / 1000
    assert all("n_steps" in t for t in rows)


def test_metrics_parse_and_count(client, server):
    before = {f.name: f for f in parser.text_string_to_metric_families(
        httpx.get(f"{server}/metrics").text)}
    r = _ask(client, PROMPTS[0], max_tokens=8)
    after = {f.name: f for f in parser.text_string_to_metric_families(
        httpx.get(f"{server}/metrics").text)}
    # prometheus_client's parser drops a counter's _total suffix from the family name
    grew = after["llamacpp:tokens_predicted"].samples[0].value - \
        before["llamacpp:tokens_predicted"].samples[0].value
    assert grew == r.usage.completion_tokens
    assert after["llamacpp:requests_processing"].samples[0].value == 0
    assert after["bridge_parallel_sequences"].samples[0].value == 3
    assert "bridge_drafted_tokens" in after and "llamacpp:prompt_tokens" in after


def test_a_disconnected_stream_frees_its_sequence(client, server):
    body = {"model": client.model_id, "stream": True, "temperature": 0,
            "max_tokens": 600, "messages": [{"role": "user", "content": "Tell a long story."}]}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data:"))
        busy = [s["cached_tokens"] for s in httpx.get(f"{server}/stats").json()["slots"]]
        assert max(busy) > 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = httpx.get(f"{server}/stats").json()
        if stats["requests_processing"] == 0:
            break
        time.sleep(0.1)
    # the slot that served the story holds nothing; a finished answer's slot may keep its
    # conversation (the prompt cache), but none holds 600 tokens of a cancelled story
    cached = [s["cached_tokens"] for s in stats["slots"]]
    assert 0 in cached and max(cached) < 100
    assert _ask(client, "Hi", max_tokens=2).choices[0].message.content


def test_each_request_keeps_its_own_format_under_concurrency(client):
    schema = {"type": "object", "properties": {"colour": {"type": "string"}},
              "required": ["colour"], "additionalProperties": False}
    js, lp, st = _together([
        lambda: _ask(client, "Name a colour.", max_tokens=30, response_format={
            "type": "json_schema", "json_schema": {"name": "c", "schema": schema}}),
        lambda: _ask(client, "Say hello.", max_tokens=8, logprobs=True, top_logprobs=2),
        lambda: _ask(client, "Count from 1 to 10 with commas.", max_tokens=40, stop=["5"]),
    ])
    assert "colour" in json.loads(js.choices[0].message.content)
    entries = lp.choices[0].logprobs.content
    assert len(entries) == lp.usage.completion_tokens and len(entries[0].top_logprobs) == 2
    assert "5" not in st.choices[0].message.content
    assert st.choices[0].finish_reason == "stop"


@pytest.mark.server
def test_max_queue_answers_503_with_retry_after(smollm2_gguf):
    proc, url = _start(smollm2_gguf, "--parallel", "1", "--max-queue", "0")
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        body = {"model": model, "stream": True, "temperature": 0, "max_tokens": 300,
                "messages": [{"role": "user", "content": "Tell a long story."}]}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the stream (a cancel)
            next(line for line in lines if line.startswith("data:"))
            busy = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
                **body, "stream": False, "max_tokens": 4})
        assert busy.status_code == 503
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "server_busy"
        ok = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                        json={**body, "stream": False, "max_tokens": 4})
        assert ok.status_code == 200  # a free sequence again: served
    finally:
        assert _stop(proc) == 0


@pytest.mark.parametrize("argv, message", [
    (["--parallel", "0"], "--parallel must be in 1..256"),
    (["--parallel", "2", "--exact"], "--parallel 1"),
    (["--max-queue", "-1"], "--max-queue must be >= 0"),
    (["--cache-ram", "-2"], "--cache-ram must be >= -1"),
    (["--parallel", "1", "--cache-ram", "512"], "drop --cache-ram or raise --parallel"),
])
def test_bad_options_get_one_line(smollm2_gguf, argv, message):
    out = subprocess.run([str(BRIDGE), "serve", str(smollm2_gguf), "--port", "0", *argv],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr
