"""Tool calls: which format a model writes them in, what a request asks (its tools, checked)
and how tools reach its prompt.

The format is read from the chat template's text, never from a file name:
- ``hermes`` (Hermes, Qwen 2.5/3): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n
  </tool_call>``, one block per call;
- ``llama3`` (Llama 3.1-3.3): the answer is ``{"name": ..., "parameters": {...}}``
  (after ``<|python_tag|>`` when the model writes that as text);
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``;
- ``generic``, for every template that does not take ``tools`` (SmolLM2's, Gemma's):
  bridge writes the tool definitions into the system message and asks for Hermes-style
  blocks, and renders earlier calls and results as plain message text (see README).

A native template gets ``tools`` and the tool messages as llama.cpp's Jinja path passes
them (OpenAI's shapes, with each call's ``arguments`` as an object). The generic format
puts everything in message contents, so all of it is tokenized as text: only the template
writes control tokens. A native template writes tool definitions and call arguments as its
own markup, so those must not hold control-token text (``ChatRenderer.render`` refuses
them).

Reading an answer back as calls (the parser, the grammar's hook and the stop rule that
ends an answer of calls) is ``runtime.tool_reading``'s.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names
CHOICES = ("none", "auto", "required")


class ToolError(ValueError):
    """A request's tools are malformed; ``param`` names the field at fault."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class ToolFormat:
    """How one family of templates writes a call.

    Args:
        name: ``hermes``, ``llama3``, ``mistral`` or ``generic``.
        native: the template renders ``tools`` itself (else bridge writes them).
        start: the text that opens a call (``llama3``: ``{`` at the answer's start).
        end: the text that closes one; empty: the call runs to the end of the answer.
        args_key: the key holding the arguments in the call's JSON object.
        at_start: a call can only open the answer (``llama3``).
        keep_start: ``start`` is part of the call's JSON (``llama3``'s ``{``).
        is_list: the calls come as one JSON list (``mistral``).
        lead: markup that may come before a call's ``start`` (``llama3``'s
            ``<|python_tag|>``, when a model writes it as text).
    """

    name: str
    native: bool
    start: str
    end: str = ""
    args_key: str = "arguments"
    at_start: bool = False
    keep_start: bool = False
    is_list: bool = False
    lead: str = ""

    @property
    def markers(self) -> tuple[str, ...]:
        """The format's markup: text an answer's content never shows."""
        return tuple(m for m in (self.lead, "" if self.keep_start else self.start,
                                 self.end) if m)

    def call_text(self, name: str, arguments: dict) -> str:
        """One call written as the model writes it (Qwen's template's layout)."""
        body = json.dumps({"name": name, self.args_key: arguments}, ensure_ascii=False)
        if self.is_list:
            return f"{self.start}[{body}]"
        return body if self.keep_start else f"{self.start}\n{body}\n{self.end}"

    def prefill(self, name: str | None) -> str:
        """The answer's forced opening under ``required`` (``name`` None) or a named
        function: the model then writes only the name, or only the arguments."""
        head = "" if self.keep_start else self.start + ("[" if self.is_list else "\n")
        if name is None:
            return head + '{"name": "'
        return head + json.dumps({"name": name})[:-1] + f', "{self.args_key}": '


HERMES = ToolFormat("hermes", True, "<tool_call>", "</tool_call>")
LLAMA3 = ToolFormat("llama3", True, "{", args_key="parameters", at_start=True,
                    keep_start=True, lead="<|python_tag|>")
MISTRAL = ToolFormat("mistral", True, "[TOOL_CALLS]", is_list=True)
GENERIC = ToolFormat("generic", False, "<tool_call>", "</tool_call>")


def detect(template: str | None) -> ToolFormat:
    """The tool-call format a chat template's text shows; ``generic`` when the template
    does not render ``tools`` (its own format, written down in README)."""
    t = template or ""
    takes_tools = re.search(r"\btools\b", t) is not None
    if not takes_tools:
        return GENERIC
    if "<tool_call>" in t:
        return HERMES
    if "[TOOL_CALLS]" in t:
        return MISTRAL
    if "<|python_tag|>" in t or ('"parameters"' in t and "ipython" in t):
        return LLAMA3
    log.info("the chat template takes tools in a format bridge does not know; using the "
             "generic format")
    return GENERIC


# -- the request's tools ----------------------------------------------------------------

@dataclass(frozen=True)
class ToolSpec:
    """What a request asks: its tools (OpenAI's ``{"type": "function", "function":
    {...}}`` objects, validated), ``choice`` (``none``, ``auto``, ``required`` or a
    function's name) and whether several calls may come at once."""

    tools: tuple[dict, ...] = ()
    choice: str = "auto"
    parallel: bool = True

    def __post_init__(self) -> None:
        names = {t["function"]["name"] for t in self.tools}
        if self.choice not in CHOICES and self.choice not in names:
            raise ToolError("tool_choice", f"names function {self.choice!r}, which is not "
                             f"in tools ({', '.join(sorted(names)) or 'none given'})")
        if self.choice == "required" and not self.tools:
            raise ToolError("tool_choice", "'required' needs tools")

    @property
    def active(self) -> bool:
        """Whether the answer may be (or must be) a call."""
        return bool(self.tools) and self.choice != "none"

    @property
    def forced_name(self) -> str | None:
        return self.choice if self.choice not in CHOICES else None

    @property
    def required(self) -> bool:
        return self.active and self.choice != "auto"

    def schema(self, name: str) -> dict:
        for t in self.tools:
            if t["function"]["name"] == name:
                return t["function"].get("parameters") or {"type": "object"}
        raise KeyError(name)


def check_tools(tools: list) -> tuple[dict, ...]:
    """``tools`` validated: each a function with a name and a JSON schema as parameters.

    Raises:
        ToolError: naming the field at fault.
    """
    from jsonschema import SchemaError, validators

    out, seen = [], set()
    for i, t in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(t, dict) or t.get("type", "function") != "function" \
                or not isinstance(t.get("function"), dict):
            raise ToolError(where, "each tool must be {\"type\": \"function\", "
                                    "\"function\": {...}}")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ToolError(f"{where}.function.name", "a function name must be 1-64 "
                             f"letters, digits, '_', '.' or '-', got {name!r}")
        if name in seen:
            raise ToolError(f"{where}.function.name", f"two tools are named {name!r}")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        try:
            if not isinstance(params, dict):
                raise SchemaError(f"must be an object, got {type(params).__name__}")
            validators.validator_for(params).check_schema(params)
        except SchemaError as e:
            raise ToolError(f"{where}.function.parameters",
                             f"not a valid JSON schema: {e.message}") from None
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolError(f"{where}.function.description", "must be a string")
        out.append({"type": "function", "function": {
            "name": name, **({"description": desc} if desc else {}), "parameters": params}})
    return tuple(out)


# -- rendering -------------------------------------------------------------------------

def generic_system(tools: tuple[dict, ...], parallel: bool) -> str:
    """The generic format's system text: one line per tool, its description and the shape
    of a call with each argument's type. A small model shown whole JSON schemas copies
    them as its arguments (SmolLM2 did, every time); the schema itself is enforced by
    the call's constraint, not by the prompt."""
    lines = "\n".join(f"- {_signature(t['function'])}" for t in tools)
    many = "You may call several, one block each. " if parallel else ""
    return ("You can call these functions:\n"
            f"{lines}\n"
            "To call one, answer with exactly\n<tool_call>\n"
            '{"name": "<function name>", "arguments": {<arguments>}}\n'
            f"</tool_call>\n{many}Results come back in <tool_response> blocks.")


def _signature(fn: dict) -> str:
    """``name: description. Call: {"name": ..., "arguments": {"x": <type, ...>}}``"""
    params = fn.get("parameters") or {}
    required = set(params.get("required") or ())
    args = []
    for key, p in (params.get("properties") or {}).items():
        p = p if isinstance(p, dict) else {}
        kind = " or ".join(json.dumps(v) for v in p["enum"]) if "enum" in p else \
            str(p.get("type", "any"))
        notes = [kind] + ([] if key in required else ["optional"]) + \
            ([p["description"]] if isinstance(p.get("description"), str) else [])
        args.append(f'"{key}": <{", ".join(notes)}>')
    call = json.dumps({"name": fn["name"]})[:-1] + ', "arguments": {' + ", ".join(args) + "}}"
    desc = fn.get("description", "").strip().rstrip(".")
    return f"{fn['name']}: {desc + '. ' if desc else ''}Call: {call}"


def prepare(fmt: ToolFormat, messages: list[dict], spec: ToolSpec
            ) -> tuple[list[dict], list[dict] | None]:
    """The messages to render and the ``tools`` to pass the template (None: none).

    Tools are rendered under ``tool_choice: "none"`` too (as OpenAI and llama-server do):
    an agent's next request then extends the same prompt, so the prompt cache holds.

    ``messages`` are OpenAI-shaped dicts (``role``, ``content`` text, and for assistants
    ``tool_calls`` with ``arguments`` as a JSON string; for ``tool`` ``tool_call_id``).
    """
    names = {c["id"]: c["function"]["name"]
             for m in messages for c in m.get("tool_calls") or ()}
    if fmt.native:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments":
                                    as_object(c["function"]["arguments"])}}
                                   for c in m["tool_calls"]]
            if m["role"] == "tool":
                m.setdefault("name", names.get(m.get("tool_call_id"), ""))
            out.append(m)
        return out, list(spec.tools) if spec.tools else None
    # generic: calls and results become message text; results go back as a user turn
    # (templates such as Gemma's insist that turns alternate user/assistant)
    out: list[dict] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(fmt.call_text(c["function"]["name"],
                                            as_object(c["function"]["arguments"]))
                              for c in m["tool_calls"])
            text = (m.get("content") or "") + ("\n" if m.get("content") else "") + calls
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            block = ("<tool_response>\n" + json.dumps(
                {"name": names.get(m.get("tool_call_id"), ""), "content": m["content"]},
                ensure_ascii=False) + "\n</tool_response>")
            if out and out[-1].get("tool_result"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_result": True})
        else:
            out.append(dict(m))
    for m in out:
        m.pop("tool_result", None)
    if spec.tools:
        text = generic_system(spec.tools, spec.parallel)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, None


def as_object(arguments: object) -> object:
    """A call's ``arguments`` as an object when given as a JSON object's text."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


# -- a call read back ------------------------------------------------------------------

@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    def as_dict(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}

    @property
    def key(self) -> tuple[str, str]:
        """What makes two calls the same call: the name and the arguments as JSON (key
        order and layout aside), not their text."""
        return self.name, json.dumps(json.loads(self.arguments), sort_keys=True)
