"""Opening what an engine runs on: the target GGUF and its draft, checked against each
other, their llama.cpp contexts, exact mode's widest batch, and the RPC watchdog.

``find_draft`` decides which draft file a run uses, if any: the one beside the model
(``MODEL.draft.gguf``) or, for a model in the Hugging Face cache, the one exported for it
(by the model's sha256). ``Models`` opens the target and that draft, a model and a
context each, and owns them (``close()`` frees the contexts before their models). Nothing
here knows how drafts are made or chosen: that is ``runtime.drafters.sources`` and the
controller's.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from runtime import keys
from runtime.config import RuntimeConfig, SpeculativeConfig, auto_parallel, available_memory
from runtime.context import LlamaContext, LlamaModel, Numerics
from runtime.files import draft_path_for, drafts_for, sha256_file_cached
from runtime.hub_download import in_hf_cache
from runtime.native import gpu_offload_supported, on_passing_thread
from runtime.numerics import exact_width
from runtime.rpc import RpcDevices, Watchdog, watch_aborts

log = logging.getLogger(__name__)

# exact mode's probe text (any tokens would do; see runtime.numerics.exact_width)
_PROBE_TEXT = "The quick brown fox jumps over the lazy dog, and 17 times 23 is 391."


def find_draft(model: Path, draft: str | Path | None, spec: SpeculativeConfig,
               n_seq: int) -> Path | None:
    """The draft GGUF this run uses: ``draft`` itself, or for ``"auto"`` the one found for
    ``model`` (None when there is none, when ``spec.drafter`` uses no pruned draft, or
    with several sequences, for which it cannot draft).

    Raises:
        ValueError: a draft named with ``--parallel`` > 1, or ``--drafter pruned`` and no
            draft found.
    """
    # the pruned draft's context holds one sequence: it drafts for a single lane only
    use_pruned = spec.drafter in ("auto", "pruned")
    if n_seq > 1 and use_pruned and (spec.drafter == "pruned" or draft not in (None, "auto")):
        raise ValueError("a pruned draft (--draft, --drafter pruned) drafts for one "
                         f"sequence; use --parallel 1 with it, not --parallel {n_seq}")
    if n_seq > 1 and use_pruned and draft == "auto" and draft_path_for(model).is_file():
        log.info("%d sequences at once: the pruned draft beside the model is not used "
                 "(it drafts for one sequence; --parallel 1 uses it)", n_seq)
    found = _resolve_draft(model, draft) if use_pruned and n_seq == 1 else None
    if spec.drafter == "pruned" and found is None:
        raise ValueError(f"--drafter pruned needs a draft GGUF, and none was found at "
                         f"{draft_path_for(model)}; make one with `bridge export "
                         f"{model} --prune 0.25`, pass --draft PATH, or use "
                         f"--drafter lookup")
    return found


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
    check_gguf(path, "draft")
    return path


class Models:
    """The target model and context, and the draft's when there is one, opened and owned
    together.

    Args:
        model: the target GGUF (checked by ``check_gguf``).
        draft: the draft GGUF (``find_draft``), or None.
        rt: the llama.cpp settings: threads, batch, offload, RPC workers, exact mode, and
            ``parallel`` sequences in the target's context.
        draft_max: the widest draft asked for: exact mode probes batches up to one more.
    """

    def __init__(self, model: Path, draft: Path | None, rt: RuntimeConfig, draft_max: int):
        self.rt = rt
        self._owned: list = []
        self.draft_model: LlamaModel | None = None
        self.draft_ctx: LlamaContext | None = None
        try:
            # only the target needs exact numerics: a draft is a proposal, checked anyway
            self.numerics = Numerics.exact() if rt.exact else Numerics()
            if rt.rpc or rt.draft_rpc:
                # ggml-rpc aborts on a lost worker: say which one, in the caller's way
                watch_aborts(rt.rpc + rt.draft_rpc)
            self.model = self._own(LlamaModel(model, rt.n_gpu_layers,
                                              repack=self.numerics.repack,
                                              devices=RpcDevices(rt.rpc) if rt.rpc else None))
            if rt.parallel_auto and rt.parallel > 1 and not rt.kv_unified:
                self.rt = rt = self._more_sequences(rt)
            self.ctx = self._own(self._context(self.model, self.numerics, rt.parallel))
            if draft is not None:
                self.draft_model = self._own(LlamaModel(
                    draft, rt.n_gpu_layers,
                    devices=RpcDevices(rt.draft_rpc) if rt.draft_rpc else None))
                check_draft_matches(self.model, self.draft_model)
                self.draft_ctx = self._own(self._context(self.draft_model))
            # the widest batch whose logits equal one-token steps' bitwise (None: any)
            # (a probe on a passing thread: see on_passing_thread)
            self.max_rows = on_passing_thread(lambda: self._exact_rows(draft_max)) \
                if rt.exact else None
            if rt.rpc or rt.draft_rpc:
                remote = [self.ctx] if rt.rpc else []
                if rt.draft_rpc and self.draft_ctx is not None:
                    remote.append(self.draft_ctx)
                self._own(Watchdog([lambda c=c: c.busy_since for c in remote],
                                   rt.rpc + rt.draft_rpc, rt.rpc_timeout))
        except BaseException:
            self.close()
            raise

    def _more_sequences(self, rt: RuntimeConfig) -> RuntimeConfig:
        """``rt`` with as many sequences as ``auto_parallel`` allows for this model."""
        per_sequence = self.model.kv_bytes_per_token * rt.n_ctx
        on_gpu = rt.n_gpu_layers != 0 and gpu_offload_supported()
        n = auto_parallel(rt.parallel, per_sequence, available_memory(), on_gpu)
        if n != rt.parallel:
            log.info("serving %d sequences at once (%.0f MiB of KV cache each); "
                     "--parallel sets another count", n, per_sequence / 2**20)
        return replace(rt, parallel=n)

    def _own(self, obj):
        self._owned.append(obj)
        return obj

    def _context(self, model: LlamaModel, numerics: Numerics | None = None,
                 n_seq: int = 1) -> LlamaContext:
        rt = self.rt
        return LlamaContext(model, rt.n_ctx_total if n_seq > 1 else rt.n_ctx, rt.n_batch,
                            rt.n_threads, numerics, rt.backend_argmax, n_seq=n_seq,
                            unified=rt.kv_unified)

    def _exact_rows(self, draft_max: int) -> int:
        """Exact mode: the widest batch that matches one-token steps bitwise here."""
        rows = exact_width(self.ctx, self.model.tokenize(_PROBE_TEXT, True), draft_max + 1)
        if rows == 1:
            log.warning("exact mode: this llama.cpp build rounds even a 2-token batch "
                        "differently from a 1-token step on this machine, so drafting is "
                        "off (output is plain decoding's)")
        elif rows <= draft_max:
            log.info("exact mode: drafts capped at %d tokens, the widest batch whose logits "
                     "match one-token steps bitwise on this machine", rows - 1)
        return rows

    def close(self) -> None:
        for obj in reversed(self._owned):  # the watchdog, then contexts before their models
            obj.close()
        self._owned.clear()


def check_gguf(path: Path, what: str) -> None:
    """Refuse a missing file, or one that is not a GGUF, naming ``what`` it was meant to be."""
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
