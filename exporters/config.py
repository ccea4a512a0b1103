"""Settings for ``bridge export``: one dataclass, validated where user input enters.

Every default lives here and nowhere else; the CLI passes only the options it was given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf

# Quantization types by their llama.cpp names ("Q4_K_M", "F16", ...), from gguf-py's
# file-type enum, so the list follows llama.cpp instead of being typed out here.
QUANT_TYPES: dict[str, int] = {
    ft.name.removeprefix("MOSTLY_").removeprefix("ALL_"): int(ft.value)
    for ft in gguf.LlamaFileType
    if ft is not gguf.LlamaFileType.GUESSED
}
# For a GGUF input: keep the file's own type (no requantization).
KEEP = "keep"
# For a Hugging Face input.
DEFAULT_HF_QUANT = "Q4_K_M"
# Fraction of layers to drop when neither --prune nor --drop-layers is given.
DEFAULT_PRUNE = 0.25
# Layer-choice methods: the scorers of exporters.scoring (which imports this list, so it
# is written once; torch is not imported here), and "even" (evenly spaced middle layers,
# no scoring: fast, a baseline).
SCORING_METHODS = ("shortlist", "greedy", "bi", "angular", "fit")
# "auto" is the default: shortlist when its scoring is predicted (on this machine, before
# it starts) to fit in AUTO_METHOD_BUDGET_S, else bi, which scores in one forward pass.
METHODS = ("auto", *SCORING_METHODS, "even")
# shortlist: greedy over bi's least important layers. Full greedy searches every layer at
# every step (about L/2 forward passes per dropped layer: hours for an 8B model on a CPU)
# for no held-out gain over the shortlist.
AUTO_METHOD = "auto"
# Methods that score a GGUF input one layer in memory at a time (exporters.stream): they
# need only each layer's input and output. The others (shortlist, greedy, fit) replay
# layer subsets or need gradients, so they load the whole model; "auto" on a GGUF whose
# float32 weights do not fit in RAM streams bi.
STREAMED_METHODS = ("bi", "angular")
AUTO_METHOD_BUDGET_S = 60.0
DEFAULT_METHOD = AUTO_METHOD
# --prune auto: the ratio is chosen by predicted speedup (exporters.autoprune).
AUTO = "auto"
# Verify-cost profiles for --prune auto (exporters.autoprune.PROFILES); None: "gpu" when
# llama.cpp has GPU offload, else "cpu".
DEVICE_PROFILES = ("cpu", "gpu")
# Weight dtype for scoring in PyTorch; "auto": bf16 on CUDA, fp16 on MPS, fp32 on a CPU
# unless fp32 would not fit in RAM (then bf16).
SCORE_DTYPES = ("auto", "float32", "bfloat16", "float16")
# Wall-clock budget of a whole scored export (--time-budget, in minutes at the CLI; None:
# none): the calibration set is cut to what fits (exporters.budget). 10 minutes keeps an
# 8B model's export on a 2-core CPU near 12 minutes; a small model uses every prompt.
DEFAULT_TIME_BUDGET_S: float | None = 10 * 60
# Recorded in the draft when the user listed the layers with --drop-layers.
MANUAL_METHOD = "manual"


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how.

    Args:
        model: HF folder, ``.gguf`` file, bundled name, or a Hugging Face id (``org/name``,
            ``org/name-GGUF:Q4_K_M``; ``runtime.hub``).
        revision: branch, tag or commit of a hub id (None: ``main``).
        out_dir: where the full and draft GGUFs are written.
        prune: fraction of layers to drop, 0 < prune < 1, or ``"auto"`` (default
            ``DEFAULT_PRUNE`` when ``drop_layers`` is not given).
        drop_layers: explicit 0-based layer indices to drop; excludes ``prune``.
        quant: llama.cpp type name (``Q4_K_M``, ``Q8_0``, ``F16``...) or ``keep``. None
            means ``DEFAULT_HF_QUANT`` for a Hugging Face input and ``keep`` for a GGUF.
        method: how layers are chosen for ``prune`` (see ``METHODS``).
        keep_layers: layers never dropped by ``prune`` (default: the first and last).
        calib: calibration prompts file (.txt or .jsonl) instead of the built-in set.
        device_profile: verify-cost profile for ``prune="auto"`` (``DEVICE_PROFILES``).
        score_dtype: weight dtype for scoring (``SCORE_DTYPES``).
        force: overwrite existing outputs.
        threads: CPU threads for the quantizer and for scoring in PyTorch (None: all
            cores).
        time_budget: seconds the whole export may take; scoring uses as many
            calibration prompts as are predicted to fit (``exporters.budget``). None: no
            budget, every prompt.
        copy_full: a GGUF from the Hugging Face cache that is kept as it is (not
            requantized) stays there by default: only the draft is written to
            ``out_dir``, and the runtime finds it by the full file's sha256. True copies
            the full file into ``out_dir`` too, beside its draft.
    """

    model: str
    out_dir: Path = field(default_factory=Path.cwd)
    prune: float | str | None = None
    drop_layers: tuple[int, ...] | None = None
    quant: str | None = None
    method: str = DEFAULT_METHOD
    keep_layers: tuple[int, ...] | None = None
    calib: Path | None = None
    device_profile: str | None = None
    score_dtype: str = "auto"
    force: bool = False
    threads: int | None = None
    time_budget: float | None = DEFAULT_TIME_BUDGET_S
    revision: str | None = None
    copy_full: bool = False

    def __post_init__(self) -> None:
        if not str(self.model).strip():
            raise ValueError("MODEL is empty: give a HF folder, a hub id, a .gguf file, "
                             "or a bundled name (smollm2, gemma3)")
        if self.revision is not None and (not self.revision.strip()
                                          or any(c.isspace() for c in self.revision)):
            raise ValueError(f"--revision must name a branch, tag or commit; got "
                             f"{self.revision!r}")
        object.__setattr__(self, "out_dir", Path(self.out_dir).expanduser())
        self._check_layers()
        if self.quant is not None:
            q = self.quant.strip()
            q = KEEP if q.lower() == KEEP else q.upper()
            if q != KEEP and q not in QUANT_TYPES:
                raise ValueError(f"unknown --quant {self.quant!r}; choose one of "
                                 f"{', '.join(QUANT_TYPES)} or {KEEP}")
            object.__setattr__(self, "quant", q)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.device_profile is not None and self.device_profile not in DEVICE_PROFILES:
            raise ValueError(f"unknown device profile {self.device_profile!r}; choose one of "
                             f"{', '.join(DEVICE_PROFILES)}")
        if self.score_dtype not in SCORE_DTYPES:
            raise ValueError(f"unknown --score-dtype {self.score_dtype!r}; choose one of "
                             f"{', '.join(SCORE_DTYPES)}")
        if self.calib is not None:
            object.__setattr__(self, "calib", Path(self.calib).expanduser())
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"--time-budget must be a positive number of minutes, or "
                             f"'none'; got {self.time_budget / 60:g}")

    def _check_layers(self) -> None:
        if self.prune is not None and self.drop_layers is not None:
            raise ValueError("give either --prune or --drop-layers, not both")
        if self.drop_layers is not None:
            if not self.drop_layers:
                raise ValueError("--drop-layers is empty; list layers like '3,7,12' or '10-12'")
            if min(self.drop_layers) < 0:
                raise ValueError(f"layer indices start at 0; got {min(self.drop_layers)}")
            object.__setattr__(self, "drop_layers", tuple(sorted(set(self.drop_layers))))
            if self.keep_layers is not None:
                raise ValueError("--keep-layers applies to --prune; with --drop-layers list "
                                 "only the layers to drop")
            return
        if self.keep_layers is not None:
            if min(self.keep_layers, default=0) < 0:
                raise ValueError(f"layer indices start at 0; got {min(self.keep_layers)}")
            object.__setattr__(self, "keep_layers", tuple(sorted(set(self.keep_layers))))
        if isinstance(self.prune, str) and self.prune.strip().lower() == AUTO:
            if self.method == "even":
                raise ValueError(f"--prune auto needs a scoring method "
                                 f"({', '.join(SCORING_METHODS)}) to predict acceptance; "
                                 "'even' does not score")
            object.__setattr__(self, "prune", AUTO)
            return
        try:
            prune = DEFAULT_PRUNE if self.prune is None else float(self.prune)
        except ValueError:
            raise ValueError(f"--prune takes a fraction such as 0.25, or {AUTO}; "
                             f"got {self.prune!r}") from None
        if not 0.0 < prune < 1.0:
            raise ValueError(f"--prune must be a fraction strictly between 0 and 1 "
                             f"(e.g. 0.25 drops a quarter of the layers); got {self.prune}")
        object.__setattr__(self, "prune", prune)


_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")


def parse_layer_list(text: str, option: str = "--drop-layers") -> tuple[int, ...]:
    """``"3,7,10-12"`` -> ``(3, 7, 10, 11, 12)``; raises ValueError on anything else."""
    layers: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if part.isdigit():
            layers.add(int(part))
        elif m := _RANGE.match(part):
            lo, hi = int(m[1]), int(m[2])
            if lo > hi:
                raise ValueError(f"{option} range {part!r} runs backwards; write {hi}-{lo}")
            layers.update(range(lo, hi + 1))
        else:
            raise ValueError(f"{option} expects indices like '3,7,12' or ranges like "
                             f"'10-12'; could not read {part!r} in {text!r}")
    return tuple(sorted(layers))


def parse_minutes(text: str) -> float | None:
    """``--time-budget``: ``"12"`` -> 720.0 seconds, ``"none"`` -> None (no budget)."""
    if text.strip().lower() in ("none", "off", "unlimited"):
        return None
    try:
        minutes = float(text)
    except ValueError:
        raise ValueError(f"--time-budget takes minutes, such as 10 or 2.5, or 'none'; got "
                         f"{text!r}") from None
    if not minutes > 0 or minutes == float("inf"):
        raise ValueError(f"--time-budget must be a positive number of minutes, or 'none'; "
                         f"got {text!r}")
    return minutes * 60
