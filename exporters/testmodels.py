"""The bundled test models (``runtime.bundled``) plus the SmolLM2 Hugging Face-format fixture.

The fixture is built from the GGUF through transformers (dequantized to float32) so the
exporter can be tested on a real HF checkpoint; it needs the export extra, which is why it
lives here and the fetching of the GGUFs in ``runtime.bundled``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from runtime.bundled import (  # noqa: F401  (re-exported: tests and scripts use these names)
    BUNDLED,
    DEFAULT_MODEL,
    GEMMA3,
    SMOLLM2,
    BundledModel,
    FetchError,
    WheelPart,
    fetch_gguf,
    models_dir,
    resolve_bundled,
)
from runtime.files import sha256_file

log = logging.getLogger(__name__)

HF_FIXTURE_DIRNAME = "smollm2-135m-instruct-hf"
_FIXTURE_STAMP = "bridge-fixture.json"


def build_hf_fixture(gguf: Path, out_dir: Path) -> Path:
    """Dequantize ``gguf`` through transformers and save it as a Hugging Face folder.

    Writes ``config.json``, ``model.safetensors`` (float32, so every dequantized value is
    exact) and the tokenizer files, plus a stamp with the source GGUF's sha256 and each
    written file's sha256. A re-run with a matching stamp is a no-op; any mismatch rebuilds.
    """
    source_sha = sha256_file(gguf)
    if _fixture_ok(out_dir, source_sha):
        log.info("HF fixture: cached and verified (%s)", out_dir)
        return out_dir
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from exporters.loading import one_parse
    except ImportError as e:
        raise FetchError(
            f"building the HF fixture needs the export extra ({e.name} is missing); "
            "run scripts/setup.sh or pip install 'bridge-specdec[export]'"
        ) from None
    log.info("HF fixture: dequantizing %s through transformers", gguf.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        with one_parse(gguf):
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        _drop_gguf_quantizer(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp creates 0700
        files = {}
        for path in sorted(p for p in tmp.iterdir() if p.is_file()):
            path.chmod(0o644)
            files[path.name] = sha256_file(path)
        stamp = {"source": gguf.name, "source_sha256": source_sha, "files": files}
        (tmp / _FIXTURE_STAMP).write_text(json.dumps(stamp, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("HF fixture: written to %s", out_dir)
    return out_dir


def _drop_gguf_quantizer(model) -> None:
    # transformers tags a GGUF-loaded model as "quantized with gguf" and refuses to save
    # it, although its weights are already plain dequantized float tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if "is_quantized" in vars(model):
        model.is_quantized = False


def _fixture_ok(out_dir: Path, source_sha: str) -> bool:
    stamp_path = out_dir / _FIXTURE_STAMP
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("source_sha256") != source_sha:
        return False
    for name, sha in stamp.get("files", {}).items():
        path = out_dir / name
        if not path.is_file() or sha256_file(path) != sha:
            log.warning("HF fixture: %s fails its sha256 check; rebuilding", path)
            return False
    return bool(stamp.get("files"))


def fetch_all(root: Path | None = None, hf_fixture: bool = True) -> dict[str, Path]:
    """Fetch every bundled GGUF (and the HF fixture); returns name -> path."""
    root = root or models_dir()
    paths = {m.name: fetch_gguf(m, root) for m in BUNDLED.values()}
    if hf_fixture:
        paths["smollm2-hf"] = build_hf_fixture(paths["smollm2"], root / HF_FIXTURE_DIRNAME)
    return paths
