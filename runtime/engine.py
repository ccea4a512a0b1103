"""The public runtime object: a target GGUF, its draft, and text in and out.

``Engine`` puts three parts together, each changed in its own place: the models and
contexts it runs on (``runtime.loading``: the target, the draft found for it and checked
against it, exact mode's widest batch, the RPC watchdog), the draft sources each lane
has (``runtime.drafters.sources``), and the measured costs the lanes' controllers read,
stored between runs (``runtime.profiles``). It builds one ``Lane`` (``runtime.lane``) per
sequence of the target's context: the lane turns the token-level decode loop into
streamed text with stop strings. With ``parallel`` > 1 the sequences live in one context
(a cache stream each, or one unified cache) and are evaluated together, a round at a time
(``runtime.batching``); the lanes share the measured costs, the compiled constraints and
the drafting memory, and nothing else. ``close()`` frees every native resource.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from runtime.batching import SharedContext
from runtime.config import GenerationConfig, RuntimeConfig, SamplingConfig, SpeculativeConfig
from runtime.constraint import Constraint, ConstraintCompiler, ConstraintSpec
from runtime.controller import GammaController
from runtime.costs import CostModel
from runtime.drafters.memory import DraftMemory
from runtime.drafters.sources import make_drafters, source_names
from runtime.lane import Chunk, Lane
from runtime.loading import Models, check_draft_matches, check_gguf, find_draft
from runtime.native import on_passing_thread
from runtime.penalties import Breakers
from runtime.profiles import profile_key, save_profile, stored_costs
from runtime.sampling import Sampler
from runtime.speculative import SpeculativeDecoder, Stats
from runtime.stopping import StopRule

__all__ = ["Chunk", "Engine", "Lane", "check_draft_matches"]

log = logging.getLogger(__name__)

# batch widths timed before serving several sequences (see SharedContext.calibrate)
_SHARED_WIDTHS = (1, 2, 4, 8, 16, 32, 64)


class Engine:
    """A target model plus its draft sources, ready to generate.

    Args:
        model: path of the full GGUF (``runtime.models.resolve_gguf`` turns a hub id or a
            bundled name into one).
        draft: path of the draft GGUF; ``"auto"`` looks for ``MODEL.draft.gguf`` beside the
            model, then, for a model in the Hugging Face cache, for the draft ``bridge
            export`` wrote elsewhere for this very file (``runtime.files.drafts_for``), and
            runs without one if there is none; ``None`` disables it.
        runtime: llama.cpp resources; speculative / sampling: see their dataclasses.
            ``speculative.drafter`` picks the sources: ``auto`` (lookup, plus the pruned
            draft when one was found), ``lookup``, ``pruned`` or ``none``.
            ``runtime.parallel`` sequences share the target's cache, one ``Lane`` each.
        memory: a drafting memory shared across requests (a server's): with ``auto`` or
            ``lookup`` it is one more source, and every finished sequence is added to it.
    """

    def __init__(self, model: str | Path, draft: str | Path | None = "auto",
                 runtime: RuntimeConfig | None = None,
                 speculative: SpeculativeConfig | None = None,
                 sampling: SamplingConfig | None = None,
                 memory: DraftMemory | None = None):
        self.runtime = runtime or RuntimeConfig()
        self.spec_cfg = speculative or SpeculativeConfig()
        self.sampling = sampling or SamplingConfig()
        model = Path(model)
        check_gguf(model, "model")
        self.draft_path = find_draft(model, draft, self.spec_cfg, self.runtime.parallel)
        self.memory = memory if self.spec_cfg.drafter in ("auto", "lookup") else None
        self._owned: list = []
        self._lock = threading.Lock()  # the compiled constraints and the stored profile
        self._breakers: dict[tuple[str, ...], Breakers] = {}  # DRY's, per breaker strings
        self._compiled: dict[ConstraintSpec, Constraint] = {}
        self.shared: SharedContext | None = None
        try:
            models = self._own(Models(model, self.draft_path, self.runtime,
                                      self.spec_cfg.draft_max))
            self.runtime = models.rt  # the sequences it opened (RuntimeConfig.parallel_auto)
            self.numerics, self.max_rows = models.numerics, models.max_rows
            self.model, self.ctx = models.model, models.ctx
            self.draft_model, self.draft_ctx = models.draft_model, models.draft_ctx
            self._build_lanes()
            self._compiler = ConstraintCompiler(self.model)
        except BaseException:
            self.close()
            raise

    def _build_lanes(self) -> None:
        """The costs the controllers share (a stored profile's, when one applies), one lane
        per sequence, and, for shared rounds, the round widths timed before serving."""
        rt, spec = self.runtime, self.spec_cfg
        self._sources = source_names(spec.drafter, self.memory is not None,
                                     self.draft_path is not None, self.max_rows)
        self._profile_key = profile_key(self.model.path, self.draft_path, self._sources,
                                        rt) if self._sources else None
        stored = None if spec.recalibrate or not self._sources \
            else stored_costs(self._profile_key)
        self.costs = stored if stored is not None else CostModel()
        if rt.parallel > 1:
            self.costs.smooth = True
            self.shared = self._own(SharedContext(self.ctx, rt.parallel, rt.prefill_chunk,
                                                  on_round=self.costs.add_verify))
            targets = self.shared.views
        else:
            targets = [self.ctx]
        self.lanes = [self._lane(i, t, stored is not None) for i, t in enumerate(targets)]
        if self.shared is not None and self._sources and spec.adaptive:
            widest = rt.parallel * (spec.draft_max + 1)
            widths = tuple(w for w in _SHARED_WIDTHS if w <= widest and
                           self.costs.n_verify.get(w, 0) < 2)
            # on a passing thread: the thread that generates keeps the process's only
            # OpenMP pool (see on_passing_thread)
            on_passing_thread(lambda: self.shared.calibrate(widths))

    def _lane(self, index: int, target, calibrated: bool) -> Lane:
        """One sequence's sampler, drafters, controller and decode loop over ``target``."""
        sampler = Sampler(self.sampling, self.dry_breakers)
        drafters = make_drafters(self._sources, self.memory, self.draft_ctx, sampler)
        load = (lambda s=index: self.shared.load(s)) if self.shared is not None else None
        controller = GammaController(
            self.draft_cap(self.spec_cfg.draft_max), self.spec_cfg.adaptive,
            has_pruned=self.draft_path is not None, costs=self.costs, load=load,
            split=self.shared is not None and not self.shared.unified)
        controller.calibrated_from_profile = calibrated
        if self.shared is not None:  # what this sequence's steps yield, for the others
            target.expected = lambda: controller.expected
        decoder = SpeculativeDecoder(target, drafters, sampler, controller,
                                     self.spec_cfg.p_min, max_rows=self.max_rows,
                                     forced_drafts=self.spec_cfg.forced_drafts)
        return Lane(self, decoder, index)

    def _own(self, obj):
        self._owned.append(obj)
        return obj

    def draft_cap(self, gamma: int) -> int:
        """``gamma`` within exact mode's widest bitwise-equal batch (unchanged otherwise)."""
        return gamma if self.max_rows is None else max(1, min(gamma, self.max_rows - 1))

    def save_costs(self) -> None:
        """Store the measured costs for the next run with the same files and settings."""
        if self._profile_key and self.spec_cfg.adaptive:
            with self._lock:
                save_profile(self._profile_key, self.costs.to_profile())

    @property
    def n_ctx(self) -> int:
        """The most tokens one sequence (a prompt and its answer) can hold."""
        return self.ctx.n_ctx_seq

    # -- the first lane, for callers that use one sequence --------------------------------

    @property
    def decoder(self) -> SpeculativeDecoder:
        return self.lanes[0].decoder

    @property
    def sampler(self) -> Sampler:
        return self.lanes[0].sampler

    @property
    def controller(self) -> GammaController:
        return self.lanes[0].controller

    @property
    def last_stats(self) -> Stats | None:
        return self.lanes[0].last_stats

    @property
    def sources(self) -> list[str]:
        """The draft sources this engine can choose from."""
        return list(self.decoder.drafters)

    @property
    def drafters(self) -> dict:
        """The draft sources by name (for benchmarks that run one source at a time)."""
        return dict(self.decoder.drafters)

    # -- generation -------------------------------------------------------------------

    def compile(self, spec: ConstraintSpec) -> Constraint:
        """A fresh constraint for ``spec`` on this model's vocabulary (the last few
        compiled grammars are kept: a server sees the same schema again and again).

        Raises:
            ValueError: an invalid schema or grammar, naming the problem.
        """
        with self._lock:
            c = self._compiled.pop(spec, None)
        if c is None:
            c = self._compiler.compile(spec)
        with self._lock:
            self._compiled[spec] = c  # most recently used last
            while len(self._compiled) > 16:
                del self._compiled[next(iter(self._compiled))]
        return c.fresh()  # each answer moves a matcher of its own

    def dry_breakers(self, breakers: tuple[str, ...]) -> Breakers:
        """DRY's sequence breakers as this model's tokens (each token's text is read once
        per breaker set, ~0.1 s for a 50k vocabulary; a server sees the same set again)."""
        with self._lock:
            table = self._breakers.get(breakers)
        if table is None:
            model = self.model
            pieces = [model.token_bytes(t, special=True) for t in range(model.n_vocab)]
            table = Breakers.build(pieces, model.tokenize_bytes, breakers)
            with self._lock:
                self._breakers[breakers] = table
                while len(self._breakers) > 8:
                    del self._breakers[next(iter(self._breakers))]
        return table

    def generate(self, prompt: str | list[int], gen: GenerationConfig | None = None,
                 stats: Stats | None = None, sampling: SamplingConfig | None = None,
                 draft_max: int | None = None, scope: str = "", use_memory: bool = True,
                 constraint: ConstraintSpec | None = None, logprobs: int | None = None,
                 stop_rule: StopRule | None = None) -> Iterator[Chunk]:
        """Stream the continuation of ``prompt`` (text, tokenized with special tokens parsed,
        or token ids) on the first lane. The last chunk carries ``finish_reason`` (``eog``,
        ``stop``, ``length`` or ``context``). The tokens returned and the KV cache end where
        the text ends, stop strings included. ``sampling`` and ``draft_max`` are this
        call's settings (the engine's defaults otherwise). With a drafting memory,
        ``scope`` says whose earlier requests may be drafted from (and where this one is
        stored); ``use_memory`` False keeps this request out of the memory both ways.
        ``constraint``: what the answer must match (it ends where the grammar is
        complete). ``logprobs``: each chunk carries its tokens' log-probs and this many top
        alternatives. ``stop_rule``: a fresh ``runtime.stopping.StopRule`` for this answer
        (e.g. ``CallReading.stop_rule()``, which ends an answer of tool calls before a
        repeated call); it ends the answer as a stop string does (``stop``). A chunk's
        tokens are those whose text it completes, so the tokens given out are always the
        ones the cache keeps. Figures land in ``stats``.

        Raises:
            ValueError: an invalid constraint (before anything is evaluated).
        """
        return self.lanes[0].generate(prompt, gen, stats, sampling, draft_max, scope,
                                      use_memory, constraint, logprobs, stop_rule)

    def complete(self, prompt: str | list[int], gen: GenerationConfig | None = None,
                 **overrides) -> tuple[str, list[int], Stats]:
        """Generate to the end; return (text, generated token ids, stats)."""
        stats = Stats()
        text, tokens = [], []
        for chunk in self.generate(prompt, gen, stats, **overrides):
            text.append(chunk.text)
            tokens.extend(chunk.tokens)
        return "".join(text), tokens, stats

    def reset(self) -> None:
        """Forget every conversation: every cache starts empty (costs stay measured)."""
        for lane in self.lanes:
            lane.reset()

    def close(self) -> None:
        for obj in reversed(self._owned):  # the shared rounds before the contexts they use
            obj.close()
        self._owned.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

