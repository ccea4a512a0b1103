"""The grammar a tool call must match, for the constraint engine: llguidance's Lark, with
each call's JSON given as a JSON schema (``%json``)."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.tools import ToolFormat, ToolSpec


def call_grammar(fmt: ToolFormat, spec: ToolSpec) -> str:
    """llguidance's Lark grammar for an answer that may or must call ``spec``'s tools.

    A call is the format's envelope around a JSON object whose ``name`` is one of the
    allowed functions and whose arguments validate against that function's schema. Under
    ``required`` or a named function the answer is the call(s); under ``auto`` it is any
    text that does not open a call, then optionally the call(s): once the model writes the
    opening marker, the rest is constrained. ``parallel_tool_calls`` false allows one call.

    The server decodes every answer that may call tools under this grammar
    (``ConstraintSpec("gbnf", CallReading.grammar)``, through the constraint engine of
    structured output, whose GBNF reader takes Lark too), so each call is constrained
    from its opening marker to its end, not only opened: the envelope, a known name and
    arguments that follow the tool's schema, and the grammar drafter drafts the fixed
    text (envelope, name, keys) for free. What a grammar cannot say, that an answer's
    calls are all different, is the stop rule's (``runtime.tool_reading
    .RepeatedCallStop``).
    """
    names = [spec.forced_name] if spec.forced_name else \
        [t["function"]["name"] for t in spec.tools]
    alts = [{"type": "object", "properties": {"name": {"const": n},
                                              fmt.args_key: spec.schema(n)},
             "required": ["name", fmt.args_key], "additionalProperties": False}
            for n in names]
    body = dict(alts[0]) if len(alts) == 1 else {"anyOf": alts}
    # one layout, json.dumps's (as issue 26's constraints use): whitespace cannot eat the
    # answer's tokens, and every separator is forced text
    body["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ",
                          "key_separator": ": "}
    rules = [f"call: %json {json.dumps(body)}"]
    nl = json.dumps("\n")
    if fmt.is_list:
        many = ' (", " call)*' if spec.parallel else ""
        rest = f'"[" call{many} "]"'
    elif fmt.keep_start:
        rest = ""  # llama3: one call, the whole answer
    else:
        rules.append(f"one: {json.dumps(fmt.start + chr(10))} call {json.dumps(chr(10) + fmt.end)}")
        rest = f"call {json.dumps(chr(10) + fmt.end)}" + (f" ({nl} one)*" if spec.parallel else "")
    opener = json.dumps(fmt.start + ("" if fmt.is_list else "\n"))
    if spec.choice != "auto":
        start = "start: call" if fmt.keep_start else f"start: {opener} {rest}"
        return "\n".join([start, *rules]) + "\n"
    if fmt.at_start:  # text is anything that does not open with "{"
        text = r"TEXT: /([^{\s](.|\n)*)?/"
        return "\n".join(["start: TEXT | call", text, *rules]) + "\n"
    # TEXT holds no marker; PRE is text up to the first marker. One lexeme ends exactly at
    # the marker, so the JSON after it is constrained (a greedy TEXT would run past the
    # marker's first characters and fail)
    any_, mark = r"(.|\n)*", re.escape(fmt.start)
    opener_re = mark + ("" if fmt.is_list else r"\n")
    return "\n".join([
        "start: TEXT | PRE " + rest,
        f"TEXT: /{any_}/ & ~/{any_}{mark}{any_}/",
        f"PRE: /{any_}{opener_re}/ & ~/{any_}{mark}{any_}{mark}{any_}/",
        *rules]) + "\n"
