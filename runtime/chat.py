"""Multi-turn chat on an ``Engine``: the GGUF's own chat template, history in the KV cache.

Each turn renders the whole conversation with the model's Jinja template and hands the
tokens to the engine, which reuses the cached prefix; so a turn evaluates only its new
tokens. When the conversation outgrows the context, the oldest turns are dropped (the
system message stays) and the user is told.
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

    Args:
        engine: the loaded model (and draft).
        system: an optional system message, kept when old turns are dropped.
    """

    def __init__(self, engine: Engine, system: str | None = None):
        self.engine = engine
        self.system = system
        self.turns: list[dict[str, str]] = []
        self.dropped_turns = 0
        model = engine.model
        template = model.chat_template()
        if not template:
            raise ChatTemplateError(f"{model.path.name} has no chat template; use "
                                    "`bridge generate` without --chat for plain completion")
        self._bos = _special_text(model, model.meta("tokenizer.ggml.bos_token_id"))
        eos = _special_text(model, model.meta("tokenizer.ggml.eos_token_id"))
        self._formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=self._bos)

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def render(self, messages: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids of the conversation followed by the assistant's generation prompt."""
        try:
            text = self._formatter(messages=messages or self.messages()).prompt
        except Exception as e:  # a template can raise anything; surface it plainly
            raise ChatTemplateError(f"the chat template failed to render: {e}") from None
        # the template may write the BOS text itself; never add a second one
        add_bos = not (self._bos and text.startswith(self._bos))
        return self.engine.model.tokenize(text, add_special=add_bos, parse_special=True)

    def ask(self, user: str, gen: GenerationConfig, stats: Stats | None = None
            ) -> Iterator[Chunk]:
        """Stream the assistant's answer to ``user``; the answer joins the history even if
        the stream is closed early (Ctrl-C), holding what was shown."""
        self.turns.append({"role": "user", "content": user})
        prompt = self._fit(gen.max_tokens)
        parts: list[str] = []
        try:
            for chunk in self.engine.generate(prompt, gen, stats):
                parts.append(chunk.text)
                yield chunk
        except BaseException:
            if not parts:  # nothing was answered: forget the question too
                self.turns.pop()
                raise
            self.turns.append({"role": "assistant", "content": "".join(parts)})
            raise
        self.turns.append({"role": "assistant", "content": "".join(parts)})

    def _fit(self, max_tokens: int) -> list[int]:
        """Render, dropping the oldest user/assistant pairs until prompt + answer fit."""
        n_ctx = self.engine.ctx.n_ctx
        ids = self.render()
        while len(ids) + max_tokens > n_ctx and len(self.turns) > 1:
            del self.turns[:2]
            self.dropped_turns += 1
            ids = self.render()
        if len(ids) + 1 > n_ctx:
            self.turns.pop()
            raise ValueError(f"this message alone needs {len(ids)} tokens but the context "
                             f"holds {n_ctx}; shorten it or raise -c/--ctx")
        return ids

    def reset(self) -> None:
        self.turns.clear()
        self.engine.decoder.reset()


def _special_text(model, token_id: str | None) -> str:
    if token_id is None or int(token_id) < 0:
        return ""
    return model.token_bytes(int(token_id), special=True).decode("utf-8", "replace")
