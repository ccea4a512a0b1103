"""What ``bridge serve`` sends back for one generation: a whole answer, or OpenAI's
stream of chunks; with tools, the answer is read for calls (``runtime.tool_reading``) on
the way."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator

import anyio

from runtime import tool_reading
from runtime.serve import openai_api as api
from runtime.serve.openai_api import APIError
from runtime.serve.worker import DONE, Interrupted, Job, next_item
from runtime.tool_reading import CallReading


async def whole(job: Job, item: object, top: dict, chat: bool, return_tokens: bool,
                watcher: asyncio.Future, calls: CallReading | None = None,
                lp: Callable | None = None) -> dict:
    """The whole answer as one response object; ``lp`` turns a chunk into its logprobs
    entries (``api.logprob_entries``) when they were asked for."""
    parser = calls.parser() if calls is not None else None
    text, tokens, found, lps = [], [], [], []
    while item is not DONE:
        if isinstance(item, Exception):
            raise item
        if parser is None:
            text.append(item.text)
        else:
            text += [e for kind, e in parser.feed(item.text, item.tokens) if kind == "content"]
        tokens.extend(item.tokens)
        if lp is not None:
            lps.extend(lp(item))
        item = await next_item(job, watcher)
    content: str | None = "".join(text)
    if parser is not None:
        content = parser.content("".join(
            [content] + [e for kind, e in parser.finish() if kind == "content"]))
        found = parser.calls
    return api.whole_response(top, chat, content, len(tokens), job.stats,
                              tokens if return_tokens else None,
                              api.logprobs_object(chat, lps) if lp is not None else None,
                              found)


async def events(job: Job, item: object, top: dict, chat: bool, include_usage: bool,
                 return_tokens: bool, stopping: anyio.Event, dropped: int = 0,
                 calls: CallReading | None = None, lp: Callable | None = None
                 ) -> AsyncIterator[dict]:
    """SSE events in OpenAI's chunk format (sse-starlette frames them). A client
    disconnect cancels this generator; a server shutdown ends it with an error event.
    Either way the job is cancelled. With tools, text that may open a call is held back
    until it is known, and each call goes out as ``delta.tool_calls`` chunks."""
    first, n = True, 0
    parser = calls.parser() if calls is not None else None
    watcher = asyncio.ensure_future(stopping.wait())
    try:
        while item is not DONE:
            if isinstance(item, APIError):
                yield {"data": json.dumps(item.body())}
                return
            n += len(item.tokens)
            if parser is not None:
                for chunk in _tool_chunks(top, parser.feed(item.text, item.tokens), parser,
                                          first):
                    first = False
                    yield chunk
            else:
                entries = lp(item) if lp is not None else []
                if item.text or first or (return_tokens and item.tokens) or entries:
                    yield api.stream_chunk(
                        top, chat, item.text, None, first,
                        item.tokens if return_tokens else None,
                        api.logprobs_object(chat, entries) if entries else None)
                    first = False
            try:
                item = await next_item(job, watcher)
            except Interrupted:
                err = APIError("the server is shutting down; the answer was cut short", 503,
                               kind="server_error", code="shutting_down")
                yield {"data": json.dumps(err.body())}
                return
        if parser is not None:
            for chunk in _tool_chunks(top, parser.finish(), parser, first):
                first = False
                yield chunk
        usage = api.usage(job.stats, n)
        extra = {"dropped_messages": dropped} if dropped else {}
        called = parser is not None and bool(parser.calls)
        yield api.stream_chunk(top, chat, None, api.finish_reason(job.stats, called), first,
                               usage=usage, timings=api.timings(job.stats), **extra)
        if include_usage:
            yield {"data": json.dumps({**top, "object": "chat.completion.chunk" if chat
                                       else "text_completion", "choices": [],
                                       "usage": usage})}
        yield {"data": "[DONE]"}
    finally:
        watcher.cancel()
        job.cancelled.set()


def _tool_chunks(top: dict, events: list, parser: tool_reading.CallParser, first: bool
                 ) -> Iterator[dict]:
    """Stream chunks for a parser's events: content deltas, and per call the
    ``delta.tool_calls`` entries OpenAI sends (index = the call's place in the answer)."""
    for kind, e in events:
        if kind == "content":
            if e:
                yield api.stream_chunk(top, True, e, None, first)
                first = False
            continue
        index = parser.calls.index(e)
        for delta in api.call_deltas(e, index):
            yield api.stream_chunk(top, True, None, None, first, tool_call=delta)
            first = False
