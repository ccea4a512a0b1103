"""Answers that end (issue 34): how many structured and tool-call answers end within
``max_tokens`` and validate, with and without a loop-breaking penalty.

    python -m bench.endings --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
        [--settings none,dry,freq] [--seeds 4] [--threads 2]

Starts ``bridge serve`` from this checkout and asks it with the ``openai`` client, as a
user's code would:
- **structured**: 12 extraction schemas as pydantic models write them (no length limits:
  the loops a grammar allows are possible), ``response_format: json_schema``,
  ``max_tokens`` 300, greedy and ``--seeds`` seeds at temperature 1.0. Counted: answers
  that ended (``finish_reason`` stop) and validate with ``jsonschema``.
- **tools**: 6 tasks, ``tool_choice: required``, parallel calls allowed (OpenAI's
  default), ``max_tokens`` 200, greedy and the seeds at 1.0. Counted: answers that ended
  (``tool_calls``) with every call valid, answers holding template markup in ``content``,
  and answers repeating a call (same name and arguments).

Each setting is the same requests with the penalty fields added; one server serves all.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench.common import (
    BRIDGE,
    ROOT,
    arg_parser,
    cpu_facts,
    free_port,
    openai_client,
    schema_valid,
    start_server,
    stop_server,
)

STR, INT, NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}


def _obj(**props) -> dict:
    return {"type": "object", "properties": props, "required": list(props),
            "additionalProperties": False}


def _arr(item: dict) -> dict:
    return {"type": "array", "items": item}


SCHEMAS = [
    ("person", _obj(name=STR, age=INT, email=STR, city=STR),
     "Extract the person: Maria Lopez, 29, lives in Madrid; write to maria@example.com."),
    ("invoice", _obj(number=STR, customer=STR, line_items=_arr(_obj(
        description=STR, quantity=INT, unit_price=NUM)), total=NUM),
     "Extract the invoice: INV-0042 for Acme Corp: 2 chairs at 40.00 and 1 desk at "
     "170.00, total 250.00."),
    ("address", _obj(street=STR, city=STR, postal_code=STR, country=STR),
     "Extract the address: 12 Rue de Rivoli, 75001 Paris, France."),
    ("event", _obj(title=STR, date=STR, location=STR, attendees=_arr(STR)),
     "Extract the event: Team offsite on 2026-03-14 in Lisbon with Ana, Ben and Chloe."),
    ("product", _obj(name=STR, price=NUM, currency=STR, tags=_arr(STR)),
     "Extract the product: The AeroPress Go costs 39.95 EUR; tags: coffee, travel."),
    ("log", _obj(date=STR, level={"enum": ["DEBUG", "INFO", "WARN", "ERROR"]},
                 service=STR, code=INT, message=STR),
     "Parse this log line: 2026-11-30 ERROR payments 503 upstream timeout after 30s"),
    ("sentiment", _obj(sentiment={"enum": ["positive", "negative", "neutral"]},
                       confidence=NUM),
     "Classify the sentiment: The battery lasts all day and the screen is gorgeous."),
    ("order", _obj(customer=STR, items=_arr(_obj(product=STR, quantity=INT))),
     "Extract the order: Dana Scott ordered 2 notebooks, 1 stapler and 10 pens."),
    ("recipe", _obj(title=STR, servings=INT, ingredients=_arr(STR)),
     "Extract the recipe: Pancakes for 4: flour, milk, two eggs, butter."),
    ("movie", _obj(title=STR, year=INT, director=STR, cast=_arr(STR)),
     "Extract the movie: Alien (1979), directed by Ridley Scott, with Sigourney Weaver "
     "and Tom Skerritt."),
    ("meeting", _obj(topic=STR, start=STR, duration_minutes=INT, participants=_arr(STR)),
     "Extract the meeting: budget review at 10:00 for 45 minutes with Raj and Mei."),
    ("contacts", _obj(contacts=_arr(_obj(name=STR, phone=STR))),
     "Extract the contacts: Ann 555-0101, Bob 555-0102."),
]

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": _obj(city=STR)}},
    {"type": "function", "function": {
        "name": "send_email", "description": "Send an email",
        "parameters": _obj(to=STR, subject=STR, body=STR)}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web",
        "parameters": _obj(query=STR)}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers", "parameters": _obj(a=NUM, b=NUM)}},
]
TOOL_TASKS = [
    "What is the weather in Paris?",
    "Email bob@example.com that the meeting moved to 3pm.",
    "Search the web for the tallest building in Europe.",
    "Add 17 and 25.",
    "What is the weather in Rome and in Oslo?",
    "Email the team at team@example.com a summary: release is on Friday.",
]
MARKUP = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", '{"name"')

SETTINGS = {
    "none": {},
    "dry": {"dry_multiplier": 0.8},
    # DRY's default breakers (\n : " *) cut every JSON answer into pieces too short to
    # count: with only \n, a repeat across keys and strings is seen
    "dry-nl": {"dry_multiplier": 0.8, "dry_sequence_breakers": ["\n"]},
    "freq": {"frequency_penalty": 0.5},
    "dry+freq": {"dry_multiplier": 0.8, "frequency_penalty": 0.3},
}


def structured(client, model: str, extra: dict, temps: list[tuple[float, int | None]]
               ) -> dict:
    ended = ok = total = 0
    for name, schema, prompt in SCHEMAS:
        for temp, seed in temps:
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}],
                temperature=temp, seed=seed, max_tokens=300,
                response_format={"type": "json_schema", "json_schema": {
                    "name": name, "schema": schema, "strict": True}},
                extra_body=extra)
            c = r.choices[0]
            total += 1
            ended += c.finish_reason == "stop"
            try:
                ok += c.finish_reason == "stop" and schema_valid(json.loads(c.message.content),
                                                                 schema)
            except ValueError:
                pass
    return {"answers": total, "ended": ended, "ended+valid": ok}


def tools(client, model: str, extra: dict, temps: list[tuple[float, int | None]]) -> dict:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    total = ended_ok = markup = repeats = 0
    for task in TOOL_TASKS:
        for temp, seed in temps:
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": task}], tools=TOOLS,
                tool_choice="required", temperature=temp, seed=seed, max_tokens=200,
                extra_body=extra)
            c = r.choices[0]
            total += 1
            calls = c.message.tool_calls or []
            seen = [(k.function.name, json.loads(k.function.arguments)) for k in calls]
            keys = [json.dumps(s, sort_keys=True) for s in seen]
            repeats += len(keys) != len(set(keys))
            markup += any(m in (c.message.content or "") for m in MARKUP)
            ended_ok += c.finish_reason == "tool_calls" and bool(calls) and all(
                schema_valid(a, schemas.get(n)) for n, a in seen)
    return {"answers": total, "ended+valid": ended_ok, "markup": markup,
            "repeated a call": repeats}


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--settings", default="none,dry,freq,dry+freq",
                    help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument("--seeds", type=int, default=4, help="sampled answers at temperature 1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bridge-args", default="", help="appended to bridge serve's command")
    a = ap.parse_args(argv)
    names = a.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        sys.exit(f"unknown setting {unknown[0]!r}: choose from {', '.join(SETTINGS)}")
    port = free_port()
    argv = [*BRIDGE, "serve", str(a.model), "--host", "127.0.0.1", "--port", str(port),
            "--threads", str(a.threads), *a.bridge_args.split()]
    proc = start_server(argv, port, "bridge serve")
    try:
        client = openai_client(port)
        model = client.models.list().data[0].id
        cpu, flags = cpu_facts()
        print(f"# {cpu}; {', '.join(flags) or 'no avx2/avx512/amx'}; {a.threads} threads; "
              f"{a.model.name}; {ROOT.name} at {time.strftime('%Y-%m-%d %H:%M')}")
        print("| setting | temperature | structured ended+valid | tools ended+valid | "
              "tools with markup | tools repeating a call |")
        print("|---|---|---:|---:|---:|---:|")
        for name in names:
            for label, temps in (("0", [(0.0, None)]),
                                 ("1.0", [(1.0, s) for s in range(1, a.seeds + 1)])):
                s = structured(client, model, SETTINGS[name], temps)
                t = tools(client, model, SETTINGS[name], temps)
                print(f"| {name} | {label} | {s['ended+valid']}/{s['answers']} | "
                      f"{t['ended+valid']}/{t['answers']} | {t['markup']} | "
                      f"{t['repeated a call']} |", flush=True)
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
