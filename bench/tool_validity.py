"""How often `bridge serve` answers a `required` or named tool call with a valid call.

    python -m bench.tool_validity MODEL.gguf [--per-temp 100] [--threads 1]

Sends ``--per-temp`` requests at temperature 0 and as many at 1.0 (prompts about 10 cities
and 10 pairs of numbers, tool_choice ``required``, ``get_weather`` or ``add``, two earlier
calls in the history) and counts the answers that hold a call, and how many of those calls
parse and validate against their tool's schema with ``jsonschema`` (the server returns
only such calls; anything else comes back as text).
"""

from __future__ import annotations

from pathlib import Path

from bench.common import (
    BRIDGE,
    arg_parser,
    free_port,
    json_valid,
    openai_client,
    start_server,
    stop_server,
)

# the tools and the agent history: tests/test_server_tools.py asks with them too
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
        "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
# an agent's earlier turns: SmolLM2 (135M) follows their pattern. Without the constraint
# engine of issue 26 its calls are valid only when it copies such a pattern.
SHOT = [
    {"role": "user", "content": "Add 1 and 2."},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_0", "type": "function",
        "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
    {"role": "tool", "tool_call_id": "call_0", "content": "3"},
    {"role": "assistant", "content": "1 plus 2 is 3."},
    {"role": "user", "content": "What is the weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "5 C"},
    {"role": "assistant", "content": "It is 5 C in Oslo."},
]
CITIES = ["Paris", "Rome", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Dublin", "Seoul",
          "Perth"]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def requests(n: int) -> list[tuple[str, str | dict]]:
    out = []
    for i in range(n):
        named = {"type": "function", "function": {"name": ("get_weather", "add")[i % 2]}}
        choice = "required" if i % 3 == 0 else named
        prompt = f"What is the weather in {CITIES[i % 10]}?" if i % 2 == 0 else \
            f"Add {i} and {3 * i + 1}."
        out.append((prompt, choice))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("model", type=Path)
    ap.add_argument("--per-temp", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    port = free_port()
    proc = start_server([*BRIDGE, "serve", str(args.model), "--port", str(port),
                         "--threads", str(args.threads), "-c", "2048"], port, "bridge serve")
    client = openai_client(port)
    try:
        for temp in (0.0, 1.0):
            answers = calls = valid = 0
            no_call: dict[str, int] = {}  # finish_reason of answers that hold no call
            for seed, (prompt, choice) in enumerate(requests(args.per_temp)):
                r = client.chat.completions.create(
                    model=args.model.name, messages=SHOT + [{"role": "user", "content": prompt}],
                    tools=TOOLS, tool_choice=choice, temperature=temp, seed=seed, max_tokens=48)
                answers += 1
                if not r.choices[0].message.tool_calls:
                    why = r.choices[0].finish_reason
                    no_call[why] = no_call.get(why, 0) + 1
                for c in r.choices[0].message.tool_calls or ():
                    calls += 1
                    named = isinstance(choice, str) or c.function.name == choice["function"]["name"]
                    valid += named and json_valid(c.function.arguments,
                                                  SCHEMAS.get(c.function.name))
            print(f"temperature {temp}: {answers} answers, {calls} calls returned, "
                  f"{valid} valid ({100 * valid / max(calls, 1):.0f}% of calls, "
                  f"{100 * valid / answers:.0f}% of answers); answers without a call, by "
                  f"finish_reason: {no_call or 'none'}")
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
