"""The public runtime object: a target GGUF, its draft, and text in and out.

``Engine`` owns both llama.cpp models and contexts (``close()`` frees them), finds the draft
beside the model (``MODEL.draft.gguf``) or, for a model in the HF cache, the one exported for
it (by the model's sha256), refuses a draft made for another model, and builds
one ``Lane`` (``runtime.lane``) per sequence of the target's context: the lane turns the
token-level decode loop into streamed text with stop strings. With ``parallel`` > 1 the
sequences live in one context (a cache stream each, or one unified cache) and are
evaluated together, a round at a time (``runtime.batching``); the lanes share the
measured costs, the compiled constraints and the drafting memory, and nothing else.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from runtime import keys
from runtime.batching import SharedContext
from runtime.config import GenerationConfig, RuntimeConfig, SamplingConfig, SpeculativeConfig
from runtime.constraint import Constraint, ConstraintCompiler, ConstraintSpec
from runtime.context import LlamaContext, LlamaModel, Numerics, llama_cpp_version
from runtime.controller import CostModel, GammaController
from runtime.drafters.lookup import LookupDrafter
from runtime.drafters.memory import DraftMemory, MemoryDrafter
from runtime.drafters.pruned import PrunedDrafter
from runtime.files import draft_path_for, drafts_for, sha256_file_cached
from runtime.hub_download import in_hf_cache
from runtime.lane import Chunk, Lane
from runtime.numerics import exact_width
from runtime.penalties import Breakers
from runtime.profiles import load_profile, save_profile
from runtime.rpc import RpcDevices, Watchdog, watch_aborts
from runtime.sampling import Sampler
from runtime.speculative import SpeculativeDecoder, Stats
from runtime.stopping import StopRule

__all__ = ["Chunk", "Engine", "Lane", "check_draft_matches"]

log = logging.getLogger(__name__)

# exact mode's probe text (any tokens would do; see runtime.numerics.exact_width)
_PROBE_TEXT = "The quick brown fox jumps over the lazy dog, and 17 times 23 is 391."
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
        _check_gguf(model, "model")
        n_seq = self.runtime.parallel
        # the pruned draft's context holds one sequence: it drafts for a single lane only
        use_pruned = self.spec_cfg.drafter in ("auto", "pruned")
        if n_seq > 1 and use_pruned and (self.spec_cfg.drafter == "pruned" or
                                         draft not in (None, "auto")):
            raise ValueError("a pruned draft (--draft, --drafter pruned) drafts for one "
                             f"sequence; use --parallel 1 with it, not --parallel {n_seq}")
        if n_seq > 1 and use_pruned and draft == "auto" and draft_path_for(model).is_file():
            log.info("%d sequences at once: the pruned draft beside the model is not used "
                     "(it drafts for one sequence; --parallel 1 uses it)", n_seq)
        use_pruned = use_pruned and n_seq == 1
        self.draft_path = self._resolve_draft(model, draft) if use_pruned else None
        if self.spec_cfg.drafter == "pruned" and self.draft_path is None:
            raise ValueError(f"--drafter pruned needs a draft GGUF, and none was found at "
                             f"{draft_path_for(model)}; make one with `bridge export "
                             f"{model} --prune 0.25`, pass --draft PATH, or use "
                             f"--drafter lookup")
        self._owned: list = []
        self._lock = threading.Lock()  # the compiled constraints and the stored profile
        self._breakers: dict[tuple[str, ...], Breakers] = {}  # DRY's, per breaker strings
        self.shared: SharedContext | None = None
        try:
            # only the target needs exact numerics: a draft is a proposal, checked anyway
            self.numerics = Numerics.exact() if self.runtime.exact else Numerics()
            rt = self.runtime
            if rt.rpc or rt.draft_rpc:
                # ggml-rpc aborts on a lost worker: say which one, in the caller's way
                watch_aborts(rt.rpc + rt.draft_rpc)
            target_devices = RpcDevices(rt.rpc) if rt.rpc else None
            self.model = self._own(LlamaModel(model, self.runtime.n_gpu_layers,
                                              repack=self.numerics.repack,
                                              devices=target_devices))
            self.ctx = self._own(self._context(self.model, self.numerics, n_seq))
            self.memory = memory if self.spec_cfg.drafter in ("auto", "lookup") else None
            if self.draft_path is not None:
                draft_devices = RpcDevices(rt.draft_rpc) if rt.draft_rpc else None
                self.draft_model = self._own(LlamaModel(self.draft_path,
                                                        self.runtime.n_gpu_layers,
                                                        devices=draft_devices))
                check_draft_matches(self.model, self.draft_model)
                self.draft_ctx = self._own(self._context(self.draft_model))
            # init-time computations on a passing thread (see on_passing_thread): the
            # thread that generates keeps the process's only OpenMP pool
            self.max_rows = on_passing_thread(self._exact_rows) if self.runtime.exact \
                else None
            sources = self._source_names()
            self._profile_key = self._profile_key_for(sources) if sources else None
            stored = None if self.spec_cfg.recalibrate or not sources \
                else load_profile(self._profile_key)
            self.costs = CostModel.from_profile(stored) if stored else CostModel()
            calibrated = stored is not None
            if n_seq > 1:
                self.costs.smooth = True
                self.shared = self._own(SharedContext(self.ctx, n_seq, rt.prefill_chunk,
                                                      on_round=self.costs.add_verify))
                targets = self.shared.views
            else:
                targets = [self.ctx]
            self.lanes = [self._lane(i, t, calibrated) for i, t in enumerate(targets)]
            if self.shared is not None and sources and self.spec_cfg.adaptive:
                widest = n_seq * (self.spec_cfg.draft_max + 1)
                widths = tuple(w for w in _SHARED_WIDTHS if w <= widest and
                               self.costs.n_verify.get(w, 0) < 2)
                on_passing_thread(lambda: self.shared.calibrate(widths))
            if rt.rpc or rt.draft_rpc:
                remote = [self.ctx] if rt.rpc else []
                if rt.draft_rpc and self.draft_path is not None:
                    remote.append(self.draft_ctx)
                self._own(Watchdog([lambda c=c: c.busy_since for c in remote],
                                   rt.rpc + rt.draft_rpc, rt.rpc_timeout))
            self._compiler = ConstraintCompiler(self.model)
            self._compiled: dict[ConstraintSpec, Constraint] = {}
        except BaseException:
            self.close()
            raise

    def _source_names(self) -> list[str]:
        """The draft sources every lane has (the memory is added per lane when present)."""
        if self.max_rows == 1:
            return []
        names = ["lookup"] if self.spec_cfg.drafter in ("auto", "lookup") else []
        if self.memory is not None:
            names.append("memory")
        if self.draft_path is not None:
            names.append("pruned")
        return names

    def _lane(self, index: int, target, calibrated: bool) -> Lane:
        """One sequence's sampler, drafters, controller and decode loop over ``target``."""
        sampler = Sampler(self.sampling, self.dry_breakers)
        drafters: list = []
        names = self._source_names()
        if "lookup" in names:
            drafters.append(LookupDrafter())
        if "memory" in names:
            drafters.append(MemoryDrafter(self.memory))
        if "pruned" in names:
            drafters.append(PrunedDrafter(self.draft_ctx, sampler))
        load = (lambda s=index: self.shared.load(s)) if self.shared is not None else None
        controller = GammaController(
            self.draft_cap(self.spec_cfg.draft_max), self.spec_cfg.adaptive,
            has_pruned=self.draft_path is not None, costs=self.costs, load=load)
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

    def _context(self, model: LlamaModel, numerics: Numerics | None = None,
                 n_seq: int = 1) -> LlamaContext:
        rt = self.runtime
        return LlamaContext(model, rt.n_ctx_total if n_seq > 1 else rt.n_ctx, rt.n_batch,
                            rt.n_threads, numerics, rt.backend_argmax, n_seq=n_seq,
                            unified=rt.kv_unified)

    def _exact_rows(self) -> int:
        """Exact mode: the widest batch that matches one-token steps bitwise here."""
        rows = exact_width(self.ctx, self.model.tokenize(_PROBE_TEXT, True),
                           self.spec_cfg.draft_max + 1)
        if rows == 1:
            log.warning("exact mode: this llama.cpp build rounds even a 2-token batch "
                        "differently from a 1-token step on this machine, so drafting is "
                        "off (output is plain decoding's)")
        elif rows <= self.spec_cfg.draft_max:
            log.info("exact mode: drafts capped at %d tokens, the widest batch whose logits "
                     "match one-token steps bitwise on this machine", rows - 1)
        return rows

    def draft_cap(self, gamma: int) -> int:
        """``gamma`` within exact mode's widest bitwise-equal batch (unchanged otherwise)."""
        return gamma if self.max_rows is None else max(1, min(gamma, self.max_rows - 1))

    def _profile_key_for(self, sources: list[str]) -> str:
        """Which stored device profile applies: same files, threads, offload and build."""
        draft = sha256_file_cached(self.draft_path) if self.draft_path else "none"
        rt = self.runtime
        return (f"{sha256_file_cached(self.model.path)}:{draft}:"
                f"{'+'.join(sorted(sources))}:t{rt.n_threads or 'all'}:"
                f"ngl{rt.n_gpu_layers}:b{rt.n_batch}:{'exact:' if rt.exact else ''}"
                f"{('unified:' if rt.kv_unified else 'shared:') if rt.parallel > 1 else ''}"
                f"{'rpc' + ','.join(map(str, rt.rpc)) + ':' if rt.rpc else ''}"
                f"{'draft-rpc' + ','.join(map(str, rt.draft_rpc)) + ':' if rt.draft_rpc else ''}"
                f"llama-cpp-python{llama_cpp_version()}")

    def save_costs(self) -> None:
        """Store the measured costs for the next run with the same files and settings."""
        if self._profile_key and self.spec_cfg.adaptive:
            with self._lock:
                save_profile(self._profile_key, self.costs.to_profile())

    @staticmethod
    def _resolve_draft(model: Path, draft: str | Path | None) -> Path | None:
        if draft is None:
            return None
        if draft == "auto":
            found = draft_path_for(model)
            if found.is_file():
                log.info("using the draft beside the model: %s", found)
                return found
            # a model in the HF cache has its draft elsewhere: `bridge export` indexed it
            # under the sha256 of the file it was cut from, which the draft also records.
            # Only there: a file elsewhere has its draft beside it, and an index lookup
            # would pick up drafts of experiments (a benchmark's, a test's) unasked.
            exported = drafts_for(sha256_file_cached(model)) if in_hf_cache(model) else []
            if exported:
                log.info("using the draft exported for this model (same sha256): %s",
                         exported[0])
                return exported[0]
            log.info("no draft at %s%s; drafting by lookup only", found,
                     ", and none exported for this model" if in_hf_cache(model) else "")
            return None
        path = Path(draft)
        _check_gguf(path, "draft")
        return path

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
        for obj in reversed(self._owned):  # contexts before their models
            obj.close()
        self._owned.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_gguf(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}); "
                         "convert it first with `bridge export`")


def check_draft_matches(target: LlamaModel, draft: LlamaModel) -> None:
    """Refuse a draft made for another model: its vocabulary must be the target's, token
    for token, and a bridge draft must name the target's layer count."""
    where = f"draft {draft.path.name} does not belong to {target.path.name}"
    fix = "; re-export it with `bridge export`, or pass --no-draft"
    if draft.n_vocab != target.n_vocab:
        raise ValueError(f"{where}: vocabularies differ ({draft.n_vocab} vs "
                         f"{target.n_vocab} tokens){fix}")
    # Token bytes at ~2,000 spread ids plus the tail, where special tokens live: a few
    # milliseconds even for a 256k vocabulary, and any other tokenizer fails it.
    n = target.n_vocab
    for tok in sorted(set(range(0, n, max(1, n // 2048))) | set(range(max(0, n - 512), n))):
        if draft.token_bytes(tok, special=True) != target.token_bytes(tok, special=True):
            raise ValueError(f"{where}: token {tok} differs{fix}")
    n_layers = draft.meta(keys.TARGET_BLOCK_COUNT)
    if n_layers is not None and int(n_layers) != target.n_layer:
        raise ValueError(f"{where}: it was cut from a {n_layers}-layer model, the target has "
                         f"{target.n_layer} layers{fix}")
    want = draft.meta(keys.TARGET_SHA256)
    if want is not None and want != sha256_file_cached(target.path):
        raise ValueError(f"{where}: it was cut from a file with sha256 {want[:12]}..., "
                         f"not this one{fix}")
