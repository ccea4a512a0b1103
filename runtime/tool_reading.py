"""Reading a model's answer back as OpenAI ``tool_calls``, and ending an answer of calls.

One parser (``CallParser``) reads both a whole answer and a stream: a stream is fed piece
by piece, a whole answer in one piece. Its contract:
- a call is read when it closes: at its end marker (``hermes``, ``generic``), or where its
  JSON object closes (each element of ``mistral``'s list, ``llama3``'s object), so calls
  stream one by one;
- the format's markup (``<tool_call>``, ``[TOOL_CALLS]``, ``<|python_tag|>``...) is never
  content: a call cut before it closes (``max_tokens``, a stop string) is dropped, as is
  the start of a marker at the answer's end, and a closed call that does not parse as a
  call to one of the request's tools is dropped with a warning (under the tools' grammar,
  which the server always decodes with, every closed call parses);
- text before a call (under ``auto``) is content.

``RepeatedCallStop`` is the decode loop's stop rule for such answers
(``runtime.stopping``): a call that repeats one the answer already made (same name, equal
arguments) ends the answer before it, since a small model under ``required`` tends to
write the same call again and again until ``max_tokens``.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from runtime.stopping import GO_ON, Verdict
from runtime.tool_grammar import call_grammar
from runtime.tools import ToolCall, ToolFormat, ToolSpec, as_object

log = logging.getLogger(__name__)


def read_calls(fmt: ToolFormat, raw: str, spec: ToolSpec) -> list[ToolCall] | None:
    """The calls in one call's raw text (between its markers), or None if it is not a
    call to one of ``spec``'s tools whose arguments validate against its schema."""
    try:
        obj = json.loads(raw.strip())
    except ValueError:
        return None
    objs = obj if isinstance(obj, list) else [obj]
    names = {t["function"]["name"] for t in spec.tools}
    calls = []
    for o in objs:
        if not isinstance(o, dict) or o.get("name") not in names:
            return None
        args = o.get(fmt.args_key, o.get("arguments", o.get("parameters", {})))
        args = as_object(args)
        if not isinstance(args, dict) or not _valid(args, spec.schema(o["name"])):
            return None
        calls.append(ToolCall(o["name"], json.dumps(args, ensure_ascii=False)))
    return calls or None


def _valid(args: dict, schema: dict) -> bool:
    from jsonschema import validators

    return validators.validator_for(schema)(schema).is_valid(args)


class _State(enum.Enum):
    TEXT = "text"        # outside calls
    CALL = "call"        # inside a call that closes at the format's end marker
    LIST = "list"        # inside mistral's list, between its elements
    OBJECTS = "objects"  # llama3: at calls written as bare JSON objects
    BROKEN = "broken"    # markup followed by something that is no call: swallowed


class _ObjectEnd:
    """Where the JSON object at the start of a growing text closes, scanned incrementally
    (a call's arguments can be a whole file: rescanning per token would be quadratic)."""

    def __init__(self) -> None:
        self.pos = self.depth = 0
        self.in_str = self.esc = False

    def find(self, text: str) -> int | None:
        """The length of the object at ``text``'s start, or None if it is still open."""
        for i in range(self.pos, len(text)):
            ch = text[i]
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == '"':
                    self.in_str = False
            elif ch == '"':
                self.in_str = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        self.pos = len(text)
        return None


class CallParser:
    """Splits an answer, fed in pieces, into content text and tool calls.

    ``feed`` and ``finish`` return events: ``("content", text)`` or ``("call",
    ToolCall)``. Text that might be the start of a call is held back until it is known.

    Args:
        fmt: the format.
        spec: the request's tools (calls naming others are not calls).
        prefill: the answer's forced opening, which the model did not write.
        marker_id: the token id of ``fmt.start`` when it is a control token (Mistral's
            ``[TOOL_CALLS]``), whose text a decoded answer does not show.

    Attributes:
        calls: the calls read so far.
        ends: per call, the offset in the answer's text just past its closing text.
        opened: the answer opened a call (complete or not): it is not plain text.
    """

    def __init__(self, fmt: ToolFormat, spec: ToolSpec, prefill: str = "",
                 marker_id: int | None = None):
        self.fmt, self.spec, self.marker_id = fmt, spec, marker_id
        self._buf = prefill
        self._at = -len(prefill)  # the answer's offset of _buf[0]
        self._state = _State.TEXT
        self._list_open = False
        self._seen_text = False  # llama3: a call only opens the answer
        self._n_objects = 0
        self._blank = ""  # blank content held back
        self._object = _ObjectEnd()
        self.calls: list[ToolCall] = []
        self.ends: list[int] = []
        self.opened = False

    def feed(self, text: str, tokens: Sequence[int] = ()) -> list[tuple[str, object]]:
        if self.marker_id is not None and self.marker_id in tokens:
            # the marker opens the answer's call; its text is not the answer's (a control
            # token opens the answer, so nothing is held before it)
            text = self.fmt.start + text
            self._at -= len(self.fmt.start)
        self._buf += text
        return self._scan(final=False)

    def finish(self) -> list[tuple[str, object]]:
        """The answer ended: what was held back is decided now."""
        return self._scan(final=True)

    def content(self, text: str) -> str | None:
        """The answer's content from its content events: beside calls (or a call that
        was cut or dropped), only the text that is not blank; otherwise as written."""
        return (text.strip() or None) if self.opened else text

    def _take(self, n: int) -> str:
        s, self._buf = self._buf[:n], self._buf[n:]
        self._at += n
        return s

    def _scan(self, final: bool) -> list[tuple[str, object]]:
        events: list[tuple[str, object]] = []
        step = {_State.TEXT: self._text, _State.CALL: self._call_text,
                _State.LIST: self._list, _State.OBJECTS: self._objects,
                _State.BROKEN: self._broken}
        while step[self._state](final, events):
            pass
        # blank text is held until text follows: beside calls (the newline between two)
        # it is no content, and a stream must not send what a whole answer would not
        out: list[tuple[str, object]] = []
        for kind, e in events:
            if kind == "content":
                if not e.strip():
                    self._blank += e
                    continue
                e, self._blank = self._blank + e, ""
            out.append((kind, e))
        if final and self._blank:
            if not self.opened:
                out.append(("content", self._blank))
            self._blank = ""
        return out

    # each state reads what it can and returns whether to go on scanning

    def _text(self, final: bool, out: list) -> bool:
        fmt = self.fmt
        if fmt.at_start:
            return self._at_start(final, out)
        i = self._buf.find(fmt.start)
        k = self._buf.find(fmt.end) if fmt.end else -1
        if k >= 0 and (i < 0 or k < i):  # an end marker with no call open: markup too
            if k:
                out.append(("content", self._take(k)))
            log.info("dropped a stray %r from the answer's text", self._take(len(fmt.end)))
            return True
        if i < 0:
            keep = max(_partial_suffix(self._buf, m) for m in (fmt.start, fmt.end) if m)
            if len(self._buf) > keep:
                out.append(("content", self._take(len(self._buf) - keep)))
            if final and keep:  # a marker's start at the answer's end is markup too
                log.info("dropped the start of a call marker at the answer's end: %r",
                         self._take(keep))
            return False
        if i:
            out.append(("content", self._take(i)))
        self._take(len(fmt.start))
        self._state = _State.LIST if fmt.is_list else _State.CALL
        self.opened = True
        return True

    def _at_start(self, final: bool, out: list) -> bool:
        """llama3: a call (or its lead marker) can only open the answer."""
        fmt, buf = self.fmt, self._buf
        head = buf.lstrip()
        if not self._seen_text:
            if not head and not final:
                return False  # only blanks so far
            if fmt.lead and head.startswith(fmt.lead):
                self._take(len(buf) - len(head) + len(fmt.lead))
                self._state, self.opened = _State.OBJECTS, True
                return True
            if fmt.lead and head and fmt.lead.startswith(head) and not final:
                return False  # may be the lead marker
            if head.startswith(fmt.start):
                self._take(len(buf) - len(head))
                self._state, self.opened = _State.OBJECTS, True
                return True
            self._seen_text = True
        if self._buf:
            out.append(("content", self._take(len(self._buf))))
        return False

    def _call_text(self, final: bool, out: list) -> bool:
        """Inside a call that closes at the end marker."""
        end = self.fmt.end
        j = self._buf.find(end)
        if j < 0:
            if not final:
                return False
            raw = self._take(len(self._buf))  # unclosed: complete if the JSON is
            out += self._call(raw[:len(raw) - _partial_suffix(raw, end)], closed=False)
            self._state = _State.TEXT
            return False
        raw = self._take(j)
        self._take(len(end))
        out += self._call(raw, closed=True)
        self._state = _State.TEXT
        return True

    def _list(self, final: bool, out: list) -> bool:
        """mistral: ``[`` then objects separated by commas, then ``]``."""
        self._take(len(self._buf) - len(self._buf.lstrip()))
        if not self._buf:
            if final:  # the list was cut between elements: its calls are read
                self._state, self._list_open = _State.TEXT, False
            return False
        c = self._buf[0]
        if not self._list_open:
            if c != "[":
                self._state = _State.BROKEN
                return True
            self._take(1)
            self._list_open = True
            return True
        if c == ",":
            self._take(1)
            return True
        if c == "]":
            self._take(1)
            self._state, self._list_open = _State.TEXT, False
            return True
        if c == "{":
            return self._one_object(final, out)
        self._state = _State.BROKEN
        return True

    def _objects(self, final: bool, out: list) -> bool:
        """llama3: bare call objects (blanks or ``;`` between them), then maybe text."""
        self._take(len(self._buf) - len(self._buf.lstrip(" \t\r\n;")))
        if not self._buf:
            if final:
                self._state = _State.TEXT
            return False
        if self._buf[0] == "{":
            return self._one_object(final, out)
        if not self._n_objects:  # the lead marker, then no call
            self._state = _State.BROKEN
            return True
        self._state, self._seen_text = _State.TEXT, True  # text after the calls
        return True

    def _one_object(self, final: bool, out: list) -> bool:
        n = self._object.find(self._buf)
        if n is None:
            if not final:
                return False
            out += self._call(self._take(len(self._buf)), closed=False)
            self._state, self._list_open = _State.TEXT, False
            self._object = _ObjectEnd()
            return False
        self._object = _ObjectEnd()
        self._n_objects += 1
        out += self._call(self._take(n), closed=True)
        return True

    def _broken(self, final: bool, out: list) -> bool:
        if final and self._buf:
            log.warning("the model wrote a call marker and then no call; dropped: %.200r",
                        self._take(len(self._buf)))
            self._state = _State.TEXT
        return False

    def _call(self, raw: str, closed: bool) -> list[tuple[str, object]]:
        calls = read_calls(self.fmt, raw, self.spec)
        if calls is None:
            if closed and self.fmt.keep_start:
                return [("content", raw)]  # llama3: plain JSON, with no markup in it
            if closed:
                log.warning("the model wrote a tool call that does not parse as a call to "
                            "one of the request's tools; dropped: %.200r", raw)
            else:
                log.info("a tool call was cut before it closed (max_tokens or a stop "
                         "string); dropped: %.200r", raw)
            return []
        if not self.spec.parallel and self.calls:
            log.info("parallel_tool_calls is false: dropping %d more call(s)", len(calls))
            return []
        if not self.spec.parallel:
            calls = calls[:1]
        self.calls += calls
        self.ends += [self._at] * len(calls)
        return [("call", c) for c in calls]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def parse(fmt: ToolFormat, text: str, spec: ToolSpec, prefill: str = ""
          ) -> tuple[str | None, list[ToolCall]]:
    """A whole answer as (content or None, calls)."""
    p = CallParser(fmt, spec, prefill)
    events = p.feed(text) + p.finish()
    return p.content("".join(e for kind, e in events if kind == "content")), p.calls


class RepeatedCallStop:
    """The stop rule of an answer that may hold tool calls (``runtime.stopping``): when a
    call closes that repeats one this answer already made (same name, arguments equal as
    JSON), the answer ends just after the last call that was new, and the repeat is never
    given out. Everything after the last new call is held back until the next call proves
    new, so neither its text nor its tokens reach a client before that.

    It applies whatever ``parallel_tool_calls`` says: with parallel calls a small model
    tends to write one call again and again until ``max_tokens``; without them the
    format's end marker stops the answer after its first call anyway.

    Args:
        parser: a fresh parser for this answer (``CallReading.parser()``).
    """

    def __init__(self, parser: CallParser):
        self._parser = parser
        self._seen: set[tuple[str, str]] = set()
        self._kept_end: int | None = None  # where the last new call closed

    def feed(self, text: str, tokens: Sequence[int] = ()) -> Verdict:
        p = self._parser
        n = len(p.calls)
        p.feed(text, tokens)
        for call, end in zip(p.calls[n:], p.ends[n:], strict=True):
            if call.key in self._seen:
                log.info("the answer repeats its call to %s with the same arguments: it "
                         "ends after its %d call(s)", call.name, len(self._seen))
                return Verdict(hold=self._kept_end, end=self._kept_end)
            self._seen.add(call.key)
            self._kept_end = end
        return Verdict(hold=self._kept_end)

    def finish(self) -> Verdict:
        """The answer ended: a call that only its end closed (a last call with no end
        marker) may repeat one too, and then the answer still ends after the last new
        call."""
        p = self._parser
        n = len(p.calls)
        p.finish()
        for call in p.calls[n:]:
            if call.key in self._seen:
                log.info("the answer's last call repeats its call to %s: it ends after its "
                         "%d call(s)", call.name, len(self._seen))
                return Verdict(hold=self._kept_end, end=self._kept_end)
            self._seen.add(call.key)
        return GO_ON


@dataclass(frozen=True)
class CallReading:
    """How one request's answer is read for calls: the session's format, the request's
    tools, the forced opening (under ``required`` or a named function) and the marker's
    control-token id (Mistral's)."""

    fmt: ToolFormat
    spec: ToolSpec
    prefill: str = ""
    marker_id: int | None = None

    @classmethod
    def of(cls, session, spec: ToolSpec) -> CallReading:
        """For a ``ChatSession``: its template's format, its renderer's control tokens."""
        fmt = session.tool_format
        prefill = fmt.prefill(spec.forced_name) if spec.required else ""
        return cls(fmt, spec, prefill, session.renderer.control.get(fmt.start))

    def parser(self) -> CallParser:
        return CallParser(self.fmt, self.spec, self.prefill, self.marker_id)

    def stop_rule(self) -> RepeatedCallStop:
        """A fresh stop rule for one answer (``Engine.generate``'s ``stop_rule``)."""
        return RepeatedCallStop(self.parser())

    @property
    def grammar(self) -> str | None:
        """What the answer must match (``runtime.tool_grammar``): the server decodes under
        ``ConstraintSpec("gbnf", reading.grammar)`` with no ``prefill`` (the grammar forces
        the opening, and forced text drafts for free). None when the request has no tools
        to call."""
        return call_grammar(self.fmt, self.spec) if self.spec.active else None

    @property
    def stops(self) -> tuple[str, ...]:
        """Stop strings that end the answer after its one call (a single call is wanted:
        a named function, or ``parallel_tool_calls`` false), so a model that goes on
        talking after it spends no tokens; the parser reads the call unclosed."""
        one = self.spec.forced_name is not None or not self.spec.parallel
        return (self.fmt.end,) if self.spec.active and one and self.fmt.end else ()
