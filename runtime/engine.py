"""The public runtime object: a target GGUF, its draft, and text in and out.

``Engine`` owns both llama.cpp models and contexts (``close()`` frees them), finds the draft
beside the model (``MODEL.draft.gguf``), refuses a draft made for another model, and turns
the token-level decode loop into streamed text with stop strings and chat templates.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime import keys
from runtime.config import GenerationConfig, RuntimeConfig, SamplingConfig, SpeculativeConfig
from runtime.context import LlamaContext, LlamaModel
from runtime.controller import GammaController
from runtime.drafting import PrunedDrafter
from runtime.files import sha256_file_cached
from runtime.sampling import Sampler
from runtime.speculative import SpeculativeDecoder, Stats

log = logging.getLogger(__name__)

def draft_path_for(model: Path) -> Path:
    """``name.gguf`` -> ``name.draft.gguf``, where ``bridge export`` writes the draft."""
    stem = model.name[: -len(keys.FULL_SUFFIX)] if model.name.endswith(keys.FULL_SUFFIX) \
        else model.name
    return model.with_name(stem + keys.DRAFT_SUFFIX)


@dataclass
class Chunk:
    """A piece of streamed output: ``text`` (possibly empty while a multi-byte character
    or a possible stop string is held back) and the token ids it came from."""

    text: str
    tokens: list[int]


class Engine:
    """A target model plus an optional draft, ready to generate.

    Args:
        model: path of the full GGUF.
        draft: path of the draft GGUF; ``"auto"`` looks for ``MODEL.draft.gguf`` beside the
            model (and runs plainly if there is none); ``None`` disables drafting.
        runtime: llama.cpp resources; speculative / sampling: see their dataclasses.
    """

    def __init__(self, model: str | Path, draft: str | Path | None = "auto",
                 runtime: RuntimeConfig | None = None,
                 speculative: SpeculativeConfig | None = None,
                 sampling: SamplingConfig | None = None):
        self.runtime = runtime or RuntimeConfig()
        self.spec_cfg = speculative or SpeculativeConfig()
        self.sampling = sampling or SamplingConfig()
        model = Path(model)
        _check_gguf(model, "model")
        self.draft_path = self._resolve_draft(model, draft)
        self._owned: list = []
        try:
            self.model = self._own(LlamaModel(model, self.runtime.n_gpu_layers))
            self.ctx = self._own(self._context(self.model))
            drafter = None
            if self.draft_path is not None:
                self.draft_model = self._own(LlamaModel(self.draft_path,
                                                        self.runtime.n_gpu_layers))
                check_draft_matches(self.model, self.draft_model)
                self.draft_ctx = self._own(self._context(self.draft_model))
            self.sampler = Sampler(self.sampling)
            if self.draft_path is not None:
                drafter = PrunedDrafter(self.draft_ctx, self.sampler)
            self.controller = GammaController(self.spec_cfg.draft_max, self.spec_cfg.adaptive)
            self.decoder = SpeculativeDecoder(self.ctx, drafter, self.sampler,
                                              self.controller, self.spec_cfg.p_min)
        except BaseException:
            self.close()
            raise
        self.last_stats: Stats | None = None

    def _own(self, obj):
        self._owned.append(obj)
        return obj

    def _context(self, model: LlamaModel) -> LlamaContext:
        return LlamaContext(model, self.runtime.n_ctx, self.runtime.n_batch,
                            self.runtime.n_threads)

    @staticmethod
    def _resolve_draft(model: Path, draft: str | Path | None) -> Path | None:
        if draft is None:
            return None
        if draft == "auto":
            found = draft_path_for(model)
            if found.is_file():
                log.info("using the draft beside the model: %s", found)
                return found
            log.info("no draft at %s; decoding plainly", found)
            return None
        path = Path(draft)
        _check_gguf(path, "draft")
        return path

    # -- generation -------------------------------------------------------------------

    def generate(self, prompt: str | list[int], gen: GenerationConfig | None = None,
                 stats: Stats | None = None) -> Iterator[Chunk]:
        """Stream the continuation of ``prompt`` (text, tokenized with special tokens parsed,
        or token ids). The figures land in ``stats`` (and ``self.last_stats``)."""
        gen = gen or GenerationConfig()
        if isinstance(prompt, str):
            ids = self.model.tokenize(prompt, add_special=True, parse_special=True)
        else:
            ids = list(prompt)
        stats = stats if stats is not None else Stats()
        self.last_stats = stats
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        held = ""  # text held back because it may be the start of a stop string
        steps = self.decoder.generate(ids, gen.max_tokens, self.model.is_eog, stats)
        try:
            for step in steps:
                toks = [t for t in step.tokens if not self.model.is_eog(t)]
                held += decoder.decode(b"".join(self.model.token_bytes(t) for t in toks))
                out, held, stopped = _split_stop(held, gen.stop)
                yield Chunk(out, step.tokens)
                if stopped:
                    return
            held += decoder.decode(b"", final=True)
            if held:
                yield Chunk(held, [])
        finally:
            steps.close()  # runs the decoder's finally: caches match the emitted tokens

    def complete(self, prompt: str | list[int], gen: GenerationConfig | None = None
                 ) -> tuple[str, list[int], Stats]:
        """Generate to the end; return (text, generated token ids, stats)."""
        stats = Stats()
        text, tokens = [], []
        for chunk in self.generate(prompt, gen, stats):
            text.append(chunk.text)
            tokens.extend(chunk.tokens)
        return "".join(text), tokens, stats

    def close(self) -> None:
        for obj in reversed(self._owned):  # contexts before their models
            obj.close()
        self._owned.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str, bool]:
    """(text safe to emit, text to hold back, whether a stop string was found)."""
    if not stops:
        return text, "", False
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    # hold back the longest tail that is a prefix of some stop string
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold], text[len(text) - hold:], False


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
