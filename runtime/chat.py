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

from runtime.chat_render import ChatRenderer, ChatTemplateError, Rendered, fit
from runtime.config import GenerationConfig
from runtime.engine import Chunk, Engine, Lane
from runtime.speculative import Stats
from runtime.tools import detect

log = logging.getLogger(__name__)


__all__ = ["ChatSession", "ChatTemplateError"]


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
        lane: the engine's sequence this conversation lives in (default: the first).
    """

    def __init__(self, engine: Engine, system: str | None = None, lane: Lane | None = None):
        self.engine = engine
        self.lane = lane if lane is not None else engine.lanes[0]
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
        self.renderer = ChatRenderer(model, template)
        self.tool_format = detect(template)  # from the template's text, never a file name

    @property
    def turns(self) -> list[dict[str, str]]:
        """The user and assistant messages (the system message aside)."""
        return [m for m in self.history if m["role"] != "system"]

    def messages(self) -> list[dict[str, str]]:
        return list(self.history)

    def render_text(self, messages: list[dict[str, str]] | None = None) -> str:
        """The conversation in the model's template, ending with the assistant prompt."""
        return self.renderer.text(messages or self.messages())

    def render(self, messages: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids of the conversation followed by the assistant's generation prompt,
        reusing the cached ids (generated ones included) when the text extends them.
        Only the template's markup becomes control tokens (``runtime.chat_render``)."""
        return self._ids_for(self.renderer.render(messages or self.messages()))

    def _ids_for(self, rendered: Rendered) -> list[int]:
        if self._text and rendered.text.startswith(self._text):
            return self._ids + self.renderer.tokens_from(rendered, len(self._text))
        return rendered.tokens()

    def ask(self, user: str, gen: GenerationConfig, stats: Stats | None = None,
            **overrides) -> Iterator[Chunk]:
        """Stream the assistant's answer to ``user``; the answer joins the history even if
        the stream is closed early (Ctrl-C), holding what was shown. ``overrides`` go to
        ``Engine.generate`` (a constraint, ...)."""
        self.history.append({"role": "user", "content": user})
        return self._answer(gen, stats, overrides)

    def ask_messages(self, messages: list[dict[str, str]], gen: GenerationConfig,
                     stats: Stats | None = None, rendered: Rendered | None = None,
                     **overrides) -> Iterator[Chunk]:
        """Answer a whole conversation (ending with a user message or a tool result), as
        an API server receives it; the part that extends the cached conversation is all
        that is evaluated. ``rendered`` is ``messages`` already rendered and tokenized (a
        server does that off the model's thread and checks it fits); without it, the
        oldest turns are dropped to fit. ``overrides`` go to ``Engine.generate`` (sampling,
        draft_max)."""
        if not messages or messages[-1].get("role") not in ("user", "tool"):
            raise ValueError("the last message must come from the user or a tool")
        self.history = [dict(m) for m in messages]
        return self._answer(gen, stats, overrides, rendered)

    def _answer(self, gen: GenerationConfig, stats: Stats | None, overrides: dict,
                rendered: Rendered | None = None) -> Iterator[Chunk]:
        try:
            if rendered is None:
                prompt, text = self._fit(gen.max_tokens)
            else:
                prompt, text = self._ids_for(rendered), rendered.text
                if len(prompt) + 1 > self.engine.n_ctx:
                    raise ValueError(f"the conversation needs {len(prompt)} tokens but the "
                                     f"context holds {self.engine.n_ctx}")
        except BaseException:
            self.history.pop()
            raise
        yield from self._stream(prompt, text, gen, stats, overrides)

    def _stream(self, prompt: list[int], text: str, gen: GenerationConfig,
                stats: Stats | None, overrides: dict) -> Iterator[Chunk]:
        parts: list[str] = []
        ids: list[int] = []
        try:
            for chunk in self.lane.generate(prompt, gen, stats, **overrides):
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
        """Render, dropping the oldest user/assistant pairs until prompt + answer fit (or,
        when even the last exchange is longer, until the prompt does)."""
        n_ctx = self.engine.n_ctx
        try:
            rendered, kept = fit(self.renderer, self.history, n_ctx - max_tokens)
        except ValueError:
            try:  # the answer gets what the context has left
                rendered, kept = fit(self.renderer, self.history, n_ctx - 1)
            except ValueError:
                n = self.renderer.render(self.history[-1:], tokenize=True).n_tokens
                raise ValueError(f"this message alone needs {n} tokens but the context "
                                 f"holds {n_ctx}; shorten it or raise -c/--ctx") from None
        self.dropped_turns += (len(self.history) - len(kept)) // 2
        self.history = kept
        return self._ids_for(rendered), rendered.text

    @property
    def cached_text(self) -> str:
        """The conversation text the lane's cache holds (what a follow-up can reuse)."""
        return self._text

    def held(self) -> tuple[str, list[int]]:
        """(text, ids) of the conversation the lane's cache holds (``adopt`` takes them)."""
        return self._text, list(self._ids)

    def adopt(self, text: str, ids: list[int]) -> None:
        """The lane's cache now holds ``ids``, which encode ``text`` (a prompt cache put
        another conversation's cells back): follow-ups extend it."""
        self._text, self._ids = text, list(ids)

    def reset(self) -> None:
        self.history = [m for m in self.history if m["role"] == "system"]
        self._text, self._ids = "", []
        self.lane.reset()

