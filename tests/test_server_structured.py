"""Structured output through a real `bridge serve`: the `openai` client's `.parse()` with a
Pydantic model, `json_object`, llama-server's `grammar`, logprobs (whole and streamed), and
a 400 for every constraint or field bridge cannot honour."""

from __future__ import annotations

import json
from typing import Literal

import pytest

from tests.test_server import _start, _stop

pytest.importorskip("fastapi", reason="bridge serve needs the serve extra")
openai = pytest.importorskip("openai", reason="the server tests need the dev extra")
httpx = pytest.importorskip("httpx", reason="the server tests need the dev extra")
pydantic = pytest.importorskip("pydantic")
jsonschema = pytest.importorskip("jsonschema", reason="schema checks need the dev extra")

pytestmark = pytest.mark.slow

USER = [{"role": "user", "content": "Extract the person: Bob Lee, 41, a guest."}]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    age: int = pydantic.Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]


@pytest.fixture(scope="module")
def server(smollm2_gguf, smollm2_draft_gguf):
    proc, url, _ = _start(smollm2_gguf, smollm2_draft_gguf)
    yield url
    assert _stop(proc) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("temp", [0.0, 1.0])
def test_openai_parse_with_a_pydantic_model(client, temp):
    r = client.beta.chat.completions.parse(model=client.models.list().data[0].id,
                                           messages=USER, response_format=Person,
                                           temperature=temp, seed=7, max_tokens=100)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person), r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    # forced text was drafted as its own source and shows in timings
    assert "grammar" in r.model_extra["timings"]["sources"]


def test_json_object_and_llama_server_fields(server, client):
    model = client.models.list().data[0].id
    r = client.chat.completions.create(model=model, messages=USER, temperature=0,
                                       max_tokens=150,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = Person.model_json_schema()
    body = {"messages": USER, "temperature": 0, "max_tokens": 100, "json_schema": schema}
    out = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120).json()
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), schema)
    body = {"prompt": "Is water wet? Answer:", "temperature": 0, "max_tokens": 10,
            "grammar": 'root ::= " yes" | " no"'}
    out = httpx.post(f"{server}/v1/completions", json=body, timeout=120).json()
    assert out["choices"][0]["text"] in (" yes", " no")


def test_logprobs_whole_and_streamed_agree(client):
    model = client.models.list().data[0].id
    kw = {"model": model, "messages": USER, "temperature": 0, "max_tokens": 100,
          "response_format": {"type": "json_schema", "json_schema": {
              "name": "person", "strict": True, "schema": Person.model_json_schema()}},
          "logprobs": True, "top_logprobs": 3}
    whole = client.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) <= 3
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy: the top one
    streamed = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    s_content = [t for c in streamed if c.choices[0].logprobs
                 for t in c.choices[0].logprobs.content]
    assert [t.token for t in s_content] == [t.token for t in content]
    assert [t.logprob for t in s_content] == pytest.approx([t.logprob for t in content],
                                                           abs=1e-3)


def test_completions_logprobs(server):
    body = {"prompt": "The capital of France is", "temperature": 0, "max_tokens": 5,
            "logprobs": 2}
    out = httpx.post(f"{server}/v1/completions", json=body, timeout=120).json()
    lp = out["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    assert len(lp["token_logprobs"]) == len(lp["tokens"]) == len(lp["top_logprobs"])
    assert all(len(t) <= 2 for t in lp["top_logprobs"])


MSG = [{"role": "user", "content": "hi"}]
BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": 7}}}}}},
     "JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"grammar": 'root ::= "a'}, "grammar"),
    ({"grammar": "  "}, "empty"),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}},
     "one of response_format, json_schema and grammar"),
    ({"json_schema": "nope"}, "json_schema"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    # tools are honoured now, but not together with another constraint
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "response_format": {"type": "json_object"}}, "tools cannot be combined"),
    ({"functions": [{"name": "f"}]}, "functions"),  # OpenAI's deprecated form: refused
    ({"typical_p": 0.5}, "typical_p"),
]


@pytest.mark.parametrize("extra, words", BAD)
def test_bad_constraints_and_unhonoured_fields_get_a_400(server, extra, words):
    r = httpx.post(f"{server}/v1/chat/completions", timeout=60,
                   json={"messages": MSG, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in f"{err['message']} {err['param']}", err
    assert httpx.get(f"{server}/health", timeout=5).json() == {"status": "ok"}


def test_langchain_structured_output_and_json_mode(server, client):
    """LangChain's default structured output (json_schema since langchain-openai 0.3) and
    its json_mode (json_object)."""
    lc = pytest.importorskip("langchain_openai", reason="optional: pip install langchain-openai")
    llm = lc.ChatOpenAI(base_url=f"{server}/v1", api_key="unused", temperature=0,
                        max_tokens=100, max_retries=0,
                        model=client.models.list().data[0].id)
    person = llm.with_structured_output(Person).invoke(USER[0]["content"])
    assert isinstance(person, Person)
    data = llm.with_structured_output(None, method="json_mode").invoke(
        "Answer in JSON with a key 'colour': what colour is the sky?")
    assert isinstance(data, dict)
