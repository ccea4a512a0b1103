"""An agent workload through `bridge serve`: sessions of tool calls and tool results.

    python -m bench.agent MODEL.gguf [--sessions 3] [-n 96]
        [--threads 1] [--md OUT.md]

Each session is a coding agent's loop over one file: the user asks for a change, the
agent reads the file, writes it back edited (the whole file again, as agents do), runs the
tests and reports; then a second request on the same file. That is 8 model turns per
session. The history an agent sends is scripted (the calls and results are fixed), so
every server answers exactly the same requests; what each server generates at each turn
(a call under ``required`` or a named tool, text after a result) is what is measured.

Servers, all up at once and each request sent to every one in turn so they share the
machine's noise:
- plain: ``--drafter none``;
- lookup, memory off: ``--drafter lookup --no-shared-drafts``;
- lookup, memory on, no forced text: ``--drafter lookup --no-forced-drafts``;
- lookup, memory on: ``--drafter lookup`` (later sessions draft from earlier ones; the
  text the tools' grammar forces is drafted too);
- lookup forced, memory on: ``--fixed-gamma --draft-max 8`` (drafts every step, so its
  tokens per step show what the sources offer even where the controller declines them).
Reported per server: tokens per target step ((predicted_n - 1) / n_steps summed), decode
tokens/s, the speedup against plain, and how many calls parsed and validated.
Every server decodes calls under the tools' grammar; only the drafting differs.
"""

from __future__ import annotations

import json
import time
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
from runtime.bench import cpu_summary

TOOLS = [
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the project",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                       "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "write_file", "description": "Replace a file's whole content",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"]}}},
    {"type": "function", "function": {
        "name": "run_tests", "description": "Run the project's tests",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                       "required": ["path"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

FILES = {
    "calc.py": ("def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n\n\n"
                "def div(a, b):\n    return a / b\n",
                ("return a - b", "return a + b"), "The add function subtracts. Fix it."),
    "text.py": ("def shout(s):\n    return s.lower() + '!'\n\n\ndef whisper(s):\n"
                "    return s.lower() + '...'\n", ("s.lower() + '!'", "s.upper() + '!'"),
                "shout() should upper-case its text. Fix it."),
    "stats.py": ("def mean(xs):\n    return sum(xs) / (len(xs) - 1)\n\n\ndef total(xs):\n"
                 "    return sum(xs)\n", ("(len(xs) - 1)", "len(xs)"),
                 "mean() divides by the wrong count. Fix it."),
}


def _call(i: int, name: str, args: dict) -> dict:
    return {"id": f"call_{i}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}


def session(path: str) -> list[tuple[list[dict], str | dict]]:
    """The requests of one session: (messages, tool_choice) per model turn."""
    text, (old, new), ask = FILES[path]
    fixed = text.replace(old, new)
    documented = fixed.replace("\n", '\n    """Documented."""\n', 1)
    msgs: list[dict] = [{"role": "system", "content": "You are a coding agent."}]
    turns: list[tuple[list[dict], str | dict]] = []

    def named(n: str) -> dict:
        return {"type": "function", "function": {"name": n}}

    k = 0
    for request, before, after in ((ask, text, fixed),
                                   (f"Add a docstring to the first function in {path}.",
                                    fixed, documented)):
        msgs.append({"role": "user", "content": request})
        for name, args, result, choice in (
                ("read_file", {"path": path}, before, "required"),
                ("write_file", {"path": path, "content": after}, "written", named("write_file")),
                ("run_tests", {"path": path}, "3 passed in 0.01s", named("run_tests"))):
            turns.append((list(msgs), choice))
            msgs.append({"role": "assistant", "content": None,
                         "tool_calls": [_call(k, name, args)]})
            msgs.append({"role": "tool", "tool_call_id": f"call_{k}", "content": result})
            k += 1
        turns.append((list(msgs), "auto"))  # the report after the tests
        msgs.append({"role": "assistant", "content": "Done: the tests pass."})
    return turns


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("model", type=Path)
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("-n", type=int, default=96, help="max tokens per answer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-c", type=int, default=4096)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    modes = {"plain": ["--drafter", "none"],
             "lookup, memory off": ["--drafter", "lookup", "--no-shared-drafts"],
             "lookup, memory on, no forced text": ["--drafter", "lookup",
                                                   "--no-forced-drafts"],
             "lookup, memory on": ["--drafter", "lookup"],
             # always drafting: what the sources could give where a step's cost allows
             "lookup forced (γ 8), memory on": ["--drafter", "lookup", "--fixed-gamma",
                                                "--draft-max", "8"]}
    servers = {}
    try:
        for name, extra in modes.items():
            port = free_port()
            cmd = [*BRIDGE, "serve", str(args.model), "--port", str(port),
                   "--threads", str(args.threads), "-c", str(args.c), *extra]
            servers[name] = (start_server(cmd, port, name), openai_client(port))
        totals = {m: {"tokens": 0, "steps": 0, "ms": 0.0, "calls": 0, "valid": 0,
                      "answers": 0, "asked": 0} for m in modes}
        paths = list(FILES)[:args.sessions]
        t0 = time.monotonic()
        for path in paths:
            for messages, choice in session(path):
                for name, (_, client) in servers.items():
                    r = client.chat.completions.create(
                        model=args.model.name, messages=messages, tools=TOOLS,
                        tool_choice=choice, temperature=0, max_tokens=args.n)
                    t, tot = r.model_extra["timings"], totals[name]
                    tot["tokens"] += max(0, t["predicted_n"] - 1)
                    tot["steps"] += t["n_steps"]
                    tot["ms"] += t["predicted_ms"]
                    tot["answers"] += 1
                    tot["asked"] += choice != "auto"
                    for c in r.choices[0].message.tool_calls or ():
                        tot["calls"] += 1
                        tot["valid"] += json_valid(c.function.arguments,
                                                   SCHEMAS.get(c.function.name))
        wall = time.monotonic() - t0
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    lines = agent_report(totals, paths, args, wall)
    print("\n".join(lines))
    if args.md:
        args.md.write_text("\n".join(lines) + "\n")


def agent_report(totals: dict, paths: list[str], args, wall: float) -> list[str]:
    plain = totals["plain"]
    plain_tps = plain["tokens"] / (plain["ms"] / 1e3) if plain["ms"] else 0.0
    lines = [f"# Agent workload: {args.model.name}", "",
             f"CPU: {cpu_summary()}", "",
             f"`python -m bench.agent {args.model.name} --sessions {len(paths)} -n {args.n} "
             f"--threads {args.threads}`: {len(paths)} sessions x 8 model turns (a call under "
             "`required` or a named tool, or a report after the test results), the same "
             "scripted history sent to every server in turn, greedy. Tokens per target "
             "step = (predicted_n - 1) / n_steps summed over requests; tok/s = decode "
             f"tokens / decode time. Wall time for the whole run: {wall:.0f} s.", "",
             "| server | answers | tokens | tokens / target step | decode tok/s | vs plain "
             "| calls asked for | calls returned, valid |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, t in totals.items():
        tps = t["tokens"] / (t["ms"] / 1e3) if t["ms"] else 0.0
        per_step = t["tokens"] / t["steps"] if t["steps"] else 0.0
        lines.append(f"| {name} | {t['answers']} | {t['tokens']} | {per_step:.2f} | "
                     f"{tps:.1f} | {tps / plain_tps if plain_tps else 0:.2f}x | "
                     f"{t['asked']} | {t['calls']}, {t['valid']} valid |")
    lines += ["", "Every server decodes calls under the tools' grammar, so a call names a "
              "listed tool and its arguments follow that tool's schema; 'calls returned, "
              "valid' re-checks them with jsonschema. 'no forced text' drafts lookups and "
              "the memory but not the text the grammar forces."]
    return lines


if __name__ == "__main__":
    main()
