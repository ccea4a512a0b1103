"""How often `bridge serve` answers a `required` or named tool call with a valid call.

    .venv/bin/python scripts/tool_validity.py MODEL.gguf [--per-temp 100] [--threads 1]

Sends ``--per-temp`` requests at temperature 0 and as many at 1.0 (prompts about 10 cities
and 10 pairs of numbers, tool_choice ``required``, ``get_weather`` or ``add``, two earlier
calls in the history) and counts the answers that hold a call, and how many of those calls
parse and validate against their tool's schema with ``jsonschema`` (the server returns
only such calls; anything else comes back as text).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jsonschema
import openai
from bench_serve import free_port, start, stop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_server_tools import SHOT, TOOLS  # noqa: E402 - the tests' tools and history

BIN = Path(sys.executable).parent
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--per-temp", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    port = free_port()
    proc = start([str(BIN / "bridge"), "serve", str(args.model), "--port", str(port),
                  "--threads", str(args.threads), "-c", "2048"], port, "bridge serve")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                           max_retries=0)
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
                    try:
                        jsonschema.validate(json.loads(c.function.arguments),
                                            SCHEMAS[c.function.name])
                        ok = isinstance(choice, str) or \
                            c.function.name == choice["function"]["name"]
                        valid += ok
                    except (ValueError, jsonschema.ValidationError):
                        pass
            print(f"temperature {temp}: {answers} answers, {calls} calls returned, "
                  f"{valid} valid ({100 * valid / max(calls, 1):.0f}% of calls, "
                  f"{100 * valid / answers:.0f}% of answers); answers without a call, by "
                  f"finish_reason: {no_call or 'none'}")
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
