"""``bridge export``: MODEL -> ``<name>-<QUANT>.gguf`` (full) + ``<name>-<QUANT>.draft.gguf``.

The full model comes from one of three routes:

- a Hugging Face checkpoint: converted to F16 (BF16 for bfloat16 weights) by our own
  gguf-py converter, then quantized by llama.cpp's quantizer;
- a GGUF whose type is what was asked for (the default for a GGUF, ``--quant keep``):
  copied unchanged, or, when it sits in the Hugging Face cache, left there and referred
  to (``ExportConfig.copy_full`` copies it); a split GGUF is joined into one file;
- a GGUF of another type: requantized by llama.cpp (which loses a little more precision).

Every draft is indexed under its full file's sha256 (``runtime.files.remember_draft``),
which is how ``bridge chat org/name-GGUF:Q4_K_M`` finds a draft that is not beside the
cached GGUF.

The draft is then cut from the full file (``exporters.prune``). Everything is written
under temporary names beside the outputs and renamed into place only when both files are
complete; on any failure (a bad option, a full disk) the temporary files are removed and
no output file appears.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gguf

from exporters import hparams as hp
from exporters.config import DEFAULT_HF_QUANT, KEEP, ExportConfig
from exporters.layers import LayerChoice, choose_layers, plan_layers, report_paths
from exporters.loading import (
    ModelSource,
    gguf_arch,
    gguf_block_count,
    gguf_quant_name,
    gguf_split_count,
    open_gguf,
    read_hf_config,
    resolve_model,
)
from exporters.prune import PRUNABLE, DraftInfo, write_draft
from exporters.report import LayerReport, Stages, log_stages
from runtime import keys
from runtime.files import draft_path_for, remember_draft, sha256_file, sha256_file_cached

log = logging.getLogger(__name__)

_CHUNK = 16 << 20
_FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class ExportResult:
    full_path: Path
    draft_path: Path
    n_layers: int
    kept_layers: tuple[int, ...]
    dropped_layers: tuple[int, ...]
    quant: str
    method: str
    target_sha256: str
    seconds: float
    report: LayerReport | None = None
    report_paths: tuple[Path, ...] = ()
    full_in_cache: bool = False  # full_path is the Hugging Face cache's file, not a copy


@dataclass(frozen=True)
class _Source:
    """A resolved MODEL plus what the export needs to know about it up front."""

    model: ModelSource
    n_layers: int
    quant: str  # the full output's type
    requantize: bool  # a GGUF input that must change type
    reader: gguf.GGUFReader | None = None  # the GGUF input's, reused for its draft
    split: bool = False  # a split GGUF: the full output joins its files


def run_export(cfg: ExportConfig, stages: Stages = log_stages) -> ExportResult:
    """Write the full GGUF and its draft for ``cfg.model`` into ``cfg.out_dir``.

    With a scoring method, the layer report (``<name>-<QUANT>.layers.json`` and ``.png``)
    is written beside them; ``stages`` reports progress of the long scoring stages.

    Raises:
        FileNotFoundError: MODEL does not exist.
        ValueError: MODEL or an option is unusable (the message says why).
        OSError: the outputs cannot be written (exists without --force, no permission,
            disk full...).
    """
    start = time.perf_counter()
    source = _inspect(resolve_model(cfg.model, cfg.revision), cfg)
    plan = plan_layers(cfg, source.n_layers)  # checks the options before any work
    streamed = None  # the method that scores layer by layer, if any
    if plan.scored and source.reader is not None and not source.split:
        from exporters.layers_streamed import preflight

        streamed = preflight(plan, source.model, source.reader)  # and it fits in RAM
    out_dir = _prepare_out_dir(cfg.out_dir)
    named = out_dir / f"{source.model.name}-{source.quant}{keys.FULL_SUFFIX}"
    # a cached GGUF kept as it is stays in the cache: the draft goes to out_dir alone
    refer = source.model.cached and _same_bytes(source) and not cfg.copy_full
    full = source.model.path if refer else named
    draft = draft_path_for(named)
    reports = report_paths(named) if plan.scored else ()
    in_place = _same_bytes(source) and full.resolve() == source.model.path.resolve()
    _refuse_overwrite([draft, *reports] if in_place else [full, draft, *reports], cfg.force)

    with _Staging(out_dir) as stage:
        t = time.perf_counter()
        if in_place:
            # sha256_file_cached: a download already hashed (and verified) the cached file
            full_bytes, sha = full, (sha256_file_cached(full) if refer else sha256_file(full))
        else:
            full_bytes = stage.temp(full)
            sha = _build_full(source, cfg, full_bytes, stage)
            stage.commit(full_bytes, full)
        deadline = _deadline(cfg, start, full_bytes, time.perf_counter() - t)
        # a byte copy has the input's tensor offsets, so the input's reader serves it
        reader = source.reader if _same_bytes(source) else None
        if plan.scored and reader is None:
            reader = open_gguf(full_bytes)
        scored = source.model
        if source.split and plan.scored:
            # the first file of a split holds only some tensors: score the joined file
            from exporters.layers_streamed import preflight

            scored = ModelSource("gguf", full_bytes, source.model.name)
            streamed = preflight(plan, scored, reader)
        # scoring runs after the full GGUF exists: its tensor sizes give the draft's cost
        choice, report = choose_layers(plan, scored, reader, stages, streamed, deadline)
        if report is not None:
            _stage_report(report, reports, stage)
        draft_tmp = stage.temp(draft)
        write_draft(full_bytes, draft_tmp, choice.kept,
                    DraftInfo(method=choice.method, target_sha256=sha), reader=reader)
        stage.commit(draft_tmp, draft)
    remember_draft(draft, sha)  # so the runtime finds it from the full file, wherever that is
    result = _result(full, draft, choice, source.quant, sha, time.perf_counter() - start,
                     report, reports, refer)
    log.info("wrote %s and %s (%d of %d layers kept) in %.1f s", full.name, draft.name,
             len(result.kept_layers), result.n_layers, result.seconds)
    return result


def _inspect(model: ModelSource, cfg: ExportConfig) -> _Source:
    if model.kind == "gguf":
        reader = open_gguf(model.path)
        if gguf_arch(reader) not in PRUNABLE:
            raise ValueError(f"{model.path.name} is a {gguf_arch(reader)!r} model; bridge "
                             f"exports {', '.join(PRUNABLE)}")
        own = gguf_quant_name(reader)
        quant = own if cfg.quant in (None, KEEP) else cfg.quant
        if gguf_split_count(reader) > 1:
            return _Source(model, gguf_block_count(reader), quant, quant != own, None,
                           split=True)
        return _Source(model, gguf_block_count(reader), quant, quant != own, reader)
    if cfg.quant == KEEP:
        raise ValueError("--quant keep applies to a GGUF input only; choose a type such as "
                         f"{DEFAULT_HF_QUANT} for a Hugging Face model")
    hp.detect_arch(read_hf_config(model.path), model.path)  # fail early if unsupported
    n_layers = hp.text_config(model.path).num_hidden_layers
    return _Source(model, n_layers, cfg.quant or DEFAULT_HF_QUANT, False)


def _deadline(cfg: ExportConfig, start: float, full: Path, full_s: float) -> float | None:
    """When scoring must be done for the export to end within ``cfg.time_budget``: the
    draft still has to be written after it, about as many bytes as the full file, so
    the time that writing (or hashing) the full file took, or the file at
    ``_WRITE_RATE`` when it came from a slower route (conversion, quantization), is
    kept back for it."""
    if cfg.time_budget is None:
        return None
    draft_s = min(full_s, full.stat().st_size / _WRITE_RATE)
    return start + cfg.time_budget - draft_s


# bytes a second at which the draft is assumed to be written when the full file was not a
# plain copy (a conservative local disk, with the sha256 the draft does not need)
_WRITE_RATE = 200e6


def _same_bytes(source: _Source) -> bool:
    """The full output is a byte copy of the GGUF input."""
    return source.model.kind == "gguf" and not source.requantize and not source.split


def _build_full(source: _Source, cfg: ExportConfig, out: Path, stage: _Staging) -> str:
    """Write the full model at ``out``; returns its sha256."""
    if source.model.kind == "hf":
        _full_from_hf(source, cfg, out, stage)
    elif source.split and not source.requantize:
        from exporters.quantize import quantize

        quantize(source.model.path, out, source.quant, cfg.threads, copy_only=True)
    elif source.requantize:
        from exporters.quantize import quantize

        log.warning("requantizing %s to %s: quantizing already quantized weights loses "
                    "more precision than quantizing the original checkpoint",
                    source.model.path.name, source.quant)
        quantize(source.model.path, out, source.quant, cfg.threads, allow_requantize=True)
    else:
        return _copy_and_hash(source.model.path, out)
    return sha256_file(out)


def _full_from_hf(source: _Source, cfg: ExportConfig, out: Path, stage: _Staging) -> None:
    from exporters.convert import convert_hf, intermediate_type
    from exporters.tokenizer import verify_tokenizer

    folder = source.model.path
    if source.quant in _FLOAT_TYPES:
        convert_hf(folder, out, source.quant, source.model.name)
        verify_tokenizer(out, folder)
        return
    from exporters.quantize import quantize

    floats = stage.temp(out.with_name(f"{source.model.name}-float.gguf"))
    convert_hf(folder, floats, intermediate_type(folder), source.model.name)
    verify_tokenizer(floats, folder)
    quantize(floats, out, source.quant, cfg.threads)
    stage.discard(floats)  # free the disk space before the draft is written


def _prepare_out_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create output folder {path}: {e.strerror or e}") from None
    if not path.is_dir():
        raise NotADirectoryError(f"output folder {path} is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to output folder {path}")
    return path.resolve()


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    for path in paths:
        if path.exists() and not force:
            raise FileExistsError(f"{path} already exists; pass --force to overwrite it")


def _result(full: Path, draft: Path, choice: LayerChoice, quant: str, sha: str,
            seconds: float, report: LayerReport | None, reports: tuple[Path, ...],
            in_cache: bool) -> ExportResult:
    return ExportResult(full, draft, choice.n_layers, choice.kept, choice.dropped, quant,
                        choice.method, sha, seconds, report, reports, in_cache)


def _stage_report(report: LayerReport, paths: tuple[Path, ...], stage: _Staging) -> None:
    from exporters.report import write_json, write_png

    json_path, png_path = paths
    for final, write in ((json_path, write_json), (png_path, write_png)):
        tmp = stage.temp(final)
        write(report, tmp)
        stage.commit(tmp, final)


def _copy_and_hash(src: Path, dst: Path) -> str:
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(_CHUNK):
            digest.update(block)
            fout.write(block)
    return digest.hexdigest()


class _Staging:
    """Temporary files beside the outputs: renamed into place together when the block
    succeeds, all removed when it fails."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self._temps: list[Path] = []
        self._commits: list[tuple[Path, Path]] = []

    def __enter__(self) -> _Staging:
        return self

    def temp(self, final: Path) -> Path:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=self.out_dir)
        os.close(fd)
        self._temps.append(Path(name))
        return Path(name)

    def commit(self, tmp: Path, final: Path) -> None:
        """Rename ``tmp`` to ``final`` when the block ends without error."""
        self._commits.append((tmp, final))

    def discard(self, tmp: Path) -> None:
        tmp.unlink(missing_ok=True)
        self._temps.remove(tmp)

    def __exit__(self, exc_type, exc, tb) -> None:
        placed: list[Path] = []
        try:
            if exc_type is None:
                for tmp, final in self._commits:
                    _fsync(tmp)
                    os.chmod(tmp, 0o644)  # mkstemp makes 0600; models are shared files
                    os.replace(tmp, final)
                    placed.append(final)
        except BaseException:
            for final in placed:  # all or nothing
                final.unlink(missing_ok=True)
            raise
        finally:
            for tmp in self._temps:
                tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
