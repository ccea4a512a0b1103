"""One sequence's generation: the decode loop's steps turned into streamed text.

A ``Lane`` owns what belongs to one sequence of the target: its decoder (the KV
bookkeeping and the drafters that read its tokens), its sampler and its controller. An
``Engine`` has one lane per sequence its context holds (``--parallel``); lanes share only
what is the same for all of them: the model, the measured costs, the compiled constraints
and the drafting memory. So a request's sampling, seed, stop strings, stop rule, grammar,
logprobs and memory scope are set on the lane that serves it, for that request only, and
two requests on two lanes never see each other's settings.

The lane ends an answer where a stop string starts or where its stop rule says
(``runtime.stopping``), holding back the text (and its tokens) that either may still take
back, and keeps the decoder's caches and grammar state to the tokens it gave out.
"""

from __future__ import annotations

import bisect
import codecs
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from runtime.config import GenerationConfig, SamplingConfig
from runtime.constraint import Constraint, ConstraintSpec
from runtime.speculative import SpeculativeDecoder, Stats
from runtime.stopping import GO_ON, StopRule, split_stop

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Chunk:
    """A piece of streamed output: ``text`` (possibly empty while a multi-byte character,
    a possible stop string or what a stop rule may take back is held back), the token ids
    whose text it completes (a token is held back with its text, so every token given
    out is kept), and on the last chunk why generation ended (``eog``, ``stop``,
    ``length`` or ``context``)."""

    text: str
    tokens: list[int]
    finish_reason: str | None = None
    # per token, when asked for: (log-prob, [(token, log-prob) of the most likely])
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


class Lane:
    """One sequence of an engine's target, ready to generate.

    Args:
        engine: the owner (model, constraint compiler, memory, cost profile).
        decoder: this sequence's decode loop, over its own target view.
        index: the sequence's number (0 for a single-sequence engine).
    """

    def __init__(self, engine, decoder: SpeculativeDecoder, index: int = 0):
        self.engine = engine
        self.decoder = decoder
        self.index = index
        self.sampler = decoder.sampler
        self.controller = decoder.controller
        self.base_sampling = self.sampler.cfg
        self.base_draft_max = self.controller.draft_max
        self.last_stats: Stats | None = None

    @property
    def target(self):
        """This sequence's context (a ``LlamaContext`` or a ``SequenceView``)."""
        return self.decoder.target

    @property
    def tokens(self) -> list[int]:
        """The tokens this sequence's cache holds (its prompt cache between requests)."""
        return self.decoder.kv

    def generate(self, prompt: str | list[int], gen: GenerationConfig | None = None,
                 stats: Stats | None = None, sampling: SamplingConfig | None = None,
                 draft_max: int | None = None, scope: str = "", use_memory: bool = True,
                 constraint: ConstraintSpec | None = None, logprobs: int | None = None,
                 stop_rule: StopRule | None = None) -> Iterator[Chunk]:
        """Stream the continuation of ``prompt``: see ``Engine.generate``."""
        engine = self.engine
        gen = gen or GenerationConfig()
        compiled = engine.compile(constraint) if constraint is not None else None
        ids = engine.model.tokenize(prompt, add_special=True, parse_special=True) \
            if isinstance(prompt, str) else list(prompt)
        stats = stats if stats is not None else Stats()
        self.last_stats = stats
        # this request's settings, on this lane only; the next request sets its own
        self.sampler.reconfigure(sampling or self.base_sampling)
        self.controller.draft_max = engine.draft_cap(draft_max) if draft_max is not None \
            else self.base_draft_max
        drafters = self.decoder.drafters
        memory = drafters.get("memory")
        if memory is not None:
            memory.scope = scope
            if not use_memory:
                del drafters["memory"]
        view = self.target
        rounds0 = getattr(view, "rounds", 0), getattr(view, "round_rows", 0)
        out: list[int] = []
        try:
            for chunk in self._stream(ids, gen, stats, compiled, logprobs, stop_rule):
                out.extend(chunk.tokens)
                yield chunk
        finally:
            # the lane's own defaults again (a caller reading them sees no request's)
            self.sampler.reconfigure(self.base_sampling)
            self.controller.draft_max = self.base_draft_max
            if memory is not None:
                drafters["memory"] = memory
                if use_memory and out:
                    engine.memory.add(ids + out, scope)
            stats.batch_rounds = getattr(view, "rounds", 0) - rounds0[0]
            stats.batch_rows = getattr(view, "round_rows", 0) - rounds0[1]
            engine.save_costs()

    def _stream(self, ids: list[int], gen: GenerationConfig, stats: Stats,
                constraint: Constraint | None, n_logprobs: int | None,
                rule: StopRule | None) -> Iterator[Chunk]:
        model = self.engine.model
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""             # the answer's text so far
        ends: list[int] = []  # len(text) after each generated token
        toks: list[int] = []  # the generated tokens, and their log-probs when asked for
        lps: list = []
        shown = n_shown = 0   # characters and tokens yielded so far
        steps = self.decoder.generate(ids, gen.max_tokens, model.is_eog, stats,
                                      constraint, n_logprobs)
        n_keep: int | None = None  # where a stop string or the rule ends the answer
        try:
            for step in steps:
                piece = ""
                for t in step.tokens:
                    if not model.is_eog(t):
                        piece += decoder.decode(model.token_bytes(t))
                    ends.append(len(text) + len(piece))
                text += piece
                toks += step.tokens
                lps += step.logprobs or []
                verdict = rule.feed(piece, step.tokens) if rule is not None else GO_ON
                out, _, cut = split_stop(text[shown:], gen.stop)
                if cut is not None and (verdict.end is None or shown + cut <= verdict.end):
                    # a stop string: keep the tokens whose text ends before it, and no more
                    n_keep = bisect.bisect_right(ends, shown + cut)
                    break
                if verdict.end is not None:
                    n_keep = _through(ends, verdict.end)
                    break
                # show what no stop string or rule may take back, and the tokens whose
                # text is all shown (so a held-back token is never sent, then dropped)
                safe = shown + len(out)
                if verdict.hold is not None:
                    safe = max(shown, min(safe, verdict.hold))
                n = max(n_shown, bisect.bisect_right(ends, safe))
                yield Chunk(text[shown:safe], toks[n_shown:n], stats.finish_reason,
                            lps[n_shown:n] or None)
                shown, n_shown = safe, n
            else:
                # the answer ended by itself: nothing is held back any more, unless the
                # rule's last verdict ends it earlier (a repeated call only the end closed)
                text += decoder.decode(b"", final=True)
                end = rule.finish().end if rule is not None else None
                if end is None:
                    if len(text) > shown or len(toks) > n_shown:
                        yield Chunk(text[shown:], toks[n_shown:], stats.finish_reason,
                                    lps[n_shown:] or None)
                    return
                n_keep = _through(ends, end)
            n_keep = max(n_keep, n_shown)  # what was given out is never taken back
            steps.close()
            self.decoder.keep(len(ids) + n_keep)
            stats.n_tokens, stats.finish_reason = n_keep, "stop"
            text_end = max(shown, ends[n_keep - 1] if n_keep else 0)
            yield Chunk(text[shown:text_end], toks[n_shown:n_keep], "stop",
                        lps[n_shown:n_keep] or None)
        finally:
            steps.close()  # runs the decoder's finally: caches match the emitted tokens

    def reset(self) -> None:
        """Forget the conversation: every cache of this sequence starts empty."""
        self.decoder.reset()

    def snapshot(self):
        """This sequence's cells, serialized (a ``SequenceView``'s: shared rounds only);
        they hold ``self.tokens``."""
        return self.target.snapshot()

    def restore(self, tokens: list[int], state) -> None:
        """Hold ``tokens`` from ``state`` (a ``snapshot`` of this lane or another)
        instead of the current conversation; the drafters index them as they catch up."""
        self.decoder.reset()
        self.target.restore(state, len(tokens))  # on failure the sequence stays empty
        self.decoder.kv.extend(tokens)


def _through(ends: list[int], offset: int) -> int:
    """How many tokens to keep so the text reaches ``offset``: the tokens that reach it
    whole (a token may hold the last character of a call and the first of the next)."""
    return min(bisect.bisect_left(ends, offset) + 1, len(ends))
