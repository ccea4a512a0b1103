"""Choosing the layers of a GGUF input one layer in memory at a time.

``score_layers_streamed`` is ``layers.score_layers`` for the methods that stream
(``STREAMED_METHODS``: ``bi``, ``angular``): the calibration text is the full model's own
greedy output written by llama.cpp on the GGUF, the scores come from one streamed pass
over the calibration texts (``exporters.stream``), and held-out acceptance from a second
one in which the full model and every candidate draft run side by side.

``check_memory`` runs before any output is written: it refuses an export whose streamed
scoring cannot fit in RAM.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import gguf

from exporters.loading import ModelSource, gguf_arch, gguf_block_count, one_parse
from exporters.report import LayerReport, Stages, log_stages

log = logging.getLogger(__name__)

# Python, torch and transformers before any weight (measured: about 600 MiB)
_BASE_BYTES = 700 << 20
# calibration tokens per prompt assumed before the prompts are tokenized (the built-in
# prompts are 20-60 tokens, plus DEFAULT_NEW_TOKENS)
_TOKENS_PER_PROMPT = 128


def stream_need(reader: gguf.GGUFReader, n_prompts: int, tracks: int) -> int:
    """Bytes streamed scoring holds at its peak, from the file's tensor shapes.

    One layer in fp32, plus its fp32 dequantization buffer (numpy, then torch: 2 x 4
    bytes per weight, the largest layer counted); a head slice likewise; the hidden
    states [tokens, H] fp32 of ``tracks`` states per text (bi: 2, angular: max_drop + 2,
    held-out: 1 + drafts); a layer's activations (attention [T, T] per head and the FFN's
    [T, F] are bounded by 8 states); and the base of Python and torch.
    """
    from exporters.stream import HEAD_ROWS

    n_layers = gguf_block_count(reader)
    per_layer = [0] * n_layers
    hidden = 0
    for t in reader.tensors:
        if t.name.startswith("blk."):
            per_layer[int(t.name.split(".")[1])] += int(t.n_elements)
        elif t.name == "token_embd.weight":
            hidden = int(t.shape[0])
    layer = 8 * max(per_layer)
    head = 8 * HEAD_ROWS * hidden
    states = 4 * hidden * _TOKENS_PER_PROMPT * n_prompts * (tracks + 8)
    return _BASE_BYTES + layer + head + states


def check_memory(reader: gguf.GGUFReader, path: Path, n_prompts: int, tracks: int) -> None:
    """Raise ValueError when streamed scoring of ``path`` cannot fit in free RAM."""
    import psutil

    need, free = stream_need(reader, n_prompts, tracks), psutil.virtual_memory().available
    if need > free:
        raise ValueError(f"scoring {path.name} layer by layer needs about "
                         f"{need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB of RAM is "
                         "free; use --drop-layers to skip scoring, or close other programs")


def preflight(plan, source: ModelSource, reader: gguf.GGUFReader) -> str | None:
    """Before any output is written: the method a GGUF export will stream (None: it
    does not stream), after checking that its streamed scoring fits in RAM."""
    from exporters import calibration
    from exporters.layer_common import AUTO_MAX_FRACTION, streamed_method
    from exporters.stream import check_streamable

    method = streamed_method(plan.cfg, source)
    if method is None:
        return None
    check_streamable(gguf_arch(reader), source.path)
    n_prompts = len(calibration.load_prompts(plan.cfg.calib))
    max_drop = plan.n_drop or math.ceil(AUTO_MAX_FRACTION * plan.n_layers)
    # bi holds a layer's input and output; angular max_drop + 1 boundaries and the new
    # one; held-out acceptance the full model and each draft
    tracks = max(2 if method == "bi" else max_drop + 2,
                 1 + (max_drop if plan.n_drop is None else 1))
    check_memory(reader, source.path, n_prompts, tracks)
    return method


def score_layers_streamed(plan, source: ModelSource, full: gguf.GGUFReader, method: str,
                          stages: Stages = log_stages,
                          deadline: float | None = None) -> LayerReport:
    """Score ``source`` (a GGUF) with ``method`` (``bi`` or ``angular``) layer by layer
    and measure the chosen draft on held-out prompts; see the module docstring.

    ``deadline`` (``time.perf_counter()`` seconds; None: none): the calibration prompts
    are cut to what is predicted to finish by then (``exporters.budget``).
    """
    import torch

    from exporters import autoprune, budget, calibration, estimate
    from exporters.layer_common import AUTO_MAX_FRACTION, layer_report
    from exporters.stream import GGUFLayers, score_streamed, streamed_agreement

    cfg, timings = plan.cfg, {}
    prompts = calibration.load_prompts(cfg.calib)
    profile = cfg.device_profile or autoprune.default_profile()
    costs = autoprune.byte_profile(full, plan.n_layers)
    auto = plan.n_drop is None
    max_drop = plan.n_drop or min(len(plan.droppable), math.ceil(AUTO_MAX_FRACTION *
                                                                 plan.n_layers))

    t = time.perf_counter()
    dtype = torch.float32 if cfg.score_dtype == "auto" else getattr(torch, cfg.score_dtype)
    # ``full`` reads the input itself when the output is its byte copy
    same = Path(getattr(full.data, "filename", "") or "").resolve() == source.path.resolve()
    src = GGUFLayers(source.path, dtype, full if same else None)
    if src.n_layers != plan.n_layers:
        raise ValueError(f"{source.path.name} has {src.n_layers} layers in PyTorch but "
                         f"{plan.n_layers} in its GGUF; cannot score it")
    tokenizer = _tokenizer(source.path, src)
    encoded = [calibration.format_prompt(tokenizer, p) for p in prompts]
    timings["load"] = time.perf_counter() - t
    log.info("scoring %s layer by layer from the GGUF (%s, %s): one layer in memory at a "
             "time", source.path.name, method, str(dtype).removeprefix("torch."))

    t = time.perf_counter()
    n_new = calibration.DEFAULT_NEW_TOKENS
    # the probes: layer 0 in PyTorch on a text of a calibration text's length (its token
    # values do not change the time), then llama.cpp on the first prompt. In this order:
    # llama.cpp maps (and prefetches) the whole file, and the probe's float32 layer must
    # not be held beside it
    probe = estimate.probe_streamed(src, src.text(encoded[0] + [encoded[0][-1]] * n_new,
                                                  len(encoded[0]) - 1))
    with calibration.open_llamacpp(source.path) as llama:
        per_row = calibration.llamacpp_row_seconds(llama, encoded[0], cfg.threads)

        def predict(n: int) -> estimate.Estimate:
            calib_e, held_e = budget.subset(encoded, n)
            return estimate.predict_streamed(
                probe, per_row * calibration.generation_rows(calib_e + held_e, n_new),
                method, plan.n_layers, [len(e) + n_new for e in calib_e],
                [len(e) + n_new for e in held_e], n_new, max_drop if auto else 1)

        sizing = budget.fit_prompts(len(prompts), predict, budget.time_left(deadline))
        budget.log_sizing(sizing, method, "; --drop-layers skips scoring")
        timings["predicted_total"] = sizing.estimate.total
        calib_e, held_e = budget.subset(encoded, sizing.used)
        chosen = calib_e + held_e
        with stages("calibration text (full model's own output, llama.cpp)",
                    calibration.generation_rows(chosen, n_new)) as advance:
            conts = calibration.llamacpp_continuations(llama, chosen, n_new, cfg.threads,
                                                       advance)
    texts = [src.text(e + c, len(e) - 1) for e, c in zip(chosen, conts, strict=True)]
    calib, held = texts[:len(calib_e)], texts[len(calib_e):]
    timings["calibration"] = time.perf_counter() - t

    t = time.perf_counter()
    with stages(f"scoring layers ({method}, streamed)", plan.n_layers) as advance:
        scores = score_streamed(src, method, calib, max_drop, plan.protected, advance)
    timings[method] = time.perf_counter() - t
    all_scores = {method: scores.importance}

    t = time.perf_counter()
    drops = dict(scores.drops) if auto else {plan.n_drop: scores.drops[plan.n_drop]}
    with stages("held-out acceptance (streamed)", plan.n_layers) as advance:
        alphas = streamed_agreement(src, held, drops, advance)
    timings["heldout"] = time.perf_counter() - t
    n_tokens = sum(len(t.ids) - 1 - t.start for t in calib)  # scored positions
    return layer_report(source.name, plan, method, scores, all_scores, alphas, costs,
                        profile, auto, (len(calib_e), len(held_e), n_tokens), timings,
                        sizing)


def _tokenizer(path: Path, src):
    from transformers import AutoTokenizer

    try:
        with one_parse(path):
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"transformers cannot read {path.name}'s tokenizer: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not getattr(tok, "chat_template", None):
        # transformers' GGUF tokenizer drops the chat template; the file has it
        tok.chat_template = src.chat_template()
    return tok
