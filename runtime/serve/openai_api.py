"""The OpenAI API's shapes for ``bridge serve``: request bodies, their validation into
bridge's settings, and the response objects (whole answers, stream chunks, ``timings``).

Everything here is pure: no model, no HTTP. ``runtime.serve.app`` owns the app and
``runtime.serve.worker`` the worker.

bridge's extensions are top-level request fields, as llama-server's are: ``top_k``,
``min_p``, ``repeat_penalty``/``repeat_last_n``, DRY (``dry_multiplier``, ``dry_base``,
``dry_allowed_length``, ``dry_penalty_last_n``, ``dry_sequence_breakers``; OpenAI's
``presence_penalty`` and ``frequency_penalty`` too, all with llama.cpp's semantics:
``runtime.penalties``), ``speculative.n_max``, ``shared_drafts`` (false: this
request neither drafts from nor adds to the server's drafting memory) and
``return_tokens`` (true: each choice also carries the generated token ids).

Structured output: ``response_format`` (``json_schema``, ``json_object``, ``text``), and
llama-server's top-level ``json_schema`` and ``grammar`` (GBNF); at most one of them.
A field that would change what the answer must be and that bridge does not honour is
refused with a 400, never ignored: they are all listed in ``_REFUSED``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime import tools as tool_calls
from runtime.config import GenerationConfig, SamplingConfig, SpeculativeConfig
from runtime.constraint import ConstraintSpec
from runtime.speculative import Stats
from runtime.tools import ToolCall, ToolError, ToolSpec

# engine finish reasons -> OpenAI's; a full context is an answer cut for length, as the
# capped max_tokens it stands for (OpenAI has no other name for it)
FINISH_REASONS = {"eog": "stop", "stop": "stop", "length": "length", "context": "length"}


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` object."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# -- request bodies ---------------------------------------------------------------------

class _Body(BaseModel):
    # clients send fields bridge has no use for (user, metadata, ...): accept and ignore
    model_config = ConfigDict(extra="allow")


class SpeculativeOverride(BaseModel):
    """llama-server's per-request ``"speculative"`` object; bridge takes its ``n_max``."""

    model_config = ConfigDict(extra="forbid")
    n_max: int | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class CompletionBody(_Body):
    model: str | None = None
    prompt: str | list[str] | list[int]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # llama-server's extensions, same meaning as in bridge
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    dry_multiplier: float | None = None  # llama-server's DRY sampler, its names
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_penalty_last_n: int | None = None
    dry_sequence_breakers: list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    speculative: SpeculativeOverride | None = None
    shared_drafts: bool = True  # bridge: false keeps this request out of the memory
    return_tokens: bool = False  # bridge (llama-server's name): token ids in each choice
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    response_format: dict | None = None
    grammar: str | None = None  # llama-server: a GBNF grammar
    json_schema: dict | None = None  # llama-server: a JSON schema


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCallIn(_Body):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant
    tool_call_id: str | None = None  # tool


class ChatBody(CompletionBody):
    prompt: None = None
    messages: list[Message] = Field(min_length=1)
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True


def parse(model: type[BaseModel], payload: object) -> BaseModel:
    """``payload`` validated as ``model``; the first problem becomes an ``APIError``."""
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise APIError(f"{loc}: {err['msg']}" if loc else err["msg"],
                       param=loc or None) from None


# -- from a request to bridge's settings --------------------------------------------------

# THE list of request fields that would change what the answer must be and that bridge
# does not honour: each is refused (400) unless absent, null or at its neutral value.
# Other unknown fields (user, metadata, store, cache_prompt, ...) cannot change the answer
# and are accepted and ignored.
_REFUSED: dict[str, tuple[tuple, str]] = {
    # field: (neutral values, why it is refused otherwise)
    "echo": ((False,), "echo is not supported"),
    "suffix": (("",), "suffix (fill-in-the-middle) is not supported"),
    "best_of": ((1,), "best_of must be 1"),
    "logit_bias": (({},), "logit_bias is not supported"),
    # OpenAI's deprecated function calling: ignoring it would answer without the functions
    "functions": ((), "use tools (OpenAI's deprecated functions field is not supported)"),
    "function_call": ((), "use tool_choice (OpenAI's deprecated function_call is not "
                          "supported)"),
    "prediction": ((), "predicted outputs are not supported"),
    "audio": ((), "audio output is not supported"),
    "modalities": ((["text"],), "only text output is supported"),
    # llama-server's sampler extensions bridge does not implement
    "n_probs": ((0,), "use logprobs/top_logprobs"),
    "typical_p": ((1, 1.0), "typical sampling is not supported"),
    "tfs_z": ((1, 1.0), "tail-free sampling is not supported"),
    "mirostat": ((0,), "mirostat is not supported"),
    "xtc_probability": ((0, 0.0), "XTC sampling is not supported"),
    "ignore_eos": ((False,), "ignore_eos is not supported"),
    "samplers": ((), "a custom sampler chain is not supported"),
}
MAX_TOP_LOGPROBS = 20
# request fields that are ``SamplingConfig`` fields of the same name
_PENALTIES = ("repeat_penalty", "repeat_last_n", "frequency_penalty", "presence_penalty",
              "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
              "dry_sequence_breakers")


@dataclass(frozen=True)
class RequestSettings:
    """What one request asks of the engine, validated."""

    gen: GenerationConfig
    sampling: SamplingConfig
    draft_max: int | None
    use_memory: bool
    constraint: ConstraintSpec | None = None
    logprobs: int | None = None  # top alternatives per token; None: no logprobs

    def overrides(self, scope: str) -> dict:
        """Keyword arguments for ``Engine.generate`` (and ``ChatSession.ask_messages``)."""
        return {"sampling": self.sampling, "draft_max": self.draft_max, "scope": scope,
                "use_memory": self.use_memory, "constraint": self.constraint,
                "logprobs": self.logprobs}


def settings(default_sampling: SamplingConfig, default_gen: GenerationConfig,
             body: CompletionBody) -> RequestSettings:
    """The request's settings: the server's defaults (from the command line), overridden by
    what the request names. The dataclasses validate and word the errors."""
    if body.n not in (None, 1):
        raise APIError(f"n must be 1, got {body.n}: bridge serves one choice per request",
                       param="n")
    extra = body.model_extra or {}
    for name, (neutral, why) in _REFUSED.items():
        value = extra.get(name, getattr(body, name, None))
        if value is not None and value not in neutral:
            raise APIError(f"{name}: {why}", param=name)
    given = {k: v for k, v in (("temp", body.temperature), ("top_p", body.top_p),
                               ("top_k", body.top_k), ("min_p", body.min_p),
                               ("seed", body.seed)) if v is not None}
    # the penalties keep their names (OpenAI's and llama-server's)
    given.update({k: getattr(body, k) for k in _PENALTIES if getattr(body, k) is not None})
    if "dry_sequence_breakers" in given:
        given["dry_sequence_breakers"] = tuple(given["dry_sequence_breakers"])
    try:
        sampling = dataclasses.replace(default_sampling, **given)
    except ValueError as e:
        raise APIError(str(e)) from None
    draft_max = body.speculative.n_max if body.speculative is not None else None
    if draft_max is not None:
        try:
            SpeculativeConfig(draft_max=draft_max)
        except ValueError as e:
            raise APIError(f"speculative.n_max: {e}", param="speculative.n_max") from None
    n = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    if n is not None and n < 1:
        raise APIError(f"max_tokens must be >= 1, got {n}", param="max_tokens")
    stop = default_gen.stop if body.stop is None else \
        tuple(s for s in ([body.stop] if isinstance(body.stop, str) else body.stop) if s)
    gen = dataclasses.replace(default_gen, max_tokens=n or default_gen.max_tokens, stop=stop)
    return RequestSettings(gen, sampling, draft_max, body.shared_drafts, constraint(body),
                           n_logprobs(body))


def constraint(body: CompletionBody) -> ConstraintSpec | None:
    """The one constraint a request asks for: ``response_format``, or llama-server's
    ``json_schema`` or ``grammar``; two of them is an error."""
    given = []
    rf = body.response_format
    if rf is not None and rf.get("type", "text") != "text":
        given.append("response_format")
    if body.json_schema is not None:
        given.append("json_schema")
    if body.grammar is not None:
        given.append("grammar")
    if len(given) > 1:
        raise APIError(f"give one of response_format, json_schema and grammar, not "
                       f"{' and '.join(given)}", param=given[1])
    try:
        if body.grammar is not None:
            return ConstraintSpec("gbnf", body.grammar)
        if body.json_schema is not None:
            return ConstraintSpec.from_schema(body.json_schema)
        if rf is None:
            return None
        return _response_format(rf)
    except ValueError as e:
        raise APIError(str(e), param=given[0] if given else None) from None


def _response_format(rf: dict) -> ConstraintSpec | None:
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        # llama-server also takes a schema here
        schema = rf.get("schema")
        return ConstraintSpec.from_schema(schema) if schema is not None \
            else ConstraintSpec("json")
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ValueError("response_format.json_schema.schema is missing")
        # strict or not, the schema is enforced: every answer validates against it
        return ConstraintSpec.from_schema(spec["schema"])
    raise ValueError(f"response_format.type must be text, json_object or json_schema, "
                     f"got {kind!r}")


def n_logprobs(body: CompletionBody) -> int | None:
    """How many top log-probs per token the request wants (None: no logprobs). Chat asks
    with ``logprobs: true`` and ``top_logprobs: N``; completions with ``logprobs: N``."""
    lp, top = body.logprobs, body.top_logprobs
    if isinstance(body, ChatBody):
        if lp not in (None, True, False):
            raise APIError("logprobs must be true or false", param="logprobs")
        if top is not None and not lp:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        n = (top or 0) if lp else None
    else:
        n = None if lp is None or lp is False else int(lp) if lp is not True else 0
    if n is not None and not 0 <= n <= MAX_TOP_LOGPROBS:
        raise APIError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {n}",
                       param="top_logprobs" if isinstance(body, ChatBody) else "logprobs")
    return n


def tool_spec(body: ChatBody) -> ToolSpec:
    """The request's tools, ``tool_choice`` and ``parallel_tool_calls``, validated."""
    choice = body.tool_choice
    if isinstance(choice, dict):  # {"type": "function", "function": {"name": ...}}
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str):
            raise APIError("tool_choice: a named choice is {\"type\": \"function\", "
                           "\"function\": {\"name\": ...}}", param="tool_choice")
        choice = fn["name"]
    elif choice is not None and choice not in tool_calls.CHOICES:
        raise APIError(f"tool_choice must be none, auto, required or a named function, "
                       f"got {choice!r}", param="tool_choice")
    try:
        tools = tool_calls.check_tools(body.tools or [])
        return ToolSpec(tools, choice or "auto", body.parallel_tool_calls)
    except ToolError as e:
        raise APIError(str(e), param=e.param) from None


def messages(body: ChatBody) -> list[dict]:
    """The chat's messages as the template wants them (text parts joined; assistant
    ``tool_calls`` and ``tool`` results kept in OpenAI's shape)."""
    out: list[dict] = []
    call_ids: set[str] = set()
    for i, m in enumerate(body.messages):
        content = m.content or ""
        if isinstance(content, list):  # content parts: text only
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(f"messages.{i}.content: only text parts are supported, "
                                   f"got type {part.get('type')!r}", param=f"messages.{i}")
                parts.append(part["text"])
            content = "".join(parts)
        role = "system" if m.role == "developer" else m.role
        msg: dict = {"role": role, "content": content}
        if m.tool_calls:
            if role != "assistant":
                raise APIError(f"messages.{i}.tool_calls: only assistant messages make "
                               "tool calls", param=f"messages.{i}.tool_calls")
            msg["tool_calls"] = [c.model_dump(include={"id", "type", "function"})
                                 for c in m.tool_calls]
            call_ids.update(c.id for c in m.tool_calls)
        if role == "tool":
            if m.tool_call_id not in call_ids:
                raise APIError(f"messages.{i}.tool_call_id: {m.tool_call_id!r} matches no "
                               "tool call of an earlier assistant message",
                               param=f"messages.{i}.tool_call_id")
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    if out[-1]["role"] not in ("user", "tool"):
        raise APIError("the last message must be a user message or a tool result",
                       param="messages")
    return out


def completion_prompt(body: CompletionBody, n_vocab: int) -> str | list[int]:
    """The one prompt of a ``/v1/completions`` request: text or token ids."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError("one prompt per request", param="prompt")
        prompt = prompt[0]
    if not prompt:
        raise APIError("the prompt is empty", param="prompt")
    if isinstance(prompt, list) and not all(0 <= t < n_vocab for t in prompt):
        raise APIError(f"prompt: token ids must be in 0..{n_vocab - 1}", param="prompt")
    return prompt


# -- responses ----------------------------------------------------------------------------

def timings(stats: Stats) -> dict:
    """llama-server's ``timings`` object, plus bridge's mode, target steps and per-source
    draft counts (``sources``: {name: {steps, drafted, accepted}})."""
    s = stats.as_dict()
    pn, pms = s["n_prompt_evaluated"], s["prompt_seconds"] * 1e3
    dn, dms = s["n_tokens"], s["decode_seconds"] * 1e3
    return {"cache_n": s["n_prompt"] - pn, "prompt_n": pn, "prompt_ms": round(pms, 3),
            "prompt_per_token_ms": round(pms / pn, 3) if pn else 0.0,
            "prompt_per_second": round(1e3 * pn / pms, 3) if pms > 0 else 0.0,
            "predicted_n": dn, "predicted_ms": round(dms, 3),
            "predicted_per_token_ms": round(dms / dn, 3) if dn else 0.0,
            "predicted_per_second": s["tokens_per_s"],
            "draft_n": s["n_drafted"], "draft_n_accepted": s["n_accepted"],
            # the first token comes with the prompt's evaluation; each later step is one
            # target evaluation: tokens_per_step = (predicted_n - 1) / n_steps
            "n_steps": s["n_steps"], "tokens_per_step": s["tokens_per_step"],
            "mode": s["mode"], "sources": s.get("sources", {})}


def finish_reason(stats: Stats, called: bool = False) -> str | None:
    """OpenAI's reason; an answer that ended on its own after tool calls: ``tool_calls``
    (one cut for length keeps ``length``)."""
    reason = FINISH_REASONS.get(stats.finish_reason, stats.finish_reason)
    return "tool_calls" if called and reason == "stop" else reason


def usage(stats: Stats, n_completion: int) -> dict:
    return {"prompt_tokens": stats.n_prompt, "completion_tokens": n_completion,
            "total_tokens": stats.n_prompt + n_completion}


def head(kind: Literal["chat", "text"], model: str, created: int, uid: str) -> dict:
    """The fields every response object of one request shares."""
    chat = kind == "chat"
    return {"id": ("chatcmpl-" if chat else "cmpl-") + uid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model}


def logprobs_object(chat: bool, entries: list[tuple[bytes, float, list[tuple[bytes, float]]]]
                    ) -> dict:
    """OpenAI's ``logprobs`` of a choice from (token bytes, log-prob, [(bytes, log-prob)]
    of the top alternatives) per token: chat's ``content`` list, or the completions API's
    parallel lists."""
    def text(b: bytes) -> str:
        return b.decode("utf-8", errors="replace")

    if chat:
        return {"content": [
            {"token": text(b), "logprob": lp, "bytes": list(b),
             "top_logprobs": [{"token": text(tb), "logprob": tlp, "bytes": list(tb)}
                              for tb, tlp in tops]}
            for b, lp, tops in entries]}
    return {"tokens": [text(b) for b, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{text(tb): tlp for tb, tlp in tops} for _, _, tops in entries]}


def logprob_entries(model) -> Callable[[object], list]:
    """A function from an engine ``Chunk`` to ``logprobs_object``'s entries for its tokens
    (end-of-generation tokens, which have no text, left out)."""
    def entries(chunk) -> list:
        return [(model.token_bytes(t), lp, [(model.token_bytes(a), alp) for a, alp in tops])
                for t, (lp, tops) in zip(chunk.tokens, chunk.logprobs or [], strict=False)
                if not model.is_eog(t)]

    return entries


def whole_response(top: dict, chat: bool, text: str | None, n_tokens: int, stats: Stats,
                   tokens: list[int] | None = None, logprobs: dict | None = None,
                   calls: list[ToolCall] | None = None) -> dict:
    """A non-streamed answer of ``n_tokens``; ``tokens`` (their ids) only when asked for;
    ``calls``: the tool calls read from it (``text`` then is None or what came beside)."""
    if chat:
        message: dict = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [c.as_dict() for c in calls]
        choice = {"index": 0, "message": message, "logprobs": logprobs,
                  "finish_reason": finish_reason(stats, bool(calls))}
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs,
                  "finish_reason": finish_reason(stats)}
    if tokens is not None:
        choice["tokens"] = tokens
    return {**top, "choices": [choice], "usage": usage(stats, n_tokens),
            "timings": timings(stats)}


def call_deltas(call: ToolCall, index: int) -> list[dict]:
    """A tool call's ``delta.tool_calls`` entries as OpenAI streams them: the first names
    the call (index, id, type, function name, empty arguments), the next carry the
    arguments' text (the ``openai`` client's stream helpers concatenate them)."""
    return [{"index": index, "id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": ""}},
            {"index": index, "function": {"arguments": call.arguments}}]


def stream_chunk(top: dict, chat: bool, text: str | None, reason: str | None, first: bool,
                 tokens: list[int] | None = None, logprobs: dict | None = None,
                 tool_call: dict | None = None,
                 **extra) -> dict:
    """One SSE event in OpenAI's chunk format (``text`` None: no content, as on the last
    chunk); ``first`` adds the assistant role to a chat delta; ``tool_call``: one
    ``delta.tool_calls`` entry (``call_deltas``)."""
    if chat:
        delta: dict = {} if text is None else {"content": text}
        if tool_call is not None:
            delta["tool_calls"] = [tool_call]
        if (text is not None or tool_call is not None) and first:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": logprobs,
                  "finish_reason": reason}
    if tokens is not None:
        choice["tokens"] = tokens
    obj = {**top, "object": "chat.completion.chunk" if chat else "text_completion",
           "choices": [choice], **extra}
    return {"data": json.dumps(obj, ensure_ascii=False)}
