"""`bridge serve` end to end: a real server subprocess on SmolLM2, driven by the official
`openai` client (and raw httpx for the errors a client library would refuse to send)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="bridge serve needs the serve extra")
pytest.importorskip("sse_starlette", reason="bridge serve needs the serve extra")
openai = pytest.importorskip("openai", reason="the server tests need the dev extra")
httpx = pytest.importorskip("httpx", reason="the server tests need the dev extra")

pytestmark = pytest.mark.slow

from tests.serving import BRIDGE, start_serve  # noqa: E402
from tests.serving import stop_serve as _stop  # noqa: E402  (other tests import it)

N = 24  # tokens per answer: enough to compare text, short on a 2-core CPU
CTX = 1024
PROMPT = "What is the capital of France? Answer in one sentence."
PROMPTS = [
    "Name three colours.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Give one tip for learning Python.",
]


def _start(model: Path, draft: Path, *extra: str, env: dict | None = None,
           log: Path | None = None):
    """(process, url, port) of a `bridge serve` that always drafts (--fixed-gamma), so the
    tests see speculation even where it does not pay."""
    return start_serve(model, "--draft", draft, "--threads", "1", "-c", CTX, "--fixed-gamma",
                       "--draft-max", "4", *extra, env=env, log=log)


@pytest.fixture(scope="module")
def server(smollm2_gguf, smollm2_draft_gguf):
    proc, url, _ = _start(smollm2_gguf, smollm2_draft_gguf)
    yield url
    assert _stop(proc) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_id(smollm2_gguf) -> str:
    return smollm2_gguf.name


def _generate(model: Path, draft: Path, prompt: str, *extra: str) -> str:
    """`bridge generate --chat --temp 0`: the reference answer."""
    out = subprocess.run([str(BRIDGE), "generate", str(model), "--draft", str(draft),
                          "--chat", "--temp", "0", "-n", str(N), "--threads", "1",
                          "-c", str(CTX), "--json", "-p", prompt, *extra],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["text"]


def _ask(client, model_id: str, prompt: str, **kw):
    kw.setdefault("max_tokens", N)
    return client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": prompt}], temperature=0, **kw)


def _stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_greedy_chat_matches_bridge_generate(client, model_id, smollm2_gguf,
                                             smollm2_draft_gguf):
    want = _generate(smollm2_gguf, smollm2_draft_gguf, PROMPT)
    r = _ask(client, model_id, PROMPT)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= N and r.usage.prompt_tokens > 5
    t = r.model_extra["timings"]
    for key in ("prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms",
                "predicted_per_second", "draft_n", "draft_n_accepted", "mode", "sources"):
        assert key in t, key
    assert t["mode"].startswith("speculative") and t["draft_n"] > 0, t
    text, chunks = _stream_text(_ask(client, model_id, PROMPT, stream=True))
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].model_extra["timings"]["predicted_n"] == r.usage.completion_tokens
    # target steps: the first token comes with the prompt, each later step is one batch
    assert t["n_steps"] >= 1 and t["tokens_per_step"] == pytest.approx(
        (t["predicted_n"] - 1) / t["n_steps"], abs=1e-3)


def test_penalties_and_dry_through_the_api_match_bridge_generate(
        client, model_id, smollm2_gguf, smollm2_draft_gguf):
    """OpenAI's penalties and llama-server's DRY fields are honoured: the same answer as
    `bridge generate` with the same flags, streamed or not, and not the unpenalized one."""
    prompt = "Write the word 'yes' twenty times, separated by spaces."
    want = _generate(smollm2_gguf, smollm2_draft_gguf, prompt, "--frequency-penalty",
                     "0.4", "--presence-penalty", "0.2", "--dry-multiplier", "0.8")
    kw = dict(frequency_penalty=0.4, presence_penalty=0.2,
              extra_body={"dry_multiplier": 0.8})
    r = _ask(client, model_id, prompt, **kw)
    assert r.choices[0].message.content == want
    assert _stream_text(_ask(client, model_id, prompt, stream=True, **kw))[0] == want
    assert _ask(client, model_id, prompt).choices[0].message.content != want


def test_completions_stream_and_whole_agree(client, model_id):
    kw = dict(model=model_id, prompt="The three primary colours are", temperature=0,
              max_tokens=N)
    whole = client.completions.create(**kw)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == N
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True)
                       if c.choices)
    assert streamed == whole.choices[0].text and streamed.strip()


def test_models_and_model_name_forms(client, model_id):
    assert [m.id for m in client.models.list().data] == [model_id]
    for name in (model_id, model_id.removesuffix(".gguf")):
        assert _ask(client, name, "Hi", max_completion_tokens=2).usage.completion_tokens <= 2


def test_concurrent_streams_each_get_their_own_answer(client, model_id):
    want = {p: _ask(client, model_id, p).choices[0].message.content for p in PROMPTS}
    got: dict[str, str] = {}

    def run(prompt: str) -> None:
        got[prompt] = _stream_text(_ask(client, model_id, prompt, stream=True))[0]

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == want


def test_disconnect_mid_stream_then_next_request_is_served(server, client, model_id):
    want = _ask(client, model_id, PROMPT).choices[0].message.content
    # up to 900 tokens: half a minute of work on one thread, were it not stopped (prompt +
    # max_tokens must fit the context: 1000 would be refused with a 400)
    body = {"model": model_id, "stream": True, "temperature": 0, "max_tokens": 900,
            "messages": [{"role": "user", "content": "Tell me a very long story."}]}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(4):
            next(line for line in lines if line.startswith("data:"))
    start = time.monotonic()
    assert _ask(client, model_id, "Hi", max_tokens=1).choices[0].message.content
    assert time.monotonic() - start < 8  # the abandoned story did not hold the model
    assert _ask(client, model_id, PROMPT).choices[0].message.content == want
    # a client that stops waiting for a whole (non-streamed) answer cancels it too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/chat/completions", json={**body, "stream": False},
                   timeout=1)
    start = time.monotonic()
    assert _ask(client, model_id, "Hi", max_tokens=1).choices[0].message.content
    assert time.monotonic() - start < 8


def test_follow_up_turn_evaluates_only_its_new_tokens(client, model_id):
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 20},
                {"role": "user", "content": PROMPT}]
    first = client.chat.completions.create(model=model_id, messages=messages, temperature=0,
                                           max_tokens=N)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And of Spain?"}]
    second = client.chat.completions.create(model=model_id, messages=messages, temperature=0,
                                            max_tokens=N)
    t = second.model_extra["timings"]
    # the new user message plus the template's markup around it; the rest was cached
    assert t["prompt_n"] <= 20
    assert t["prompt_n"] + t["cache_n"] == second.usage.prompt_tokens
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


def test_speculative_override(client, model_id):
    r = _ask(client, model_id, PROMPT, extra_body={"speculative": {"n_max": 2}})
    assert r.choices[0].message.content


def test_stats_endpoint_and_return_tokens(server, client, model_id):
    s = httpx.get(f"{server}/stats", timeout=10).json()
    assert s["model"] == model_id and s["requests_served"] >= 0
    # the fixture server drafts with --drafter auto: lookup, memory and the pruned draft
    assert s["sources"] == ["lookup", "memory", "pruned"]
    mem = s["memory"]
    assert mem["enabled"] and mem["max_tokens"] == 1_000_000 and mem["file"] is None
    assert 0 <= mem["tokens"] <= mem["max_tokens"] and mem["bytes"] >= 0
    r = client.completions.create(model=model_id, prompt="One, two, three,", temperature=0,
                                  max_tokens=6, extra_body={"return_tokens": True})
    ids = r.choices[0].model_extra["tokens"]
    assert len(ids) == r.usage.completion_tokens == 6
    chunks = list(client.completions.create(model=model_id, prompt="One, two, three,",
                                            temperature=0, max_tokens=6, stream=True,
                                            extra_body={"return_tokens": True}))
    assert [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("tokens", [])
            ] == ids


LONG = "word " * (CTX + 100)
BAD = [
    # (endpoint, body as sent, status, what the message or param must name)
    ("chat/completions", b"{not json", 400, "JSON"),
    ("chat/completions", {"model": "m"}, 400, "messages"),
    ("chat/completions", {"messages": "hello"}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "temperature": "hot"}, 400, "temperature"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "model": "gpt-4"}, 400, "model"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "temperature": -1}, 400, "--temp"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "top_p": 2}, 400, "--top-p"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "presence_penalty": 500}, 400, "presence-penalty"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "frequency_penalty": "lots"}, 400, "frequency_penalty"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "dry_multiplier": 0.8, "dry_base": 0.5}, 400, "dry-base"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "dry_multiplier": 0.8, "dry_sequence_breakers": [""]}, 400,
     "dry-sequence-breaker"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "speculative": {"n_max": 0}}, 400, "draft-max"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "speculative": {"n_min": 2}}, 400, "speculative"),
    ("chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400,
     "user message"),
    ("chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "context"),
    # the same prompt streamed: still an HTTP error, not a broken stream
    ("chat/completions", {"messages": [{"role": "user", "content": LONG}], "stream": True},
     400, "context"),
    ("completions", {"prompt": LONG}, 400, "context"),
    ("completions", {"prompt": 42}, 400, "prompt"),
    ("completions", {"prompt": [1, 2, 10**9]}, 400, "token ids"),
    ("completions", {"prompt": "Hi", "echo": True}, 400, "echo"),
    ("completions", {}, 400, "prompt"),
]


@pytest.mark.parametrize("endpoint, body, status, names", BAD)
def test_bad_input_gets_an_openai_error_and_the_server_stays_up(server, endpoint, body,
                                                                status, names):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server}/v1/{endpoint}", timeout=60,
                   headers={"content-type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert names in f"{err['message']} {err['param']}"
    assert httpx.get(f"{server}/health", timeout=5).json() == {"status": "ok"}


@pytest.mark.server
def test_api_key_and_clean_sigterm(smollm2_gguf, smollm2_draft_gguf, model_id):
    proc, url, port = _start(smollm2_gguf, smollm2_draft_gguf,
                             env={"BRIDGE_API_KEY": "sesame"})
    try:
        assert httpx.get(f"{url}/health").status_code == 200  # open for health checks
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            r = httpx.get(f"{url}/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert _ask(client, model_id, "Hi", max_tokens=2).choices[0].message.content
        # SIGTERM with a stream in flight: the stream ends, the process exits 0, quickly
        stream = _ask(client, model_id, "Tell me a very long story.", stream=True,
                      max_tokens=400)
        next(iter(stream))
        start = time.monotonic()
        assert _stop(proc) == 0
        assert time.monotonic() - start < 10
        with pytest.raises(openai.APIError, match="shutting down"):
            list(stream)  # the stream ends with an error event rather than hanging
    finally:
        if proc.poll() is None:
            proc.kill()
    # the port is free again: a new server can listen on it (closed connections may
    # linger in TIME_WAIT, which SO_REUSEADDR, as servers set it, allows)
    socket.create_server(("127.0.0.1", port)).close()
