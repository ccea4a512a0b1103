"""The model in PyTorch for layer scoring, and a loop over its layers that can skip some.

Loading: a Hugging Face folder through ``AutoModelForCausalLM``; a GGUF through
transformers' ``gguf_file=`` dequantization. Device and dtype are chosen automatically:
CUDA or MPS with bf16 (fp16 on MPS), else CPU with fp32. Before loading, the weights'
size (parameter count x dtype bytes) is checked against free memory, so a model that
cannot fit fails in a second with a suggestion instead of swapping for an hour.

Skipping layers never copies weights: ``LayerRunner`` records, in one full forward pass,
the keyword arguments each decoder layer receives (attention mask, rotary embeddings:
these differ per layer on Gemma 3, whose sliding and global layers alternate), then calls
``model.model.layers[i]`` itself for any subset of ``i``, starting from any cached hidden
state. That one mechanism serves every architecture whose forward is "embed, layers,
norm, head", without re-implementing the model's masks or rotary tables.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass

import gguf
import torch

from exporters.loading import ModelSource, field_value, open_gguf

log = logging.getLogger(__name__)

_DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
_ST_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1}
# Scoring holds the weights plus a few [tokens x hidden] activations and a
# [tokens x vocab] logits block; 15% + 1 GiB covers that for calibration-sized inputs.
_OVERHEAD = 1.15
_HEADROOM = 1 << 30


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA (bf16), MPS (fp16) or CPU (fp32)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps"), torch.float16
    return torch.device("cpu"), torch.float32


def count_params(source: ModelSource) -> int:
    """Parameter count from tensor shapes in the file headers (nothing is loaded)."""
    if source.kind == "gguf":
        return sum(int(t.n_elements) for t in open_gguf(source.path).tensors)
    total = 0
    for f in sorted(source.path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                size = 1
                for d in meta["shape"]:
                    size *= d
                total += size
    return total


def check_fits(n_params: int, dtype: torch.dtype, device: torch.device) -> None:
    """Raise ValueError when ``n_params`` weights in ``dtype`` cannot fit on ``device``."""
    need = int(n_params * _DTYPE_BYTES[dtype] * _OVERHEAD) + _HEADROOM
    if device.type == "cuda":
        free = torch.cuda.mem_get_info()[0]
        where = "GPU memory"
    else:
        import psutil

        free = psutil.virtual_memory().available
        where = "RAM"
    if need > free:
        raise ValueError(
            f"scoring needs about {need / 2**30:.1f} GiB ({n_params / 1e9:.2f} B parameters "
            f"as {str(dtype).removeprefix('torch.')}) but only {free / 2**30:.1f} GiB of {where} "
            "is free; use --drop-layers to skip scoring, or score on a machine with a GPU "
            "(bf16 halves the size)")


def load_for_scoring(source: ModelSource):
    """(model, tokenizer, device) ready for inference, with no gradient by default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = pick_device()
    check_fits(count_params(source), dtype, device)
    if source.kind == "gguf":
        kw = {"gguf_file": source.path.name}
        folder = source.path.parent
    else:
        kw, folder = {}, source.path
    log.info("loading %s for scoring on %s (%s)", source.path.name, device,
             str(dtype).removeprefix("torch."))
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kw)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                     low_cpu_mem_usage=True, **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"transformers cannot load {source.path.name} for scoring: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if source.kind == "gguf" and not getattr(tok, "chat_template", None):
        # transformers' GGUF tokenizer drops the chat template; the file has it
        tok.chat_template = field_value(open_gguf(source.path),
                                        gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tok, device


@dataclass
class Trace:
    """One prompt's full-model pass: what each layer received, for replaying subsets.

    ``h_in[i]`` is layer i's input hidden state ``[1, T, H]`` (all layers when recorded,
    else only ``h_in[0]``, the embeddings, which every replay starts from); ``h_out`` is
    the last layer's output; ``kwargs[i]`` the mask and rotary tables layer i got.
    """

    kwargs: list[dict]
    h_in: list[torch.Tensor]
    h_out: torch.Tensor


class LayerRunner:
    """Runs ``model``'s decoder layers one by one, any of them skipped, weights untouched."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        inner = model.model
        self.layers = inner.layers
        self.norm = inner.norm
        self.head = model.get_output_embeddings()
        self.n_layers = len(self.layers)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    @torch.no_grad()
    def trace(self, ids: torch.Tensor, keep_h: bool = True) -> Trace:
        """Full forward pass over ``ids`` [1, T], recording each layer's inputs."""
        kwargs: list[dict] = [{} for _ in range(self.n_layers)]
        h_in: list[torch.Tensor] = []
        out: list[torch.Tensor] = []

        def pre(i):
            def hook(_mod, args, kw):
                kwargs[i] = {k: v for k, v in kw.items() if k != "past_key_values"}
                if keep_h or i == 0:
                    h_in.append(args[0] if args else kw["hidden_states"])
            return hook

        def post(_mod, _args, output):
            out.append(output[0] if isinstance(output, tuple) else output)

        hooks = [layer.register_forward_pre_hook(pre(i), with_kwargs=True)
                 for i, layer in enumerate(self.layers)]
        hooks.append(self.layers[-1].register_forward_hook(post))
        try:
            self.model.model(input_ids=ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        for kw in kwargs:  # the hidden state is passed positionally when replaying
            kw.pop("hidden_states", None)
        return Trace(kwargs, h_in, out[-1])

    def layer(self, i: int, h: torch.Tensor, trace: Trace) -> torch.Tensor:
        out = self.layers[i](h, **trace.kwargs[i])
        return out[0] if isinstance(out, tuple) else out

    def run(self, trace: Trace, h: torch.Tensor, start: int, skip: frozenset[int] | set[int],
            stop: int | None = None) -> torch.Tensor:
        """Hidden state after layers ``start..stop-1`` minus ``skip``, from input ``h``."""
        for i in range(start, self.n_layers if stop is None else stop):
            if i not in skip:
                h = self.layer(i, h, trace)
        return h

    def logits(self, h: torch.Tensor, positions: slice) -> torch.Tensor:
        """Logits [n, vocab] (fp32) at ``positions`` of the final hidden state ``h``."""
        z = self.head(self.norm(h[0, positions])).float()
        if self.softcap:  # Gemma's tanh soft cap, as in its forward
            z = torch.tanh(z / self.softcap) * self.softcap
        return z
