"""Layer-streamed scoring from a GGUF: one decoder layer in memory at a time.

Loading a whole GGUF into PyTorch costs its float weights (an 8B model: 15 GiB in bf16,
30 GiB in fp32). The methods that need only each layer's input and output (``bi``,
``angular``; ``STREAMED_METHODS``) do not need the whole model at once: the hidden states
of the calibration tokens are kept, and each layer is dequantized from the GGUF (gguf-py),
run on them, scored and freed before the next. Memory is then about one layer in float,
the activations and one slice of the output head, whatever the model's size.

The layers are transformers' own modules, built on the meta device and given real weights
one at a time with the same name map and tensor fix-ups (llama's q/k permutation, Gemma's
norm offset) that transformers' GGUF loader applies, so a streamed layer computes exactly
what the in-memory model's layer computes. Masks and rotary tables come from one pass of
transformers' model with every layer replaced by a recorder (``_Recorder``), as
``torch_model.LayerRunner`` records them in its full pass.

Weights are dequantized by ggml's own converters (``exporters.dequant``: an 8B layer in
0.19 s against gguf-py's 1.06 s). Embeddings are read row by row (only the calibration
tokens' rows are dequantized); the output head, which is as large as a layer for a large
vocabulary, is dequantized in slices of ``HEAD_ROWS`` vocabulary rows. Pages of the file
that were read are handed back to the kernel (``madvise``), so the mapped file does not
grow the resident set either.
"""

from __future__ import annotations

import copy
import logging
import mmap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from exporters.dequant import dequantize
from exporters.loading import field_value, gguf_arch, one_parse, open_gguf
from exporters.scoring import LayerScores, angular_distance, best_block, block_influence

log = logging.getLogger(__name__)

# llama.cpp architectures whose GGUF transformers can map to its own layers (Mistral is
# written as llama).
STREAM_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
# Vocabulary rows of the output head dequantized at once: 8192 x 4096 fp32 = 128 MiB.
HEAD_ROWS = 8192

Progress = Callable[[int], None]


@dataclass
class Text:
    """One calibration text: token ids, the first scored position, and what each layer
    receives besides the hidden state (mask, rotary tables), recorded once."""

    ids: list[int]
    start: int
    kwargs: list[dict]

    @property
    def positions(self) -> slice:
        # positions start..T-2 predict the continuation tokens
        return slice(self.start, len(self.ids) - 1)


class _Recorder(torch.nn.Module):
    """Stands in for decoder layer i: records its keyword arguments, changes nothing."""

    def __init__(self, sink: list[dict], i: int):
        super().__init__()
        self.sink, self.i = sink, i

    def forward(self, hidden_states, *args, **kw):
        self.sink[self.i] = {k: v for k, v in kw.items()
                             if k not in ("past_key_values", "hidden_states")}
        return hidden_states


class GGUFLayers:
    """A GGUF read as transformers modules, one layer at a time.

    Args:
        path: the GGUF file.
        dtype: the float type layers are computed in.
        reader: the file's reader, when the caller has one (parsing a GGUF's metadata
            takes seconds for a large vocabulary).

    Raises:
        ValueError: the architecture is not one of ``STREAM_ARCHS``, or the file is bad.
    """

    def __init__(self, path: Path, dtype: torch.dtype = torch.float32,
                 reader: gguf.GGUFReader | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
        )

        self.path, self.dtype = path, dtype
        self.reader = reader if reader is not None else open_gguf(path)
        self.arch = gguf_arch(self.reader)
        check_streamable(self.arch, path)
        try:
            with one_parse(path, self.reader):
                self.config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
                raw = load_gguf_checkpoint(str(path))["config"]  # metadata only
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"transformers cannot read {path.name}'s metadata: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                             ) from None
        self.processor = TENSOR_PROCESSORS.get(self.arch, TensorProcessor)(config=raw)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        gguf_to_hf = get_gguf_hf_weights_map(self.skeleton, self.processor)
        self._by_hf = {hf: name for name, hf in gguf_to_hf.items()}
        self._tensors = {t.name: t for t in self.reader.tensors}
        inner = self.skeleton.model
        self.n_layers = len(inner.layers)
        self._meta_layers = list(inner.layers)
        # the recording model: real rotary tables, recorders for layers, no final norm
        self._kwargs: list[dict] = [{} for _ in range(self.n_layers)]
        inner.layers = torch.nn.ModuleList(_Recorder(self._kwargs, i)
                                           for i in range(self.n_layers))
        inner.rotary_emb = type(inner.rotary_emb)(config=self.config)
        self._norm = self._module(inner.norm, "model.norm.")
        inner.norm = torch.nn.Identity()
        self._embed_scale = getattr(inner.embed_tokens, "scalar_embed_scale", None)
        head = self._by_hf.get("lm_head.weight")
        # a tied head is the embedding matrix itself
        self._head = head if head in self._tensors else self._by_hf["model.embed_tokens.weight"]
        self.softcap = getattr(self.config, "final_logit_softcapping", None)

    def layer_bytes(self, i: int) -> int:
        """Bytes of layer i's tensors in the file."""
        prefix = f"blk.{i}."
        return sum(int(t.n_bytes) for t in self.reader.tensors if t.name.startswith(prefix))

    def layer_params(self, i: int) -> int:
        prefix = f"blk.{i}."
        return sum(int(t.n_elements) for t in self.reader.tensors if t.name.startswith(prefix))

    # --- weights ------------------------------------------------------------------------

    def _weights(self, hf_name: str, rows: np.ndarray | None = None) -> torch.Tensor:
        t = self._tensors[self._by_hf[hf_name]]
        data = t.data if rows is None else t.data[rows]
        w = dequantize(data, t.tensor_type, torch.get_num_threads())
        if rows is None:  # row subsets are embeddings, which no fix-up touches
            w = self.processor.process(weights=w, name=t.name).weights
        if not (w.flags.writeable and w.flags.c_contiguous):  # a fix-up's view
            w = np.array(w)
        out = torch.from_numpy(w).to(self.dtype)
        self._release(t)
        return out

    def _release(self, t) -> None:
        """Let the kernel drop the file pages just read (they are clean, so free)."""
        mm = getattr(self.reader.data, "_mmap", None)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = t.data_offset - t.data_offset % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, t.data_offset + int(t.n_bytes) - start)
        except (OSError, ValueError):  # advice only
            pass

    def _module(self, meta: torch.nn.Module, prefix: str) -> torch.nn.Module:
        """A real copy of ``meta`` with its weights from the file."""
        assert not list(meta.buffers()), "streamed modules are expected to hold no buffers"
        state = {name: self._weights(prefix + name) for name, _ in meta.named_parameters()}
        module = copy.deepcopy(meta)
        module.load_state_dict(state, strict=True, assign=True)
        return module.eval().requires_grad_(False)

    def layer(self, i: int) -> torch.nn.Module:
        """Decoder layer i with real weights (the caller drops it when done)."""
        return self._module(self._meta_layers[i], f"model.layers.{i}.")

    # --- embeddings, masks and head -----------------------------------------------------

    def embed(self, ids: Sequence[int]) -> torch.Tensor:
        """Input hidden states [1, T, H]: only the rows of ``ids`` are dequantized."""
        e = self._weights("model.embed_tokens.weight", np.asarray(ids, dtype=np.int64))
        if self._embed_scale is not None:  # Gemma: sqrt(H), rounded to dtype as it does
            e = e * torch.tensor(self._embed_scale).to(self.dtype)
        return e.unsqueeze(0)

    @torch.no_grad()
    def text(self, ids: Sequence[int], start: int) -> Text:
        """A ``Text`` with the per-layer arguments transformers' forward would pass."""
        e = self.embed(ids)
        self.skeleton.model(inputs_embeds=e, use_cache=False)
        return Text(list(ids), start, [dict(kw) for kw in self._kwargs])

    def _head_slices(self, h: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(first vocab id, logits [n, rows] fp32) of final hidden states ``h`` [n, H],
        the head dequantized ``HEAD_ROWS`` vocabulary rows at a time."""
        x = self._norm(h)
        t = self._tensors[self._head]
        n_vocab = t.data.shape[0]
        for a in range(0, n_vocab, HEAD_ROWS):
            w = dequantize(t.data[a:a + HEAD_ROWS], t.tensor_type, torch.get_num_threads())
            z = (x @ torch.from_numpy(w).to(self.dtype).T).float()
            if self.softcap:  # Gemma's tanh soft cap, as in its forward
                z = torch.tanh(z / self.softcap) * self.softcap
            yield a, z
        self._release(t)

    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] (fp32) of final hidden states ``h`` [n, H]."""
        return torch.cat([z for _, z in self._head_slices(h)], dim=-1)

    @torch.no_grad()
    def top1(self, h: torch.Tensor) -> torch.Tensor:
        """argmax of the logits [n] without ever holding [n, vocab]: a running maximum
        over the head's slices (the first maximum wins, as in ``argmax``)."""
        best = torch.full((h.shape[0],), -torch.inf)
        arg = torch.zeros(h.shape[0], dtype=torch.long)
        for a, z in self._head_slices(h):
            v, ix = z.max(-1)
            better = v > best
            best = torch.where(better, v, best)
            arg = torch.where(better, ix + a, arg)
        return arg

    def chat_template(self) -> str | None:
        return field_value(self.reader, gguf.Keys.Tokenizer.CHAT_TEMPLATE)


def check_streamable(arch: str, path: Path) -> None:
    if arch not in STREAM_ARCHS:
        raise ValueError(f"{path.name} is a {arch!r} model, which layer-streamed scoring "
                         f"does not support ({', '.join(STREAM_ARCHS)}); pass "
                         "--drop-layers LIST or --method even to export it without scoring")


def _call(layer: torch.nn.Module, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(h, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def stream(src: GGUFLayers, texts: Sequence[Text], skips: Sequence[frozenset[int]],
           progress: Progress = lambda n: None
           ) -> Iterator[tuple[int, list[list[torch.Tensor]], list[list[torch.Tensor]]]]:
    """Run every layer over ``texts``, one layer in memory at a time.

    ``skips[k]`` is the set of layers track k leaves out (``frozenset()``: the full
    model); all tracks start from the embeddings. Yields ``(i, before, after)`` with
    ``before[k][j]`` / ``after[k][j]`` track k's state of text j at layer i's input and
    output [1, T, H]; a track that skips layer i has ``after is before``.

    Tracks that have run the same layers so far hold the same state objects and share
    one computation of the next layer: a draft costs nothing up to its first dropped
    layer (held-out acceptance: the full model and drafts that drop deep layers).
    """
    states = [[src.embed(t.ids) for t in texts]] * len(skips)
    for i in range(src.n_layers):
        layer = src.layer(i) if any(i not in s for s in skips) else None
        outputs: dict[int, list[torch.Tensor]] = {}  # id(input states) -> output states
        after = []
        for hs, skip in zip(states, skips, strict=True):
            if i in skip:
                after.append(hs)
                continue
            if id(hs) not in outputs:
                outputs[id(hs)] = [_call(layer, h, t.kwargs[i])
                                   for h, t in zip(hs, texts, strict=True)]
            after.append(outputs[id(hs)])
        del layer, outputs  # free the layer before the next one is read
        yield i, states, after
        states = after
        progress(1)


def score_streamed(src: GGUFLayers, method: str, texts: Sequence[Text], max_drop: int,
                   protected: frozenset[int], progress: Progress = lambda n: None
                   ) -> LayerScores:
    """``bi`` or ``angular`` over ``texts`` in one streamed pass; the same sums, in the
    same order, as ``exporters.scoring``'s in-memory scorers."""
    L, P = src.n_layers, len(texts)
    droppable = [i for i in range(L) if i not in protected]
    if method == "bi":
        bi = [0.0] * L
        for i, before, after in stream(src, texts, [frozenset()], progress):
            for h, o in zip(before[0], after[0], strict=True):
                # BI_i = 1 - mean_t cos(h_i, h_{i+1}), BOS position left out
                bi[i] += block_influence(h[0, 1:], o[0, 1:]) / P
        order = sorted(droppable, key=lambda i: bi[i])
        return LayerScores("bi", bi, {n: tuple(sorted(order[:n]))
                                      for n in range(1, max_drop + 1)})
    if method != "angular":
        raise ValueError(f"method {method!r} does not stream; streamed methods: bi, angular")
    # d(l, n) needs the states at l and l + n: keep the last max_drop + 1 boundaries
    d = {n: dict.fromkeys(range(L - n + 1), 0.0) for n in range(1, max_drop + 1)}
    window: list[list[torch.Tensor]] = []
    for i, before, after in stream(src, texts, [frozenset()], progress):
        if i == 0:
            window.append([h[0, 1:] for h in before[0]])
        window.append([o[0, 1:] for o in after[0]])
        window = window[-(max_drop + 1):]
        for n in range(1, min(max_drop, i + 1) + 1):
            start = i + 1 - n
            for a, b in zip(window[-1 - n], window[-1], strict=True):
                d[n][start] += angular_distance(a, b) / P
    drops = {n: best_block(d[n], n, protected) for n in d}
    return LayerScores("angular", [d[1][i] for i in range(L)], drops)


@torch.no_grad()
def streamed_agreement(src: GGUFLayers, texts: Sequence[Text],
                       drops: dict[int, tuple[int, ...]],
                       progress: Progress = lambda n: None) -> dict[int, float]:
    """Teacher-forced top-1 agreement of each draft ``drops[n]`` with the full model,
    every draft and the full model run in the same streamed pass."""
    counts = list(drops)
    skips = [frozenset()] + [frozenset(drops[n]) for n in counts]
    final = None
    for _, _, after in stream(src, texts, skips, progress):
        final = after
    assert final is not None
    # all scored positions of all texts and tracks through the head at once: the head
    # is dequantized once, and only argmaxes are kept
    rows = [torch.cat([final[k][j][0, t.positions] for j, t in enumerate(texts)])
            for k in range(len(skips))]
    top = src.top1(torch.cat(rows)).split([len(r) for r in rows])
    total = len(top[0])
    hits = {n: int((top[k] == top[0]).sum()) for k, n in enumerate(counts, start=1)}
    return {n: hits[n] / max(total, 1) for n in counts}
