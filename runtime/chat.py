"""Multi-turn chat on an ``Engine``: the GGUF's own chat template, history in the KV cache.

Each turn renders the whole conversation with the model's Jinja template; the part that
extends what the KV cache holds is tokenized alone and appended to the cached ids (the
model's own generated ids included), so a turn evaluates only its new tokens. When the
conversation outgrows the context, the oldest turns are dropped (the system message stays)
and the user is told.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from runtime.config import GenerationConfig
from runtime.engine import Chunk, Engine
from runtime.speculative import Stats

log = logging.getLogger(__name__)


class ChatTemplateError(ValueError):
    """The model has no usable chat template."""


class ChatSession:
    """A conversation with one engine.

    The session keeps the text the KV cache holds and its token ids, the generated ids
    among them. A new turn renders the whole conversation, and when that text extends
    what is cached, only the new part (the end-of-turn glue and the new message) is
    tokenized: BPE need not give back the ids the model generated, so re-tokenizing the
    whole conversation would make the engine re-evaluate its own answers.

    Args:
        engine: the loaded model (and draft).
        system: an optional system message, kept when old turns are dropped.
    """

    def __init__(self, engine: Engine, system: str | None = None):
        self.engine = engine
        self.history: list[dict[str, str]] = \
            [{"role": "system", "content": system}] if system else []
        self.dropped_turns = 0
        self._text = ""            # the conversation text that ``_ids`` encode
        self._ids: list[int] = []
        model = engine.model
        template = model.chat_template()
        if not template:
            raise ChatTemplateError(f"{model.path.name} has no chat template; use "
                                    "`bridge generate` without --chat for plain completion")
        self._bos = _special_text(model, model.meta("tokenizer.ggml.bos_token_id"))
        eos = _special_text(model, model.meta("tokenizer.ggml.eos_token_id"))
        self._formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=self._bos)

    @property
    def turns(self) -> list[dict[str, str]]:
        """The user and assistant messages (the system message aside)."""
        return [m for m in self.history if m["role"] != "system"]

    def messages(self) -> list[dict[str, str]]:
        return list(self.history)

    def render_text(self, messages: list[dict[str, str]] | None = None) -> str:
        """The conversation in the model's template, ending with the assistant prompt."""
        try:
            return self._formatter(messages=messages or self.messages()).prompt
        except Exception as e:  # a template can raise anything; surface it plainly
            raise ChatTemplateError(f"the chat template failed to render: {e}") from None

    def render(self, messages: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids of the conversation followed by the assistant's generation prompt,
        reusing the cached ids (generated ones included) when the text extends them."""
        text = self.render_text(messages)
        model = self.engine.model
        if self._text and text.startswith(self._text):
            return self._ids + model.tokenize(text[len(self._text):], add_special=False,
                                              parse_special=True)
        # the template may write the BOS text itself; never add a second one
        add_bos = not (self._bos and text.startswith(self._bos))
        return model.tokenize(text, add_special=add_bos, parse_special=True)

    def ask(self, user: str, gen: GenerationConfig, stats: Stats | None = None,
            **overrides) -> Iterator[Chunk]:
        """Stream the assistant's answer to ``user``; the answer joins the history even if
        the stream is closed early (Ctrl-C), holding what was shown. ``overrides`` go to
        ``Engine.generate`` (a constraint, ...)."""
        self.history.append({"role": "user", "content": user})
        return self._answer(gen, stats, overrides)

    def ask_messages(self, messages: list[dict[str, str]], gen: GenerationConfig,
                     stats: Stats | None = None, **overrides) -> Iterator[Chunk]:
        """Answer a whole conversation (ending with a user message), as an API server
        receives it; the part that extends the cached conversation is all that is
        evaluated. ``overrides`` go to ``Engine.generate`` (sampling, draft_max)."""
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("the last message must come from the user")
        self.history = [dict(m) for m in messages]
        return self._answer(gen, stats, overrides)

    def _answer(self, gen: GenerationConfig, stats: Stats | None, overrides: dict
                ) -> Iterator[Chunk]:
        try:
            prompt, text = self._fit(gen.max_tokens)
        except BaseException:
            self.history.pop()
            raise
        yield from self._stream(prompt, text, gen, stats, overrides)

    def _stream(self, prompt: list[int], text: str, gen: GenerationConfig,
                stats: Stats | None, overrides: dict) -> Iterator[Chunk]:
        parts: list[str] = []
        ids: list[int] = []
        try:
            for chunk in self.engine.generate(prompt, gen, stats, **overrides):
                parts.append(chunk.text)
                ids.extend(chunk.tokens)
                yield chunk
        except BaseException:
            if not parts:  # nothing was answered: forget the question too
                self.history.pop()
                self._text, self._ids = "", []
                raise
            self._remember(text, prompt, parts, ids)
            raise
        self._remember(text, prompt, parts, ids)

    def _remember(self, text: str, prompt: list[int], parts: list[str], ids: list[int]
                  ) -> None:
        answer = "".join(parts)
        self.history.append({"role": "assistant", "content": answer})
        is_eog = self.engine.model.is_eog
        # the cache holds the prompt and the answer's ids; the template writes the
        # end-of-turn token itself, so a final EOG id is left to the next turn's glue
        self._ids = prompt + [t for t in ids if not is_eog(t)]
        self._text = text + answer

    def _fit(self, max_tokens: int) -> tuple[list[int], str]:
        """Render, dropping the oldest user/assistant pairs until prompt + answer fit."""
        n_ctx = self.engine.ctx.n_ctx
        ids = self.render()
        while len(ids) + max_tokens > n_ctx and len(self.turns) > 1:
            first = next(i for i, m in enumerate(self.history) if m["role"] != "system")
            del self.history[first:first + 2]
            self.dropped_turns += 1
            ids = self.render()
        if len(ids) + 1 > n_ctx:
            raise ValueError(f"this message alone needs {len(ids)} tokens but the context "
                             f"holds {n_ctx}; shorten it or raise -c/--ctx")
        return ids, self.render_text()

    def reset(self) -> None:
        self.history = [m for m in self.history if m["role"] == "system"]
        self._text, self._ids = "", []
        self.engine.reset()


def _special_text(model, token_id: str | None) -> str:
    if token_id is None or int(token_id) < 0:
        return ""
    return model.token_bytes(int(token_id), special=True).decode("utf-8", "replace")
