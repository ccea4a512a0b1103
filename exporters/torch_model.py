"""The model in PyTorch for layer scoring, and a loop over its layers that can skip some.

Loading: a Hugging Face folder through ``AutoModelForCausalLM``; a GGUF through
transformers' ``gguf_file=`` dequantization. Device and dtype are chosen automatically:
CUDA with bf16, MPS with fp16, else CPU with fp32, or bf16 when fp32 would not fit in
RAM. Before loading, the weights' size (parameter count x dtype bytes) is checked against
free memory, so a model that cannot fit fails in a second with a suggestion instead of
swapping for an hour.

Skipping layers never copies weights: ``LayerRunner`` records, in one full forward pass,
the keyword arguments each decoder layer receives (attention mask, rotary embeddings:
these differ per layer on Gemma 3, whose sliding and global layers alternate), then calls
``model.model.layers[i]`` itself for any subset of ``i``, starting from any cached hidden
state. That one mechanism serves every architecture whose forward is "embed, layers,
norm, head", without re-implementing the model's masks or rotary tables.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import gguf
import torch

from exporters.checkpoint import tensor_index
from exporters.loading import ModelSource, field_value, one_parse, open_gguf

log = logging.getLogger(__name__)

_DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
# Scoring holds the weights plus a few [tokens x hidden] activations and a
# [tokens x vocab] logits block; 15% + 1 GiB covers that for calibration-sized inputs.
_OVERHEAD = 1.15
_HEADROOM = 1 << 30


def pick_device(n_params: int, dtype_name: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA (bf16), MPS (fp16), or CPU: fp32 when it fits in RAM, else bf16.

    fp32 is exact and fast on every CPU, so it is preferred; an 8B model needs 32 GiB in
    fp32 but 16 GiB in bf16, so on a 24 GiB machine bf16 is what makes scoring possible.
    ``dtype_name`` other than "auto" (``SCORE_DTYPES``) fixes the dtype on that device.
    """
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        device, dtype = torch.device("mps"), torch.float16
    else:
        device, dtype = torch.device("cpu"), None
    if dtype_name != "auto":
        return device, getattr(torch, dtype_name)
    if dtype is not None:
        return device, dtype
    if _need(n_params, torch.float32) <= _free(device):
        return device, torch.float32
    log.info("float32 weights (%.1f GiB) would not fit in RAM; scoring in bfloat16",
             n_params * 4 / 2**30)
    return device, torch.bfloat16


def _need(n_params: int, dtype: torch.dtype) -> int:
    return int(n_params * _DTYPE_BYTES[dtype] * _OVERHEAD) + _HEADROOM


def _free(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def count_params(source: ModelSource) -> int:
    """Parameter count from tensor shapes in the file headers (nothing is loaded)."""
    if source.kind == "gguf":
        return sum(int(t.n_elements) for t in open_gguf(source.path).tensors)
    return sum(t.n_elements for t in tensor_index(source.path).values())


def fits_in_float32(source: ModelSource) -> bool:
    """The whole model's float32 weights fit in free RAM (the in-memory path's best case)."""
    return _need(count_params(source), torch.float32) <= _free(torch.device("cpu"))


def check_fits(n_params: int, dtype: torch.dtype, device: torch.device) -> None:
    """Raise ValueError when ``n_params`` weights in ``dtype`` cannot fit on ``device``."""
    need, free = _need(n_params, dtype), _free(device)
    where = "GPU memory" if device.type == "cuda" else "RAM"
    if need > free:
        raise ValueError(
            f"scoring needs about {need / 2**30:.1f} GiB ({n_params / 1e9:.2f} B parameters "
            f"as {str(dtype).removeprefix('torch.')}) but only {free / 2**30:.1f} GiB of {where} "
            "is free; for a GGUF, --method bi or angular scores one layer at a time in "
            "bounded memory; or use --drop-layers to skip scoring")


def load_for_scoring(source: ModelSource, dtype_name: str = "auto"):
    """(model, tokenizer, device) ready for inference, with no gradient by default.

    ``dtype_name``: see ``pick_device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    n_params = count_params(source)
    device, dtype = pick_device(n_params, dtype_name)
    check_fits(n_params, dtype, device)
    if source.kind == "gguf":
        kw = {"gguf_file": source.path.name}
        folder = source.path.parent
    else:
        kw, folder = {}, source.path
    log.info("loading %s for scoring on %s (%s)", source.path.name, device,
             str(dtype).removeprefix("torch."))
    try:
        with one_parse(source.path if source.kind == "gguf" else None):
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
