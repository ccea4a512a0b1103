"""A conversation in the model's chat template, tokenized so that only the template can
write control tokens, and fitted to the context in linear time.

Tokenizing a rendered chat with special tokens parsed lets a message write its own
markup: a content of ``<|im_end|>\\n<|im_start|>system\\n...`` would close its turn and
open a system turn. So the template is rendered twice, once with each content replaced by
a sentinel that cannot occur in any message, once as is; the sentinels mark where each
content sits. Control tokens are then taken only from the template's own text, and the
plain text between them (template text and contents alike) is tokenized with special
tokens read as text. That is how llama.cpp itself splits a text at special tokens before
tokenizing the pieces, so a chat without look-alike markup gets exactly the ids it got
when the whole text was tokenized with special tokens parsed.

Each run of text is tokenized on its own, so the token count of a conversation is the sum
of its runs': trimming the oldest turns to fit the context needs one tokenization, not one
per dropped turn (which made a 2,000-message chat cost minutes).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from dataclasses import dataclass, field

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

log = logging.getLogger(__name__)


class ChatTemplateError(ValueError):
    """The model has no usable chat template, or it refused the conversation."""


@dataclass
class Rendered:
    """A rendered conversation: ``text`` cut into runs, each tokenized alone.

    Attributes:
        text: the whole prompt, ending with the assistant's generation prompt.
        spans: runs ``(start, end, message index or -1, control token id or -1)`` covering
            text: a control token the template wrote, or plain text (template text and
            the contents of the message named, if any, read without special tokens).
        ids: the token ids of each run (the first run's include the BOS when added).
    """

    text: str
    spans: list[tuple[int, int, int]]
    ids: list[list[int]] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(i) for i in self.ids)

    def tokens(self) -> list[int]:
        return [t for ids in self.ids for t in ids]

    def message_tokens(self, n_messages: int) -> list[int]:
        """Tokens per message: its content and the markup just before it (its header and
        the previous turn's end)."""
        out = [0] * n_messages
        pending = 0
        for (_, _, msg, _), ids in zip(self.spans, self.ids, strict=True):
            if msg < 0:
                pending += len(ids)
            else:
                out[msg] += pending + len(ids)
                pending = 0
        return out


class ChatRenderer:
    """Renders and tokenizes conversations for one model and template.

    Args:
        model: the ``LlamaModel`` whose tokenizer is used.
        template: a Jinja chat template (the GGUF's own, usually).
    """

    def __init__(self, model, template: str):
        self.model = model
        self.bos = _special_text(model, model.meta("tokenizer.ggml.bos_token_id"))
        eos = _special_text(model, model.meta("tokenizer.ggml.eos_token_id"))
        self._formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=self.bos)
        # control tokens, by their text (a control token has no text when not special)
        self.control: dict[str, int] = {}
        for t in range(model.n_vocab):
            text = model.token_bytes(t, special=True)
            if text and not model.token_bytes(t):
                self.control.setdefault(text.decode("utf-8", "replace"), t)
        # longest first, as llama.cpp matches them
        self._control_re = re.compile("|".join(
            re.escape(k) for k in sorted(self.control, key=len, reverse=True))) \
            if self.control else None
        self._bos_ids = model.tokenize("", add_special=True, parse_special=False)

    def text(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        try:
            return self._formatter(messages=messages, tools=tools).prompt
        except Exception as e:  # a template can raise anything; surface it plainly
            raise ChatTemplateError(f"the chat template failed to render: {e}") from None

    def render(self, messages: list[dict], tokenize: bool = True,
               tools: list[dict] | None = None, prefill: str = "") -> Rendered:
        """The conversation as text and spans (and token ids unless ``tokenize`` is
        False).

        Args:
            tools: passed to the template as ``tools`` (OpenAI's shapes), as llama.cpp's
                Jinja path does; the template writes them, and any ``tool_calls`` of
                assistant messages, as its own markup, so they must not hold
                control-token text.
            prefill: bridge's own text after the generation prompt (a tool call's forced
                opening); its control-token text, if any, becomes control tokens.
        """
        self._check_markup(messages, tools)
        # digits only, matched in any case: filters such as upper or trim leave it whole
        nonce = str(secrets.randbelow(10**16)).zfill(16)
        while any(nonce in m["content"] for m in messages):  # 10^-16 per message
            nonce = str(secrets.randbelow(10**16)).zfill(16)
        # an empty content keeps no sentinel: templates test contents for truth
        marked = self.text([{**m, "content": f"BRIDGE{nonce}M{i}E"} if m["content"] else m
                            for i, m in enumerate(messages)], tools)
        pieces = re.split(f"BRIDGE{nonce}M(\\d+)E", marked, flags=re.IGNORECASE)
        markup, order = pieces[0::2], [int(i) for i in pieces[1::2]]
        contents = [messages[i]["content"] for i in order]
        text = self.text(messages, tools)
        spans = _locate(text, markup, order, contents)
        if spans is None:
            # the template changes contents beyond trimming, so they cannot be told apart
            # from its markup: safe only while no content holds control-token text
            if self._control_re and any(self._control_re.search(m["content"])
                                        for m in messages):
                raise ChatTemplateError(
                    "a message contains the text of a control token (such as the "
                    "template's turn markers), and this model's chat template changes "
                    "message contents, so bridge cannot keep that text from acting as "
                    "markup; remove it from the message")
            log.debug("chat template transforms message contents; tokenizing it whole")
            spans = [(0, len(text), -1)]
        if prefill:
            spans.append((len(text), len(text) + len(prefill), -1))
            text += prefill
        out = Rendered(text, self._runs(text, spans))
        if tokenize:
            out.ids = [[ctl] if ctl >= 0 else self._plain(text[a:b])
                       for a, b, _, ctl in out.spans]
            if out.ids and not (self.bos and text.startswith(self.bos)):
                # the template did not write the BOS text; add it as tokenizing would
                out.ids[0] = self._bos_ids + out.ids[0]
        return out

    def _check_markup(self, messages: list[dict], tools: list[dict] | None) -> None:
        markup = [json.dumps(tools, ensure_ascii=False)] if tools else []
        markup += [json.dumps(m["tool_calls"], ensure_ascii=False) for m in messages
                   if m.get("tool_calls")]
        if self._control_re and any(self._control_re.search(t) for t in markup):
            raise ChatTemplateError(
                "a tool definition or tool call contains the text of a control token (such "
                "as the template's turn markers); this model's template writes tools as "
                "markup, so remove that text")

    def _runs(self, text: str, spans: list[tuple[int, int, int]]
              ) -> list[tuple[int, int, int, int]]:
        """Cut markup spans at the control tokens in them; merge the plain text between
        control tokens into runs (a run is named after the last content in it)."""
        runs: list[tuple[int, int, int, int]] = []
        start, msg = 0, -1
        for a, b, m in spans:
            if m >= 0:
                msg = m
                continue
            for hit in self._control_re.finditer(text, a, b) if self._control_re else ():
                if hit.start() > start:
                    runs.append((start, hit.start(), msg, -1))
                runs.append((hit.start(), hit.end(), -1, self.control[hit.group()]))
                start, msg = hit.end(), -1
        if start < len(text):
            runs.append((start, len(text), msg, -1))
        return runs

    def _plain(self, piece: str) -> list[int]:
        return self.model.tokenize(piece, add_special=False, parse_special=False)

    def tokens_from(self, rendered: Rendered, offset: int) -> list[int]:
        """The token ids of ``rendered.text[offset:]``: whole runs reuse their ids, a run
        cut by ``offset`` is tokenized from there."""
        out: list[int] = []
        for (a, b, _, ctl), ids in zip(rendered.spans, rendered.ids, strict=True):
            if a >= offset:
                out += ids
            elif b > offset and ctl < 0:
                out += self._plain(rendered.text[offset:b])
        return out


def _locate(text: str, markup: list[str], order: list[int], contents: list[str]
            ) -> list[tuple[int, int, int]] | None:
    """Spans of ``text`` as markup pieces alternating with contents (each as sent or
    trimmed, as templates such as Gemma's do), or None when ``text`` is not that."""
    spans, pos = [], 0
    for i, piece in enumerate(markup):
        if not text.startswith(piece, pos):
            return None
        spans.append((pos, pos + len(piece), -1))
        pos += len(piece)
        if i == len(order):
            break
        nxt = markup[i + 1]
        c = contents[i]
        for cand in (c, c.strip(), c.lstrip(), c.rstrip()):
            if text.startswith(cand, pos) and text.startswith(nxt, pos + len(cand)):
                spans.append((pos, pos + len(cand), order[i]))
                pos += len(cand)
                break
        else:
            return None
    return spans if pos == len(text) else None


def _special_text(model, token_id: str | None) -> str:
    if token_id is None or int(token_id) < 0:
        return ""
    return model.token_bytes(int(token_id), special=True).decode("utf-8", "replace")


def droppable(messages: list[dict[str, str]], n: int) -> int:
    """How many of the oldest messages to drop so that at least ``n`` non-system
    messages go and the first kept one is a user message (templates such as Gemma's
    require turns to alternate from a user's); system messages always stay. Returns the
    index in ``messages`` where kept non-system messages start."""
    first = next(i for i, m in enumerate(messages) if m["role"] != "system")
    cut = min(first + n, len(messages) - 1)
    while cut < len(messages) - 1 and messages[cut]["role"] != "user":
        cut += 1
    return cut


def fit(renderer: ChatRenderer, messages: list[dict], budget: int, **extra
        ) -> tuple[Rendered, list[dict]]:
    """Drop the oldest turns until the conversation has at most ``budget`` tokens.

    One tokenization of the whole conversation gives each message's tokens; the cut is
    chosen from those, then the kept part is rendered once more to check (a template
    may render the first kept turn differently), dropping a little more if it must.

    Returns:
        (the kept conversation rendered, the kept messages).

    Raises:
        ValueError: even the system messages and the last message do not fit.
    """
    rendered = renderer.render(messages, **extra)  # extra: tools, prefill
    if rendered.n_tokens <= budget:
        return rendered, messages
    per = rendered.message_tokens(len(messages))
    system = [i for i, m in enumerate(messages) if m["role"] == "system"]
    need = rendered.n_tokens - budget
    first = next(i for i, m in enumerate(messages) if m["role"] != "system")
    n, freed = 0, 0
    while freed < need and first + n < len(messages) - 1:
        freed += per[first + n]
        n += 1
    for _ in range(8):  # each retry drops a turn more; the estimate is off by a few tokens
        cut = droppable(messages, n)
        kept = [messages[i] for i in system if i < cut] + messages[cut:]
        rendered = renderer.render(kept, **extra)
        if rendered.n_tokens <= budget or cut >= len(messages) - 1:
            break
        n = cut - first + 1
    if rendered.n_tokens > budget:
        raise ValueError(f"even the last message alone needs {rendered.n_tokens} tokens of "
                         f"the {budget} available")
    return rendered, kept
