"""One sequence's generation: the decode loop's steps turned into streamed text.

A ``Lane`` owns what belongs to one sequence of the target: its decoder (the KV
bookkeeping and the drafters that read its tokens), its sampler and its controller. An
``Engine`` has one lane per sequence its context holds (``--parallel``); lanes share only
what is the same for all of them: the model, the measured costs, the compiled constraints
and the drafting memory. So a request's sampling, seed, stop strings, grammar, logprobs
and memory scope are set on the lane that serves it, for that request only, and two
requests on two lanes never see each other's settings.
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

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Chunk:
    """A piece of streamed output: ``text`` (possibly empty while a multi-byte character
    or a possible stop string is held back), the token ids it came from, and on the last
    chunk why generation ended (``eog``, ``stop``, ``length`` or ``context``)."""

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
                 constraint: ConstraintSpec | None = None, logprobs: int | None = None
                 ) -> Iterator[Chunk]:
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
            for chunk in self._stream(ids, gen, stats, compiled, logprobs):
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
                constraint: Constraint | None, n_logprobs: int | None) -> Iterator[Chunk]:
        model = self.engine.model
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        held = ""      # text held back because it may be the start of a stop string
        shown = 0      # characters yielded so far
        ends: list[int] = []  # text length after each generated token
        steps = self.decoder.generate(ids, gen.max_tokens, model.is_eog, stats,
                                      constraint, n_logprobs)
        try:
            for step in steps:
                for t in step.tokens:
                    if not model.is_eog(t):
                        held += decoder.decode(model.token_bytes(t))
                    ends.append(shown + len(held))
                out, held, cut = split_stop(held, gen.stop)
                if cut is None:
                    shown += len(out)
                    yield Chunk(out, step.tokens, stats.finish_reason, step.logprobs)
                    continue
                # a stop string: keep the tokens whose text ends before it, and no more
                n_keep = bisect.bisect_right(ends, shown + cut)
                text_end = ends[n_keep - 1] if n_keep else 0
                n_step = n_keep - (len(ends) - len(step.tokens))
                steps.close()
                self.decoder.keep(len(ids) + n_keep)
                stats.n_tokens, stats.finish_reason = n_keep, "stop"
                yield Chunk(out[: max(0, text_end - shown)], step.tokens[:max(0, n_step)],
                            "stop", step.logprobs[:max(0, n_step)] if step.logprobs else None)
                return
            held += decoder.decode(b"", final=True)
            if held:
                yield Chunk(held, [], stats.finish_reason)
        finally:
            steps.close()  # runs the decoder's finally: caches match the emitted tokens

    def reset(self) -> None:
        """Forget the conversation: every cache of this sequence starts empty."""
        self.decoder.reset()


def split_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str, int | None]:
    """(text safe to emit, text to hold back, where a stop string starts in ``text`` or
    None). On a stop, the text to emit is everything before it."""
    if not stops:
        return text, "", None
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "", cut
    # hold back the longest tail that is a prefix of some stop string
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold], text[len(text) - hold:], None
