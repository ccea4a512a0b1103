"""The public runtime object: a target GGUF, its draft, and text in and out.

``Engine`` owns both llama.cpp models and contexts (``close()`` frees them), finds the draft
beside the model (``MODEL.draft.gguf``), refuses a draft made for another model, and turns
the token-level decode loop into streamed text with stop strings and chat templates.
"""

from __future__ import annotations

import bisect
import codecs
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime import keys
from runtime.config import GenerationConfig, RuntimeConfig, SamplingConfig, SpeculativeConfig
from runtime.constraint import Constraint, ConstraintCompiler, ConstraintSpec
from runtime.context import LlamaContext, LlamaModel, Numerics, llama_cpp_version
from runtime.controller import CostModel, GammaController
from runtime.drafters.lookup import LookupDrafter
from runtime.drafters.memory import DraftMemory, MemoryDrafter
from runtime.drafters.pruned import PrunedDrafter
from runtime.files import draft_path_for, sha256_file_cached
from runtime.numerics import exact_width
from runtime.profiles import load_profile, save_profile
from runtime.rpc import RpcDevices, Watchdog, watch_aborts
from runtime.sampling import Sampler
from runtime.speculative import SpeculativeDecoder, Stats

log = logging.getLogger(__name__)

# exact mode's probe text (any tokens would do; see runtime.numerics.exact_width)
_PROBE_TEXT = "The quick brown fox jumps over the lazy dog, and 17 times 23 is 391."

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


class Engine:
    """A target model plus its draft sources, ready to generate.

    Args:
        model: path of the full GGUF.
        draft: path of the draft GGUF; ``"auto"`` looks for ``MODEL.draft.gguf`` beside the
            model (and runs without it if there is none); ``None`` disables it.
        runtime: llama.cpp resources; speculative / sampling: see their dataclasses.
            ``speculative.drafter`` picks the sources: ``auto`` (lookup, plus the pruned
            draft when one was found), ``lookup``, ``pruned`` or ``none``.
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
        use_pruned = self.spec_cfg.drafter in ("auto", "pruned")
        self.draft_path = self._resolve_draft(model, draft) if use_pruned else None
        if self.spec_cfg.drafter == "pruned" and self.draft_path is None:
            raise ValueError(f"--drafter pruned needs a draft GGUF, and none was found at "
                             f"{draft_path_for(model)}; make one with `bridge export "
                             f"{model} --prune 0.25`, pass --draft PATH, or use "
                             f"--drafter lookup")
        self._owned: list = []
        self.last_stats: Stats | None = None
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
            self.ctx = self._own(self._context(self.model, self.numerics))
            self.sampler = Sampler(self.sampling)
            drafters: list = []
            if self.spec_cfg.drafter in ("auto", "lookup"):
                drafters.append(LookupDrafter())
                if memory is not None:
                    drafters.append(MemoryDrafter(memory))
            self.memory = memory if self.spec_cfg.drafter in ("auto", "lookup") else None
            if self.draft_path is not None:
                draft_devices = RpcDevices(rt.draft_rpc) if rt.draft_rpc else None
                self.draft_model = self._own(LlamaModel(self.draft_path,
                                                        self.runtime.n_gpu_layers,
                                                        devices=draft_devices))
                check_draft_matches(self.model, self.draft_model)
                self.draft_ctx = self._own(self._context(self.draft_model))
                drafters.append(PrunedDrafter(self.draft_ctx, self.sampler))
            self.max_rows = self._exact_rows() if self.runtime.exact else None
            if self.max_rows == 1:
                drafters = []
            self._profile_key = self._profile_key_for(drafters) if drafters else None
            stored = None if self.spec_cfg.recalibrate or not drafters \
                else load_profile(self._profile_key)
            self.controller = GammaController(
                self.draft_cap(self.spec_cfg.draft_max), self.spec_cfg.adaptive,
                has_pruned=self.draft_path is not None,
                costs=CostModel.from_profile(stored) if stored else None)
            self.decoder = SpeculativeDecoder(self.ctx, drafters, self.sampler,
                                              self.controller, self.spec_cfg.p_min,
                                              max_rows=self.max_rows,
                                              forced_drafts=self.spec_cfg.forced_drafts)
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

    def _own(self, obj):
        self._owned.append(obj)
        return obj

    def _context(self, model: LlamaModel, numerics: Numerics | None = None) -> LlamaContext:
        return LlamaContext(model, self.runtime.n_ctx, self.runtime.n_batch,
                            self.runtime.n_threads, numerics, self.runtime.backend_argmax)

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

    def _profile_key_for(self, drafters: list) -> str:
        """Which stored device profile applies: same files, threads, offload and build."""
        draft = sha256_file_cached(self.draft_path) if self.draft_path else "none"
        rt = self.runtime
        return (f"{sha256_file_cached(self.model.path)}:{draft}:"
                f"{'+'.join(sorted(d.source for d in drafters))}:t{rt.n_threads or 'all'}:"
                f"ngl{rt.n_gpu_layers}:b{rt.n_batch}:{'exact:' if rt.exact else ''}"
                f"{'rpc' + ','.join(map(str, rt.rpc)) + ':' if rt.rpc else ''}"
                f"{'draft-rpc' + ','.join(map(str, rt.draft_rpc)) + ':' if rt.draft_rpc else ''}"
                f"llama-cpp-python{llama_cpp_version()}")

    @staticmethod
    def _resolve_draft(model: Path, draft: str | Path | None) -> Path | None:
        if draft is None:
            return None
        if draft == "auto":
            found = draft_path_for(model)
            if found.is_file():
                log.info("using the draft beside the model: %s", found)
                return found
            log.info("no draft at %s; drafting by lookup only", found)
            return None
        path = Path(draft)
        _check_gguf(path, "draft")
        return path

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
        """The constraint for ``spec`` on this model's vocabulary (the last few compiled
        are kept: a server sees the same schema again and again).

        Raises:
            ValueError: an invalid schema or grammar, naming the problem.
        """
        c = self._compiled.pop(spec, None) or self._compiler.compile(spec)
        self._compiled[spec] = c  # most recently used last
        while len(self._compiled) > 16:
            del self._compiled[next(iter(self._compiled))]
        return c

    def generate(self, prompt: str | list[int], gen: GenerationConfig | None = None,
                 stats: Stats | None = None, sampling: SamplingConfig | None = None,
                 draft_max: int | None = None, scope: str = "", use_memory: bool = True,
                 constraint: ConstraintSpec | None = None, logprobs: int | None = None
                 ) -> Iterator[Chunk]:
        """Stream the continuation of ``prompt`` (text, tokenized with special tokens parsed,
        or token ids). The last chunk carries ``finish_reason`` (``eog``, ``stop``,
        ``length`` or ``context``). The tokens returned and the KV cache end where the
        text ends, stop strings included. ``sampling`` and ``draft_max`` override the
        engine's settings for this call only. With a drafting memory, ``scope`` says whose
        earlier requests may be drafted from (and where this one is stored); ``use_memory``
        False keeps this request out of the memory both ways. ``constraint``: what the
        answer must match (it ends where the grammar is complete). ``logprobs``: each
        chunk carries its tokens' log-probs and this many top alternatives. Figures land
        in ``stats``.

        Raises:
            ValueError: an invalid constraint (before anything is evaluated).
        """
        gen = gen or GenerationConfig()
        compiled = self.compile(constraint) if constraint is not None else None
        ids = self.model.tokenize(prompt, add_special=True, parse_special=True) \
            if isinstance(prompt, str) else list(prompt)
        stats = stats if stats is not None else Stats()
        self.last_stats = stats
        saved = self.sampler.cfg, self.controller.draft_max
        if sampling is not None:
            self.sampler.reconfigure(sampling)
        if draft_max is not None:
            self.controller.draft_max = self.draft_cap(draft_max)
        memory = self.decoder.drafters.get("memory")
        if memory is not None:
            memory.scope = scope
            if not use_memory:
                del self.decoder.drafters["memory"]
        out: list[int] = []
        try:
            for chunk in self._stream(ids, gen, stats, compiled, logprobs):
                out.extend(chunk.tokens)
                yield chunk
        finally:
            self.sampler.reconfigure(saved[0])
            self.controller.draft_max = saved[1]
            if memory is not None:
                self.decoder.drafters["memory"] = memory
                if use_memory and out:
                    self.memory.add(ids + out, scope)
            if self._profile_key and self.spec_cfg.adaptive:
                save_profile(self._profile_key, self.controller.costs.to_profile())

    def _stream(self, ids: list[int], gen: GenerationConfig, stats: Stats,
                constraint: Constraint | None, n_logprobs: int | None) -> Iterator[Chunk]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        held = ""      # text held back because it may be the start of a stop string
        shown = 0      # characters yielded so far
        ends: list[int] = []  # text length after each generated token
        steps = self.decoder.generate(ids, gen.max_tokens, self.model.is_eog, stats,
                                      constraint, n_logprobs)
        try:
            for step in steps:
                for t in step.tokens:
                    if not self.model.is_eog(t):
                        held += decoder.decode(self.model.token_bytes(t))
                    ends.append(shown + len(held))
                out, held, cut = _split_stop(held, gen.stop)
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
        """Forget the conversation: every cache starts empty (costs stay measured)."""
        self.decoder.reset()

    def close(self) -> None:
        for obj in reversed(self._owned):  # contexts before their models
            obj.close()
        self._owned.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str, int | None]:
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
