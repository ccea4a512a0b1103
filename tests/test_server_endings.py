"""Answers that end (issue 34), through a real `bridge serve` and the official `openai`
client's helpers, as an agent framework calls a local server: `.parse()` with
`pydantic_function_tool` and with a pydantic `response_format`, and the streaming helper's
`get_final_completion()` with tools, parallel calls allowed (OpenAI's default). Each of
them raised `LengthFinishReasonError` when the small model looped."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.endings import SCHEMAS
from tests.test_server_parallel import _start, _stop

openai = pytest.importorskip("openai", reason="the server tests need the dev extra")
pydantic = pytest.importorskip("pydantic")
jsonschema = pytest.importorskip("jsonschema", reason="schema checks need the dev extra")

pytestmark = pytest.mark.slow

# the setting docs/sampling.md recommends for small models
RECOMMENDED = {"frequency_penalty": 0.5}


class GetWeather(pydantic.BaseModel):
    """Current weather in a city."""
    city: str


class SendEmail(pydantic.BaseModel):
    """Send an email."""
    to: str
    subject: str
    body: str


class LineItem(pydantic.BaseModel):
    description: str
    quantity: int
    unit_price: float


class Invoice(pydantic.BaseModel):
    number: str
    customer: str
    line_items: list[LineItem]
    total: float


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    """Twelve sequences, so that the extractions below run side by side in one batch (a
    greedy answer beside others equals the answer alone: tests/test_server_parallel.py)."""
    proc, url = _start(smollm2_gguf, "--parallel", str(len(SCHEMAS)))
    yield url
    assert _stop(proc) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _no_repeats(calls) -> None:
    keys = [(c.function.name, json.dumps(json.loads(c.function.arguments), sort_keys=True))
            for c in calls]
    assert len(keys) == len(set(keys)), keys


@pytest.mark.parametrize("temp, seed", [(0.0, None), (1.0, 3)])
def test_parse_with_pydantic_function_tools_ends_with_its_calls(client, model, temp, seed):
    """`required`, parallel calls allowed, the recommended setting (as a user following
    docs/sampling.md sends it): the answer ends when its calls are done, and every call
    parses into its pydantic model."""
    tools = [openai.pydantic_function_tool(GetWeather),
             openai.pydantic_function_tool(SendEmail)]
    for task in ("What is the weather in Rome and in Oslo?",
                 "Email bob@example.com that the meeting moved to 3pm."):
        r = client.beta.chat.completions.parse(
            model=model, messages=_user(task), tools=tools, tool_choice="required",
            temperature=temp, seed=seed, max_tokens=200, extra_body=RECOMMENDED)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c
        assert c.message.content in (None, "")
        assert c.message.tool_calls
        for call in c.message.tool_calls:
            assert isinstance(call.function.parsed_arguments, (GetWeather, SendEmail))
        _no_repeats(c.message.tool_calls)


def test_streaming_helper_with_tools_gets_a_final_completion(client, model):
    """`client.chat.completions.stream(..., tools=...)` then `get_final_completion()`:
    no `LengthFinishReasonError`, the same calls as the whole answer. (Without a penalty
    this email's body loops inside its string until max_tokens: the recommended setting
    is what ends it.)"""
    tools = [openai.pydantic_function_tool(SendEmail)]
    kw = dict(model=model, messages=_user("Email the team at team@example.com a summary: "
                                          "release is on Friday."),
              tools=tools, tool_choice="required", temperature=0, max_tokens=200,
              extra_body=RECOMMENDED)
    whole = client.chat.completions.create(**kw).choices[0]
    with client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == whole.finish_reason == "tool_calls"
    assert [c.function.arguments for c in final.message.tool_calls] == \
        [c.function.arguments for c in whole.message.tool_calls]
    assert isinstance(final.message.tool_calls[0].function.parsed_arguments, SendEmail)
    _no_repeats(final.message.tool_calls)


def test_parse_with_a_pydantic_response_format_and_the_recommended_penalty(client, model):
    r = client.beta.chat.completions.parse(
        model=model, response_format=Invoice, temperature=0, max_tokens=300,
        messages=_user("Extract the invoice: INV-0042 for Acme Corp: 2 chairs at 40.00 "
                       "and 1 desk at 170.00, total 250.00."),
        extra_body=RECOMMENDED)
    assert isinstance(r.choices[0].message.parsed, Invoice)
    assert r.choices[0].finish_reason == "stop"


def test_recommended_penalty_ends_more_extractions(client, model):
    """The 12 extraction schemas of `bench.endings` (no length limits), greedy, 200
    tokens (the longest answer that ends takes about 100): with the recommended setting,
    more answers end within max_tokens and validate than without it (12 against 7 on
    this project's AVX-512 Xeon, 11 with its AVX2-only build: a run-on string that never
    repeats is no loop a penalty sees; `python -m bench.endings` has the figures)."""
    def ended_valid(extra: dict) -> list[str]:
        def one(name, schema, prompt) -> bool:
            c = client.chat.completions.create(
                model=model, messages=_user(prompt), temperature=0, max_tokens=200,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": name, "schema": schema}},
                extra_body=extra).choices[0]
            try:
                jsonschema.validate(json.loads(c.message.content), schema)
            except (ValueError, jsonschema.ValidationError):
                return False
            return c.finish_reason == "stop"

        with ThreadPoolExecutor(len(SCHEMAS)) as pool:
            ended = list(pool.map(lambda case: one(*case), SCHEMAS))
        return [name for (name, _, _), ok in zip(SCHEMAS, ended, strict=True) if ok]

    with_penalty, without = ended_valid(RECOMMENDED), ended_valid({})
    print(f"ended and valid of {len(SCHEMAS)}: {len(with_penalty)} with the recommended "
          f"setting, {len(without)} without")
    assert len(with_penalty) > len(without), (with_penalty, without)
