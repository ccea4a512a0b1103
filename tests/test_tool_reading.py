"""Reading answers back as tool calls (``runtime.tool_reading``): hand-made answers parsed
whole and streamed (every split point), markup never returned as content, the stop rule
that ends an answer before a repeated call on hand-made text, and, on the real SmolLM2, a
scripted looping decode in every format: the answer's tokens are forced by a grammar to
repeat one call, and the decode loop ends it after the first."""

from __future__ import annotations

import json

import pytest

from runtime import tool_reading as R
from runtime import tools as T
from runtime.config import GenerationConfig, RuntimeConfig, SamplingConfig, SpeculativeConfig
from runtime.constraint import ConstraintSpec
from runtime.stopping import Verdict
from tests.test_tools import SPEC

FORMATS = (T.HERMES, T.GENERIC, T.MISTRAL, T.LLAMA3)  # every format bridge detects

WHOLE = [
    # (format, text, content, [(name, args)])
    (T.HERMES, 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
               "</tool_call>", "Sure.", [("get_weather", {"city": "Paris"})]),
    # two calls, the last one unclosed (the model ended at EOG)
    (T.HERMES, '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n<tool_call>'
               '{"name": "get_weather", "arguments": {"city": "Oslo"}}', None,
     [("get_time", {}), ("get_weather", {"city": "Oslo"})]),
    # the end marker cut short: the call's JSON is whole, so it is a call
    (T.HERMES, '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_', None,
     [("get_time", {})]),
    # a call to an unknown function, or broken JSON, is dropped: markup is never content
    (T.HERMES, '<tool_call>{"name": "rm", "arguments": {}}</tool_call>', None, []),
    (T.GENERIC, "<tool_call>{not json</tool_call>", None, []),
    (T.GENERIC, "No call here, just < and a tool_call", "No call here, just < and a tool_call",
     []),
    # ... and so is a marker's start at the answer's end, or a stray end marker
    (T.GENERIC, "No call here, just < and <tool", "No call here, just < and ", []),
    (T.GENERIC, "No call here, just < and </tool_c", "No call here, just < and ", []),
    (T.HERMES, "Done.</tool_call> Bye.", "Done. Bye.", []),
    # cut by max_tokens: the text before the call stays, the call and its markup go
    (T.HERMES, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"ci',
     "Let me check.", []),
    (T.HERMES, '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n<tool_call>'
               '\n{"name": "get_wea', None, [("get_time", {})]),
    (T.GENERIC, '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n<tool_c',
     None, [("get_time", {})]),
    (T.LLAMA3, ' {"name": "get_weather", "parameters": {"city": "Rome"}}', None,
     [("get_weather", {"city": "Rome"})]),
    # llama3: JSON later in the answer is only text
    (T.LLAMA3, 'Use {"name": "get_time", "parameters": {}}',
     'Use {"name": "get_time", "parameters": {}}', []),
    # llama3: JSON that is no call has no markup: it stays text
    (T.LLAMA3, '{"answer": 42}', '{"answer": 42}', []),
    (T.LLAMA3, '{"name": "get_weather", "parameters": {"ci', None, []),  # cut
    (T.LLAMA3, '<|python_tag|>{"name": "get_time", "parameters": {}}', None,
     [("get_time", {})]),
    (T.LLAMA3, '{"name": "get_time", "parameters": {}}\n{"name": "get_weather", '
               '"parameters": {"city": "Rome"}}', None,
     [("get_time", {}), ("get_weather", {"city": "Rome"})]),
    (T.MISTRAL, '[TOOL_CALLS][{"name": "get_time", "arguments": {}}, {"name": "get_weather",'
                ' "arguments": {"city": "Bern"}}]', None,
     [("get_time", {}), ("get_weather", {"city": "Bern"})]),
    # mistral cut inside its list: the elements that closed are calls
    (T.MISTRAL, '[TOOL_CALLS][{"name": "get_time", "arguments": {}}, {"name": "get_wea', None,
     [("get_time", {})]),
    (T.MISTRAL, '[TOOL_CALLS][{"name": "get_time", "arguments": {}},', None,
     [("get_time", {})]),
    (T.MISTRAL, "Hm. [TOOL_CALLS] no list", "Hm.", []),
    (T.MISTRAL, "Hm. [TOOL_", "Hm. ", []),
    # arguments given as a JSON string are accepted
    (T.HERMES, '<tool_call>{"name": "get_time", "arguments": "{}"}</tool_call>', None,
     [("get_time", {})]),
    # a brace inside a string does not close mistral's object
    (T.MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "}{\\""}}]', None,
     [("get_weather", {"city": '}{"'})]),
]


def _calls(calls) -> list:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("fmt, text, content, calls", WHOLE)
def test_parse_whole_and_every_split(fmt, text, content, calls):
    got_content, got = R.parse(fmt, text, SPEC)
    assert got_content == content
    assert _calls(got) == calls
    # streamed in two pieces, split everywhere: the same calls, the same text
    for cut in range(len(text) + 1):
        p = R.CallParser(fmt, SPEC)
        events = p.feed(text[:cut]) + p.feed(text[cut:]) + p.finish()
        assert _calls(p.calls) == calls
        streamed = "".join(e for k, e in events if k == "content")
        assert streamed.strip() == (content or "").strip()
        assert not any(m in streamed for m in fmt.markers if m in text), (cut, streamed)


def test_stream_holds_back_only_a_possible_marker():
    p = R.CallParser(T.HERMES, SPEC)
    assert p.feed("Hello <tool") == [("content", "Hello ")]
    assert p.feed("box>") == [("content", "<toolbox>")]


def test_calls_stream_one_by_one_and_say_where_they_end():
    p = R.CallParser(T.MISTRAL, SPEC)
    first = '[TOOL_CALLS][{"name": "get_time", "arguments": {}}'
    assert [k for k, _ in p.feed(first + ', {"name": "get_')] == ["call"]
    assert p.ends == [len(first)]


def test_prefill_then_parse():
    for fmt in FORMATS:
        pre = fmt.prefill("get_weather")
        rest = '{"city": "Lima"}}' + ("]" if fmt.is_list else "\n" + fmt.end)
        _, calls = R.parse(fmt, rest, SPEC, prefill=pre)
        assert _calls(calls) == [("get_weather", {"city": "Lima"})], fmt.name
        pre = fmt.prefill(None)
        close = "]" if fmt.is_list else ""
        _, calls = R.parse(fmt, f'get_time", "{fmt.args_key}": {{}}}}{close}', SPEC,
                           prefill=pre)
        assert [c.name for c in calls] == ["get_time"], fmt.name


def test_parallel_false_keeps_the_first_call():
    spec = T.ToolSpec(SPEC.tools, parallel=False)
    _, calls = R.parse(T.MISTRAL, '[TOOL_CALLS][{"name": "get_time", "arguments": {}}, '
                                  '{"name": "get_time", "arguments": {}}]', spec)
    assert len(calls) == 1


class _Session:  # what CallReading.of reads from a ChatSession
    def __init__(self, fmt, control):
        self.tool_format = fmt
        self.renderer = type("R", (), {"control": control})()


@pytest.mark.parametrize("fmt, choice, parallel, prefill, stops", [
    (T.HERMES, "get_weather", True, '<tool_call>\n{"name": "get_weather", "arguments": ',
     ("</tool_call>",)),
    (T.HERMES, "required", True, '<tool_call>\n{"name": "', ()),  # several calls may come
    (T.HERMES, "required", False, '<tool_call>\n{"name": "', ("</tool_call>",)),
    (T.HERMES, "auto", True, "", ()),
    (T.LLAMA3, "get_time", True, '{"name": "get_time", "parameters": ', ()),  # no end marker
])
def test_call_reading(fmt, choice, parallel, prefill, stops):
    r = R.CallReading.of(_Session(fmt, {}), T.ToolSpec(SPEC.tools, choice, parallel))
    assert (r.prefill, r.stops, r.marker_id) == (prefill, stops, None)


def test_mistral_marker_is_a_control_token():
    # [TOOL_CALLS] is a control token: the decoded text lacks it, the token ids show it
    r = R.CallReading.of(_Session(T.MISTRAL, {"[TOOL_CALLS]": 5}), SPEC)
    p = r.parser()
    events = p.feed('[{"name": "get_time", "arguments": {}}]', [5, 9, 9]) + p.finish()
    assert [e for k, e in events if k == "content"] == [] and p.calls[0].name == "get_time"
    # the rule's offsets are the decoded text's, which lacks the marker
    rule = r.stop_rule()
    one = '[{"name": "get_time", "arguments": {}}'
    assert rule.feed(one + ", " + one[1:] + "]", [5, 9]) == Verdict(len(one), len(one))


# -- the stop rule on hand-made text ----------------------------------------------------

PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}
OSLO = {"name": "get_weather", "arguments": {"city": "Oslo"}}


def answer(fmt: T.ToolFormat, calls: list[dict]) -> tuple[str, list[int]]:
    """The answer ``fmt`` writes for ``calls`` (json.dumps's layout, as the grammar
    forces), and where each call's text ends in it."""
    bodies = [json.dumps({"name": c["name"], fmt.args_key: c["arguments"]}) for c in calls]
    if fmt.is_list:
        head, parts, sep, tail = fmt.start + "[", bodies, ", ", "]"
    elif fmt.keep_start:
        head, parts, sep, tail = "", bodies, "\n", ""
    else:
        head, parts, sep, tail = "", [f"{fmt.start}\n{b}\n{fmt.end}" for b in bodies], "\n", ""
    ends, at = [], len(head)
    for p in parts:
        at += len(p)
        ends.append(at)
        at += len(sep)
    return head + sep.join(parts) + tail, ends


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("calls, n_kept", [
    ([PARIS, PARIS, PARIS], 1),        # the loop the server saw: ends after the first
    ([PARIS, OSLO, PARIS], 2),         # a repeat of any earlier call, not only the last
    ([PARIS, OSLO], None),             # all different: the rule never ends the answer
])
def test_the_rule_ends_before_a_repeated_call(fmt, calls, n_kept):
    text, ends = answer(fmt, calls)
    spec = T.ToolSpec(SPEC.tools, "required")
    # fed one character at a time, as tokens arrive
    rule = R.CallReading(fmt, spec).stop_rule()
    verdicts = [rule.feed(ch) for ch in text]
    stop = next((i for i, v in enumerate(verdicts) if v.end is not None), None)
    if n_kept is None:
        assert stop is None and verdicts[-1].hold == ends[-1]
        return
    kept_end = ends[n_kept - 1]
    # it ends as the repeat closes, at the end of the last new call
    assert stop == ends[n_kept] - 1 and verdicts[stop].end == kept_end
    # from the first call's close on, everything after the last new call was held back
    assert all(v.hold is None for v in verdicts[:ends[0] - 1])
    assert all(v.hold is not None and v.hold <= kept_end for v in verdicts[ends[0] - 1:])
    # what is kept reads back as the new calls, with no markup as content
    content, got = R.parse(fmt, text[:kept_end], spec)
    assert content is None and len(got) == n_kept


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_a_repeat_that_only_the_end_closes_still_ends_the_answer(fmt):
    """The last call of an answer may have no closing text (the model stopped right after
    its JSON, or a list was left open): it is read at the end, and a repeat is still cut
    there by ``finish``."""
    text, ends = answer(fmt, [PARIS, PARIS])
    cut = text[:ends[1]]
    cut = cut[: len(cut) - len(fmt.end)].rstrip() if fmt.end and cut.endswith(fmt.end) \
        else cut
    rule = R.CallReading(fmt, T.ToolSpec(SPEC.tools, "required")).stop_rule()
    fed = next((v.end for v in map(rule.feed, cut) if v.end is not None), None)
    if fmt.end:  # the end marker closes a call: without it, only the end does
        assert fed is None
        assert rule.finish().end == ends[0]
    else:  # a list's object or a bare object closes itself
        assert fed == ends[0]
    # and a last call that is new is kept
    rule = R.CallReading(fmt, T.ToolSpec(SPEC.tools, "required")).stop_rule()
    text, ends = answer(fmt, [PARIS, OSLO])
    for ch in text[: len(text) - len(fmt.end)] if fmt.end else text:
        rule.feed(ch)
    assert rule.finish().end is None


def test_a_repeat_is_equal_json_not_equal_text():
    spec = T.ToolSpec(SPEC.tools, "required")
    a = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    b = '<tool_call>\n{"name":"get_weather","arguments":{ "city" : "Paris" }}\n</tool_call>'
    rule = R.CallReading(T.HERMES, spec).stop_rule()
    assert rule.feed(a).end is None
    assert rule.feed("\n" + b).end == len(a)


# -- a scripted looping decode on the real model ------------------------------------------

RT = RuntimeConfig(n_ctx=1024, n_threads=1)
GREEDY = SamplingConfig(temp=0.0)
SPECULATIVE = {"plain": SpeculativeConfig(drafter="none"),
               # lookup and forced text drafted at a fixed gamma: steps of several tokens
               "drafted": SpeculativeConfig(drafter="lookup", draft_max=8, adaptive=False)}
PROMPT = "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", params=sorted(SPECULATIVE))
def engine(request, smollm2_gguf):
    from runtime.engine import Engine

    pytest.importorskip("llguidance")
    with Engine(smollm2_gguf, draft=None, runtime=RT, sampling=GREEDY,
                speculative=SPECULATIVE[request.param]) as e:
        yield e


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("calls, n_kept", [([PARIS] * 4, 1), ([PARIS, OSLO, OSLO], 2)])
def test_a_looping_decode_ends_after_its_new_calls(engine, fmt, calls, n_kept):
    """The answer's tokens are forced (a grammar whose only sentence repeats a call), so
    the model "loops"; the decode loop's stop rule ends the answer once the repeat
    closes, keeping the KV cache and the grammar state to the tokens given out."""
    text, ends = answer(fmt, calls)
    spec = T.ToolSpec(SPEC.tools, "required")
    reading = R.CallReading(fmt, spec)
    ids = engine.model.tokenize(PROMPT, add_special=True, parse_special=True)
    chunks = list(engine.generate(ids, GenerationConfig(max_tokens=300),
                                  constraint=ConstraintSpec("gbnf", f"start: {json.dumps(text)}"),
                                  logprobs=1, stop_rule=reading.stop_rule()))
    stats = engine.last_stats
    got = "".join(c.text for c in chunks)
    tokens = [t for c in chunks for t in c.tokens]
    assert stats.finish_reason == "stop" and stats.n_tokens == len(tokens)
    # the kept text is the new calls, and at most the rest of the token that closed them
    assert got.startswith(text[:ends[n_kept - 1]]) and text.startswith(got)
    assert len(engine.model.detokenize(tokens[:-1])) < ends[n_kept - 1]
    # read back as the server reads it, whole or streamed: the new calls, no content
    content, read = R.parse(fmt, got, spec)
    assert content is None and _calls(read) == [(c["name"], c["arguments"])
                                                for c in calls[:n_kept]]
    p = reading.parser()
    events = [e for c in chunks for e in p.feed(c.text, c.tokens)] + p.finish()
    assert [k for k, _ in events if k == "content" and _] == [] and len(p.calls) == n_kept
    # every token given out has its log-prob, and the caches hold exactly those tokens
    assert sum(len(c.logprobs or ()) for c in chunks) == len(tokens)
    d = engine.decoder
    assert d.kv + ([d.pending] if d.pending is not None else []) == ids + tokens
    assert d.constraint.start + d.constraint.n_consumed == len(ids) + len(tokens)


def test_a_looping_decode_whose_last_repeat_has_no_end_marker(engine):
    """The forced answer stops right after the repeated call's JSON (no closing marker):
    the decode loop's end asks the rule, and the repeat is still not given out."""
    fmt = T.HERMES
    text, ends = answer(fmt, [PARIS, PARIS])
    text = text[: len(text) - len(fmt.end)].rstrip()
    spec = T.ToolSpec(SPEC.tools, "required")
    ids = engine.model.tokenize(PROMPT, add_special=True, parse_special=True)
    chunks = list(engine.generate(ids, GenerationConfig(max_tokens=300),
                                  constraint=ConstraintSpec("gbnf", f"start: {json.dumps(text)}"),
                                  stop_rule=R.CallReading(fmt, spec).stop_rule()))
    got = "".join(c.text for c in chunks)
    tokens = [t for c in chunks for t in c.tokens]
    assert engine.last_stats.finish_reason == "stop"
    assert got.startswith(text[:ends[0]]) and len(got) < ends[1]
    content, read = R.parse(fmt, got, spec)
    assert content is None and _calls(read) == [(PARIS["name"], PARIS["arguments"])]
    d = engine.decoder
    assert d.kv + ([d.pending] if d.pending is not None else []) == ids + tokens
