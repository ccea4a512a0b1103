"""Calibration data: prompts, the full model's own continuations, and its cached answers.

A draft is useful when it predicts what the *target* says next, so the calibration text
is the full model's greedy continuation of each prompt (formatted with its chat template
when it has one), and the reference at every position is the full model's own top-1 and
top-k log-probabilities there, computed once per prompt and cached (``Sample``).

Prompts come from ``exporters.calib_prompts`` or ``--calib FILE`` (.txt: one prompt per
line; .jsonl: one ``{"prompt": ...}`` object per line). Every ``HOLDOUT_EVERY``-th prompt is
held out: layers are chosen on the rest and acceptance is reported on the held-out part.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from exporters.calib_prompts import CALIB_PROMPTS
from exporters.torch_model import LayerRunner
from runtime.prompts_file import read_prompts

log = logging.getLogger(__name__)

HOLDOUT_EVERY = 4
# Tokens the full model writes per calibration prompt (held-out prompts get the same).
DEFAULT_NEW_TOKENS = 64
# Reference log-probs kept per position for the KL term: top-k of the full model's
# distribution, so memory is [tokens x k] instead of [tokens x vocab].
TOP_K = 16


@dataclass
class Sample:
    """One calibration text and the full model's answers on it.

    ``ids`` [1, T]: prompt + continuation. Scored positions are ``start..T-2`` (they predict
    the continuation tokens); ``top1`` [n] is the full model's argmax there, ``top_lp`` and
    ``top_ix`` [n, k] its k largest log-probabilities and their token ids.
    """

    ids: torch.Tensor
    start: int
    top1: torch.Tensor
    top_lp: torch.Tensor
    top_ix: torch.Tensor

    @property
    def positions(self) -> slice:
        return slice(self.start, self.ids.shape[1] - 1)


def builtin_prompts() -> list[str]:
    return [text for _, text in CALIB_PROMPTS]


def load_prompts(path: Path | None = None) -> list[str]:
    """The prompts of ``--calib FILE`` (``runtime.prompts_file``), or the built-in set."""
    return builtin_prompts() if path is None else read_prompts(path)


def split_holdout(prompts: Sequence[str]) -> tuple[list[str], list[str]]:
    """(calibration, held-out): every ``HOLDOUT_EVERY``-th prompt is held out.

    With fewer than two prompts nothing can be held out; the one prompt serves both.
    """
    if len(prompts) < 2:
        return list(prompts), list(prompts)
    held = [p for i, p in enumerate(prompts) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    if not held:  # 2 or 3 prompts: hold out the last one
        held = [prompts[-1]]
    calib = [p for p in prompts if p not in held]
    return calib, held


def format_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as a user turn of the model's chat template (raw if none)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text)["input_ids"])


# Prompts generated together: batching makes generation several times faster on any
# device; 8 bounds the KV cache of a large model.
GEN_BATCH = 8


@torch.no_grad()
def build_samples(model, tokenizer, runner: LayerRunner, prompts: Sequence[str],
                  n_new: int = DEFAULT_NEW_TOKENS,
                  progress: Callable[[int], None] | None = None,
                  gguf_path: Path | None = None, threads: int | None = None) -> list[Sample]:
    """The full model's greedy continuation of each prompt and its answers on it.

    With ``gguf_path`` (the model's own GGUF) llama.cpp writes the continuations
    (``llamacpp_continuations``: several times faster than PyTorch on a CPU) and PyTorch
    only computes the reference answers.
    """
    device = next(model.parameters()).device
    if gguf_path is not None:
        encoded = [format_prompt(tokenizer, text) for text in prompts]
        with open_llamacpp(gguf_path) as llama:
            conts = llamacpp_continuations(llama, encoded, n_new, threads, progress)
        return [reference(runner, torch.tensor([e + c], device=device), len(e) - 1)
                for e, c in zip(encoded, conts, strict=True)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = []
    for b in range(0, len(prompts), GEN_BATCH):
        encoded = [format_prompt(tokenizer, text) for text in prompts[b:b + GEN_BATCH]]
        width = max(map(len, encoded))
        # left padding, so every row's continuation starts at column ``width``
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded],
                            device=device)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n_new,
                             do_sample=False, pad_token_id=pad)
        for e, row in zip(encoded, out, strict=True):
            new = _until_eos(row[width:].tolist(), model.generation_config.eos_token_id)
            seq = torch.tensor([e + new], device=device)
            samples.append(reference(runner, seq, len(e) - 1))
        if progress:
            progress(len(encoded))
    return samples


def _until_eos(tokens: list[int], eos: int | list[int] | None) -> list[int]:
    """Continuation up to and including the first end-of-generation token."""
    stops = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i + 1]
    return tokens


def reference(runner: LayerRunner, ids: torch.Tensor, start: int) -> Sample:
    """A ``Sample`` whose reference answers come from one full pass over ``ids``."""
    trace = runner.trace(ids, keep_h=False)
    logp = torch.log_softmax(runner.logits(trace.h_out, slice(start, ids.shape[1] - 1)), -1)
    top_lp, top_ix = logp.topk(TOP_K, dim=-1)
    return Sample(ids, start, top_ix[:, 0].clone(), top_lp, top_ix)


def generation_rows(prompts: Sequence[list[int]], n_new: int = DEFAULT_NEW_TOKENS) -> int:
    """Rows llama.cpp evaluates at most for ``llamacpp_continuations``: every prompt
    token, and every new token but the last (which is never fed back)."""
    return sum(map(len, prompts)) + len(prompts) * max(n_new - 1, 0)


def open_llamacpp(path: Path):
    """The GGUF in llama.cpp, for ``llamacpp_continuations`` and ``llamacpp_row_seconds``.

    repack=False: repacking would copy every weight into anonymous memory; reading the
    mapped file keeps memory to pages the kernel can drop.
    """
    from runtime.context import LlamaModel

    return LlamaModel(path, repack=False)


# prefill rows llamacpp_row_seconds runs before it starts the clock
_WARM_ROWS = 8


def llamacpp_row_seconds(model, prompt: Sequence[int], threads: int | None = None) -> float:
    """Seconds llama.cpp takes per row of ``prompt``'s prefill (an open ``open_llamacpp``
    model): the unit in which ``generation_rows`` are predicted.

    The first ``_WARM_ROWS`` rows run untimed: the first decode faults in the mapped
    weights and sizes llama.cpp's buffers, which the real run pays once, not per row.
    """
    import time

    from runtime.context import LlamaContext

    warm = min(_WARM_ROWS, len(prompt) - 1)
    with LlamaContext(model, n_ctx=len(prompt) + 1, n_threads=threads) as ctx:
        n = len(prompt)
        if warm:
            ctx.decode_rows(list(prompt[:warm]), list(range(warm)), [0] * warm,
                            [False] * warm)
        start = time.perf_counter()
        for a in range(warm, n, ctx.n_batch):
            b = min(a + ctx.n_batch, n)
            ctx.decode_rows(list(prompt[a:b]), list(range(a, b)), [0] * (b - a),
                            [r == n - 1 for r in range(a, b)])
        return (time.perf_counter() - start) / max(n - warm, 1)


def llamacpp_continuations(model, prompts: Sequence[list[int]],
                           n_new: int = DEFAULT_NEW_TOKENS, threads: int | None = None,
                           progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """The full model's greedy continuation of each tokenized prompt, written by
    llama.cpp on the GGUF itself (``model``: an ``open_llamacpp`` model): quantized
    kernels, the weights read from the mapped file, none of them copied into PyTorch.

    All prompts are generated together, as parallel sequences of one context: one
    ``llama_decode`` per step, with one row per unfinished sequence. On a CPU a one-row
    step of a large model is bound by reading its weights, and a step of many rows by
    arithmetic (7.38B Q4_0 on 2 cores: one row 1.9 s, 32 rows 23 s, 0.7 s a row, as in
    a prompt's prefill). Several rows take other kernels than one row (tinyBLAS against
    ggml's vec_dot: ``runtime.context.Numerics``), so a continuation can differ at a near-
    tie from the one a one-by-one decode writes; each is still the model's own greedy
    continuation under the batch it ran in, which is all calibration text needs.

    Each continuation runs up to and including the first end-of-generation token, as in
    ``build_samples``.

    Args:
        progress: called with the number of rows just evaluated (``generation_rows`` in
            all; a sequence that ends early counts the rows it did not need).
    """
    import numpy as np

    from runtime.context import LlamaContext

    progress = progress or (lambda n: None)
    n_seq = len(prompts)
    # one prefill row per prompt token
    rows = [(tok, pos, s) for s, ids in enumerate(prompts) for pos, tok in enumerate(ids)]
    with LlamaContext(model, n_ctx=sum(map(len, prompts)) + n_seq * n_new,
                      n_threads=threads, n_seq=n_seq) as ctx:
        out: list[list[int]] = [[] for _ in prompts]
        cuts = [*range(0, len(rows), ctx.n_batch), len(rows)]
        for a, b in itertools.pairwise(cuts):
            chunk = rows[a:b]
            # logits of each prompt's last token only: they give its first new token
            want = [pos == len(prompts[s]) - 1 for _, pos, s in chunk]
            logits = ctx.decode_rows([r[0] for r in chunk], [r[1] for r in chunk],
                                     [r[2] for r in chunk], want)
            ends = [s for (_, _, s), w in zip(chunk, want, strict=True) if w]
            for s, tok in zip(ends, np.argmax(logits, axis=-1).tolist(), strict=True):
                out[s].append(tok)
            progress(len(chunk))
        active = []
        for s in range(n_seq):
            if n_new > 1 and not model.is_eog(out[s][0]):
                active.append(s)
            else:
                progress(max(n_new - 1, 0))
        while active:
            pos = [len(prompts[s]) + len(out[s]) - 1 for s in active]
            logits = ctx.decode_rows([out[s][-1] for s in active], pos, active,
                                     [True] * len(active))
            still = []
            for s, tok in zip(active, np.argmax(logits, axis=-1).tolist(), strict=True):
                out[s].append(tok)
                if len(out[s]) < n_new and not model.is_eog(tok):
                    still.append(s)
                else:  # done: the rows it would have had are not needed
                    progress(n_new - len(out[s]))
            progress(len(active))
            active = still
    return out
