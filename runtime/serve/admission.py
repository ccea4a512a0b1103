"""What ``bridge serve`` checks and prepares before a request reaches the model's thread.

The model has one thread, so anything slow done there stalls every client. Here, on the
event loop or a helper thread:
- cheap bounds first: message count, field ranges, and a lower bound on the prompt's
  tokens from its bytes (no token is longer than the vocabulary's longest piece), so a
  20 MB message is refused without being tokenized;
- then the prompt is rendered and tokenized (linear in its length, ``runtime.chat_render``)
  and checked against the context under the request's overflow policy:
  - ``error`` (default): OpenAI's rule, a 400 ``context_length_exceeded`` when prompt +
    ``max_tokens`` exceed the context. An omitted ``max_tokens``, or one no prompt could
    satisfy (at least the whole context), means "as long as fits": it is capped;
  - ``cap``: ``max_tokens`` is capped to what the context has left (llama-server's rule);
  - ``trim``: the oldest turns are dropped until prompt + ``max_tokens`` fit, and the
    response says how many (``dropped_messages``).
  A capped answer that runs out of room ends with ``finish_reason: "length"``. The prompt
  itself is never shortened unless ``trim`` was asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.chat_render import ChatRenderer, Rendered, fit
from runtime.serve.openai_api import APIError

OVERFLOW_POLICIES = ("error", "cap", "trim")
MAX_INT = 2**31 - 1  # llama.cpp's token counts and top-k are int32
MAX_SEED = 2**64 - 1
MAX_STOPS, MAX_STOP_CHARS = 16, 1000  # OpenAI takes 4 stop strings


@dataclass(frozen=True)
class Limits:
    """The bounds of one server.

    Args:
        n_ctx: the context size, in tokens.
        max_piece: bytes of the vocabulary's longest token (for the byte lower bound).
        max_messages: most messages a chat may have.
        overflow: the default overflow policy (a request may name its own).
    """

    n_ctx: int
    max_piece: int
    max_messages: int = 4096
    overflow: str = "error"

    def __post_init__(self) -> None:
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"--context-overflow must be one of {', '.join(OVERFLOW_POLICIES)}"
                             f", got {self.overflow!r}")
        if self.max_messages < 1:
            raise ValueError(f"--max-messages must be >= 1, got {self.max_messages}")


@dataclass
class Admitted:
    """A request that fits: the messages kept (chat) or prompt ids (completion), its
    rendering, the answer's token budget, and how many messages ``trim`` dropped."""

    max_tokens: int
    rendered: Rendered | None = None
    messages: list[dict[str, str]] | None = None
    prompt: list[int] | None = None
    dropped: int = 0


def check_ranges(body) -> None:
    """Fields whose size alone could break the engine (a 10**30 seed or top_k) or slow the
    model's thread (stop strings are searched for after every step)."""
    for name, lo, hi in (("max_tokens", 1, MAX_INT), ("max_completion_tokens", 1, MAX_INT),
                         ("top_k", 0, MAX_INT), ("seed", 0, MAX_SEED)):
        v = getattr(body, name, None)
        if v is not None and not lo <= v <= hi:
            raise APIError(f"{name} must be in {lo}..{hi}, got {v}", param=name)
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stop) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} "
                       "characters", param="stop")


def policy_of(body, limits: Limits) -> str:
    given = (body.model_extra or {}).get("context_overflow")
    if given is None:
        return limits.overflow
    if given not in OVERFLOW_POLICIES:
        raise APIError(f"context_overflow must be one of {', '.join(OVERFLOW_POLICIES)}, "
                       f"got {given!r}", param="context_overflow")
    return given


def check_messages(messages: list[dict], limits: Limits, policy: str) -> None:
    """Refuse, before any tokenization, a chat with too many messages or more bytes than
    the context could hold even at the longest token per position."""
    if len(messages) > limits.max_messages:
        raise APIError(f"the chat has {len(messages)} messages; this server takes at most "
                       f"{limits.max_messages} (--max-messages)", param="messages",
                       code="too_many_messages")
    if policy == "trim":  # the oldest messages may go: only the last must fit alone
        messages = messages[-1:]
    _check_bytes(sum(len(m["content"].encode()) for m in messages), limits, "messages")


def _check_bytes(n_bytes: int, limits: Limits, param: str) -> None:
    at_least = n_bytes // limits.max_piece
    if at_least >= limits.n_ctx:
        raise _too_long(f"the prompt has {n_bytes} bytes, at least {at_least} tokens",
                        limits.n_ctx, param)


def _too_long(what: str, n_ctx: int, param: str, hint: str = "") -> APIError:
    return APIError(f"{what}, but this model's context holds {n_ctx} tokens{hint}; "
                    "shorten the prompt or start the server with a larger -c/--ctx",
                    param=param, code="context_length_exceeded")


def _budget(n_prompt: int, max_tokens: int, explicit: bool, policy: str, limits: Limits,
            param: str) -> int:
    """The answer's token budget for a prompt of ``n_prompt`` tokens, or an APIError."""
    n_ctx = limits.n_ctx
    if n_prompt + 1 > n_ctx:  # not even one token of answer fits
        raise _too_long(f"the prompt has {n_prompt} tokens", n_ctx, param)
    if n_prompt + max_tokens <= n_ctx:
        return max_tokens
    if policy == "cap" or not explicit or max_tokens >= n_ctx:
        return n_ctx - n_prompt
    raise _too_long(f"this request needs {n_prompt + max_tokens} tokens ({n_prompt} in the "
                    f"prompt, max_tokens {max_tokens})", n_ctx, param,
                    f"; send max_tokens <= {n_ctx - n_prompt}, or \"context_overflow\": "
                    "\"cap\" (a shorter answer) or \"trim\" (drop the oldest turns)")


def admit_chat(renderer: ChatRenderer, messages: list[dict], max_tokens: int,
               explicit: bool, policy: str, limits: Limits, tool_text: str = "",
               **extra) -> Admitted:
    """Render and tokenize a chat, and fit it under ``policy`` (linear in its length).

    Args:
        max_tokens: the answer's length, as asked (or the server's default).
        explicit: whether the request named ``max_tokens``.
        tool_text: the request's tool definitions as text: refused (naming ``tools``)
            when they alone fill the context.
        extra: ``tools`` and ``prefill`` for ``ChatRenderer.render``.

    Raises:
        APIError: 400 ``context_length_exceeded``, or the template refused the chat.
    """
    if tool_text:
        _check_bytes(len(tool_text.encode()), limits, "tools")
        n_tools = len(renderer.model.tokenize(tool_text, add_special=False,
                                              parse_special=False))
        if n_tools + 1 > limits.n_ctx:
            raise _too_long(f"the tools take {n_tools} tokens", limits.n_ctx, "tools")
    try:
        rendered = renderer.render(messages, **extra)
        n = rendered.n_tokens
        if policy == "trim" and n + max_tokens > limits.n_ctx:
            # a max_tokens no prompt could satisfy means "as long as fits": keep a quarter
            room = max_tokens if max_tokens < limits.n_ctx else limits.n_ctx // 4
            budget = limits.n_ctx - room
            try:
                rendered, kept = fit(renderer, messages, budget, **extra)
            except ValueError as e:
                raise _too_long(str(e), limits.n_ctx, "messages") from None
            return Admitted(min(max_tokens, limits.n_ctx - rendered.n_tokens), rendered,
                            kept, dropped=len(messages) - len(kept))
    except ValueError as e:  # ChatTemplateError: the template raised
        raise APIError(str(e), param="messages") from None
    budget = _budget(n, max_tokens, explicit, policy, limits, "messages")
    return Admitted(budget, rendered, messages)


def admit_completion(model, prompt: str | list[int], max_tokens: int, explicit: bool,
                     policy: str, limits: Limits) -> Admitted:
    """Tokenize a completion prompt (markup in it is the caller's own, so special tokens
    are parsed, as ``bridge generate`` does) and fit it; ``trim`` acts as ``cap``."""
    if isinstance(prompt, str):
        _check_bytes(len(prompt.encode()), limits, "prompt")
        prompt = model.tokenize(prompt, add_special=True, parse_special=True)
    budget = _budget(len(prompt), max_tokens, explicit, "cap" if policy == "trim" else policy,
                     limits, "prompt")
    return Admitted(budget, prompt=list(prompt))


def longest_piece(model, n_vocab: int) -> int:
    """Bytes of the vocabulary's longest token, read once at start (tens of ms)."""
    return max(1, max(len(model.token_bytes(t, special=True)) for t in range(n_vocab)))
