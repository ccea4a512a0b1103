"""``bridge export`` through click: outputs, and one-line failures that leave no file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil

import pytest
from click.testing import CliRunner

from bridge.cli import cli
from exporters.config import AUTO_METHOD_BUDGET_S
from runtime import keys
from runtime.context import LlamaModel

SMOLLM2_NAME = "SmolLM2-135M-Instruct-Q4_1"


def _export(*args: str):
    return CliRunner().invoke(cli, ["export", *args])


def _files(folder) -> list[str]:
    """Everything in ``folder``, temporary (dot) files included."""
    return sorted(os.listdir(folder)) if folder.exists() else []


def _assert_clean_failure(result, out_dir, match: str) -> None:
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and match in errors[0], result.output
    assert "Traceback" not in result.output
    assert _files(out_dir) == [], "a failed export must leave no file behind"


# --- failures ----------------------------------------------------------------------------

def test_missing_path(tmp_path):
    out = tmp_path / "out"
    _assert_clean_failure(_export(str(tmp_path / "nope.gguf"), "-o", str(out)), out,
                          "model not found")


def test_folder_without_config(tmp_path):
    (tmp_path / "model").mkdir()
    out = tmp_path / "out"
    _assert_clean_failure(_export(str(tmp_path / "model"), "-o", str(out)), out,
                          "has no config.json")


def test_unsupported_architecture(tmp_path):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 12}))
    out = tmp_path / "out"
    _assert_clean_failure(_export(str(model), "-o", str(out)), out,
                          "unsupported architecture GPT2LMHeadModel")


def test_unsupported_gguf_architecture(tmp_path):
    import gguf
    import numpy as np

    model = tmp_path / "tiny-gpt2.gguf"
    w = gguf.GGUFWriter(model, "gpt2")
    w.add_block_count(2)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out"
    _assert_clean_failure(_export(str(model), "--method", "bi", "-o", str(out)), out,
                          "is a 'gpt2' model")


def test_streamed_scoring_that_cannot_fit_fails_before_any_file(smollm2_gguf, tmp_path,
                                                                monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory",
                        lambda: type("VM", (), {"available": 1 << 20})())
    out = tmp_path / "out"
    _assert_clean_failure(_export(str(smollm2_gguf), "--method", "bi", "-o", str(out)), out,
                          "layer by layer needs about")


@pytest.mark.parametrize("damage, match", [
    ("truncate", "truncated"),  # header intact, tensor data cut short
    ("garbage", "not a valid GGUF"),  # right magic, nonsense after it
    ("empty", "not a valid GGUF"),
])
def test_broken_gguf(smollm2_gguf, tmp_path, damage, match):
    bad = tmp_path / "broken.gguf"
    if damage == "truncate":
        with open(smollm2_gguf, "rb") as f:
            bad.write_bytes(f.read(4 << 20))
    elif damage == "garbage":
        bad.write_bytes(b"GGUF" + os.urandom(4096))
    else:
        bad.write_bytes(b"")
    out = tmp_path / "out"
    _assert_clean_failure(_export(str(bad), "-o", str(out)), out, match)


@pytest.mark.parametrize("args, match", [
    (["--prune", "0"], "strictly between 0 and 1"),
    (["--prune", "1"], "strictly between 0 and 1"),
    (["--prune", "-0.3"], "strictly between 0 and 1"),
    (["--prune", "1.5"], "strictly between 0 and 1"),
    (["--prune", "0.99"], "leaves none"),  # rounds to all 30 layers
    (["--drop-layers", "30"], "out of range"),
    (["--drop-layers", "3,40-41"], "out of range"),
    (["--drop-layers", "0-29"], "drops all 30 layers"),
    (["--drop-layers", "three"], "--drop-layers expects"),
    (["--prune", "0.2", "--drop-layers", "3"], "not both"),
    (["--quant", "Q9_9"], "unknown --quant"),
    (["--method", "magic"], "unknown method 'magic'"),
    (["--score-dtype", "fp8"], "unknown --score-dtype 'fp8'"),
    (["--prune", "lots"], "--prune takes a fraction"),
    (["--prune", "auto", "--method", "even"], "needs a scoring method"),
    (["--device-profile", "tpu"], "unknown device profile"),
    (["--keep-layers", "0-29"], "nothing left to drop"),  # every layer protected
    (["--keep-layers", "0-27", "--prune", "0.1"], "only 2 of 30 are not protected"),
    (["--keep-layers", "31"], "--keep-layers 31 is out of range"),
    (["--keep-layers", "x"], "--keep-layers expects"),
    (["--threads", "0"], "threads must be >= 1"),
    (["--time-budget", "0"], "--time-budget must be a positive"),
    (["--time-budget", "soon"], "--time-budget takes minutes"),
    (["--drop-layers", "3", "--keep-layers", "4"], "--keep-layers applies to --prune"),
])
def test_bad_options(smollm2_gguf, tmp_path, args, match):
    out = tmp_path / "out"
    _assert_clean_failure(_export(str(smollm2_gguf), "-o", str(out), *args), out, match)


@pytest.mark.parametrize("content, match", [
    ("\n\n", "holds no prompt"),
    (None, "cannot read prompt file"),
])
def test_bad_calibration_file(smollm2_gguf, tmp_path, content, match):
    calib = tmp_path / "calib.txt"
    if content is not None:
        calib.write_text(content)
    out = tmp_path / "out"
    result = _export(str(smollm2_gguf), "-o", str(out), "--method", "bi", "--calib", str(calib))
    _assert_clean_failure(result, out, match)


def test_model_too_big_for_memory(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr("exporters.torch_model._HEADROOM", 1 << 50)  # "needs" a petabyte
    out = tmp_path / "out"
    # fit loads the whole model (bi and angular would stream it a layer at a time)
    result = _export(str(smollm2_gguf), "-o", str(out), "--method", "fit")
    _assert_clean_failure(result, out, "scoring needs about")
    assert "--drop-layers" in result.output  # the suggestion


def test_too_few_layers_to_prune():
    from exporters.config import ExportConfig
    from exporters.layers import plan_layers

    with pytest.raises(ValueError, match="too few to prune"):
        plan_layers(ExportConfig(model="m.gguf"), 2)


def test_output_folder_is_a_file(smollm2_gguf, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = _export(str(smollm2_gguf), "-o", str(blocker / "out"), "--drop-layers", "3")
    _assert_clean_failure(result, blocker.parent / "none", "cannot create output folder")
    assert _files(tmp_path) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_read_only_output_folder(smollm2_gguf, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        result = _export(str(smollm2_gguf), "-o", str(out), "--drop-layers", "3")
        _assert_clean_failure(result, out, "cannot write to output folder")
    finally:
        out.chmod(0o755)


@pytest.mark.parametrize("target, args", [
    ("exporters.prune._copy_bytes", ["--drop-layers", "3"]),
    ("exporters.export._copy_and_hash", ["--drop-layers", "3"]),
    # after streamed scoring (on the minimum of 4 prompts, which a tiny budget leaves):
    # the full copy and the layer report are written, then the draft fails
    pytest.param("exporters.prune._copy_bytes", ["--prune", "0.1", "--method", "bi",
                                                 "--threads", "1", "--time-budget", "0.008"],
                 marks=pytest.mark.torch),
])
def test_disk_full_leaves_nothing(smollm2_gguf, tmp_path, monkeypatch, target, args):
    """ENOSPC while writing the draft (or the full copy): every temporary is removed."""
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(target, full_disk)
    out = tmp_path / "out"
    result = _export(str(smollm2_gguf), "-o", str(out), *args)
    _assert_clean_failure(result, out, "No space left on device")


# --- successful exports ------------------------------------------------------------------

def test_export_gguf_writes_full_and_draft(smollm2_gguf, tmp_path):
    out = tmp_path / "out"
    result = _export(str(smollm2_gguf), "-o", str(out), "--drop-layers", "5,15,24")
    assert result.exit_code == 0, result.output
    full, draft = out / f"{SMOLLM2_NAME}.gguf", out / f"{SMOLLM2_NAME}.draft.gguf"
    assert _files(out) == sorted([full.name, draft.name])
    assert full.read_bytes() == smollm2_gguf.read_bytes()  # "keep": the very same file
    assert str(draft) in result.output
    with LlamaModel(draft, vocab_only=True) as model:
        assert model.meta("llama.block_count") == "27"
        assert model.meta(keys.TARGET_SHA256) == hashlib.sha256(full.read_bytes()).hexdigest()
        assert model.meta(keys.METHOD) == "manual"

    again = _export(str(smollm2_gguf), "-o", str(out), "--drop-layers", "5")
    _assert_exists_error(again)
    forced = _export(str(smollm2_gguf), "-o", str(out), "--drop-layers", "5", "--force")
    assert forced.exit_code == 0, forced.output
    with LlamaModel(draft, vocab_only=True) as model:
        assert model.meta("llama.block_count") == "29"
    assert _files(out) == sorted([full.name, draft.name])


def _assert_exists_error(result) -> None:
    assert result.exit_code == 1
    assert "already exists; pass --force" in result.output


def test_export_in_place_writes_only_the_draft(smollm2_gguf, tmp_path):
    """Exporting a GGUF into its own folder: it already is the full model."""
    model = tmp_path / f"{SMOLLM2_NAME}.gguf"
    shutil.copy(smollm2_gguf, model)
    before = model.stat().st_mtime_ns
    result = _export(str(model), "-o", str(tmp_path), "--prune", "0.1", "--method", "even")
    assert result.exit_code == 0, result.output
    assert model.stat().st_mtime_ns == before
    assert _files(tmp_path) == sorted([model.name, f"{SMOLLM2_NAME}.draft.gguf"])


@pytest.mark.model  # the bundled model, by its name
def test_bundled_name_and_requantize(tmp_path):
    """``smollm2`` names the bundled GGUF; a different --quant requantizes it."""
    out = tmp_path / "out"
    result = _export("smollm2", "-o", str(out), "--quant", "Q8_0", "--prune", "0.1",
                     "--method", "even")
    assert result.exit_code == 0, result.output
    full = out / "SmolLM2-135M-Instruct-Q8_0.gguf"
    with LlamaModel(full, vocab_only=True) as model:
        assert model.meta("general.file_type") == "7"  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert (out / "SmolLM2-135M-Instruct-Q8_0.draft.gguf").is_file()


@pytest.mark.slow
def test_export_hf_folder_to_q8_0(smollm2_hf, tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.conftest import SAMPLE_TEXT

    out = tmp_path / "out"
    result = _export(str(smollm2_hf), "-o", str(out), "--quant", "q8_0",
                     "--drop-layers", "10-12")
    assert result.exit_code == 0, result.output
    name = f"{smollm2_hf.name}-Q8_0"
    assert _files(out) == sorted([f"{name}.gguf", f"{name}.draft.gguf"])
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_hf)
    for path in (out / f"{name}.gguf", out / f"{name}.draft.gguf"):
        with LlamaModel(path, vocab_only=True) as model:
            assert model.meta("general.file_type") == "7"
            assert model.tokenize(SAMPLE_TEXT, True, True) == tok(SAMPLE_TEXT)["input_ids"]


def test_hub_id_resolves_from_the_local_cache_offline(tmp_path, monkeypatch):
    """Offline, a hub id is looked up in the local HF cache only (tests/test_hub.py and
    tests/test_hub_cli.py download from a fake Hub)."""
    from huggingface_hub import constants

    from exporters.loading import resolve_model

    repo = tmp_path / "hub" / "models--SomeOrg--tiny-llama"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"\0" * 16)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network either way

    source = resolve_model("SomeOrg/tiny-llama")
    assert (source.kind, source.name, source.path) == ("hf", "tiny-llama", snapshot)
    out = tmp_path / "out"
    _assert_clean_failure(_export("SomeOrg/not-cached", "-o", str(out)), out,
                          "offline (HF_HUB_OFFLINE is set), and SomeOrg/not-cached is not "
                          "in the Hugging Face cache")


@pytest.mark.torch
@pytest.mark.slow
def test_export_scored_auto_writes_report(smollm2_gguf, tmp_path):
    """End to end on SmolLM2: BI scoring, --prune auto, report files beside the GGUFs."""
    pytest.importorskip("torch")
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (
        "What is the capital of France?", "Write a haiku about rain.",
        "Explain recursion briefly.", "Give me a tip for better sleep.")))
    out = tmp_path / "out"
    result = _export(str(smollm2_gguf), "-o", str(out), "--prune", "auto", "--method", "bi",
                     "--calib", str(calib), "--device-profile", "gpu")
    assert result.exit_code == 0, result.output
    names = [f"{SMOLLM2_NAME}{s}" for s in (".gguf", ".draft.gguf", ".layers.json",
                                            ".layers.png")]
    assert _files(out) == sorted(names)
    report = json.loads((out / names[2]).read_text())
    assert report["auto"]["chosen_n_drop"] == len(report["dropped"]) > 0
    assert report["auto"]["reason"] and 0 < report["heldout_alpha"] <= 1
    assert 0 not in report["dropped"] and 29 not in report["dropped"]
    assert (out / names[3]).read_bytes()[:4] == b"\x89PNG"
    with LlamaModel(out / names[1], vocab_only=True) as model:
        assert model.meta(keys.METHOD) == "bi"
        assert model.meta("llama.block_count") == str(30 - len(report["dropped"]))


@pytest.mark.torch
def test_cpu_scores_in_bf16_when_fp32_would_not_fit(monkeypatch):
    """An 8B model (32 GiB in fp32) on a 24 GiB machine is scored in bf16 (16 GiB)."""
    torch = pytest.importorskip("torch")
    from exporters import torch_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch_model, "_free", lambda device: 22 * 2**30)
    assert torch_model.pick_device(135_000_000)[1] == torch.float32
    device, dtype = torch_model.pick_device(8_000_000_000)
    assert (device.type, dtype) == ("cpu", torch.bfloat16)
    torch_model.check_fits(8_000_000_000, dtype, device)  # fits: no error
    # 16B parameters fit in neither dtype: a clear error with a way out
    assert torch_model.pick_device(16_000_000_000)[1] == torch.bfloat16
    with pytest.raises(ValueError, match=r"needs about 35\.\d GiB .* 22\.0 GiB .*--drop-layers"):
        torch_model.check_fits(16_000_000_000, torch.bfloat16, device)


@pytest.mark.torch
@pytest.mark.slow
def test_default_method_says_its_time_first(smollm2_gguf, tmp_path):
    """The default (auto) predicts shortlist's scoring time on this machine before the slow
    stages, runs shortlist when it fits the budget and bi otherwise, and says which."""
    import re

    pytest.importorskip("torch")
    calib = tmp_path / "calib.txt"
    calib.write_text("What is the capital of France?\nWrite a haiku about rain.\n"
                     "Explain recursion briefly.\nGive me a tip for better sleep.\n")
    out = tmp_path / "out"
    result = _export(str(smollm2_gguf), "-o", str(out), "--prune", "0.1", "--calib",
                     str(calib), "--device-profile", "cpu", "--threads", "1")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps long log lines
    chosen = re.search(r"method: (\w+) \(shortlist's scoring is predicted at (\d+) s", text)
    assert chosen and chosen[1] in ("shortlist", "bi"), text
    assert (chosen[1] == "shortlist") == (float(chosen[2]) <= AUTO_METHOD_BUDGET_S)
    assert "estimated time: about" in text
    assert text.index("estimated time") < text.index("calibration text (full model")
    report = json.loads((out / f"{SMOLLM2_NAME}.layers.json").read_text())
    assert report["method"] == chosen[1] and len(report["dropped"]) == 3
    assert report["seconds"]["predicted_total"] > 0
    with LlamaModel(out / f"{SMOLLM2_NAME}.draft.gguf", vocab_only=True) as model:
        assert model.meta(keys.METHOD) == chosen[1]


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("method", ["bi", "shortlist"])  # streamed, and in memory
def test_a_short_time_budget_cuts_the_calibration_set_and_says_so(smollm2_gguf, tmp_path,
                                                                  method):
    """Half a second cannot fit SmolLM2's export on any machine: the export runs on the
    minimum of 4 of the 32 built-in prompts, warns before the slow stages, and the report
    and summary say what was cut."""
    pytest.importorskip("torch")
    out = tmp_path / "out"
    result = _export(str(smollm2_gguf), "-o", str(out), "--prune", "0.1", "--method",
                     method, "--time-budget", "0.008", "--threads", "1")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps long log lines
    assert "over the 0 s left of the time budget even with the minimum of 4 of 32" in text
    assert text.index("time budget") < text.index("calibration text (full model")
    assert "calibrated on 4 of 32 prompts (3 scored, 1 held out)" in text
    report = json.loads((out / f"{SMOLLM2_NAME}.layers.json").read_text())
    assert (report["calib_prompts"], report["heldout_prompts"]) == (3, 1)
    assert report["prompts_offered"] == 32 and report["time_budget_s"] == pytest.approx(0.48)
    assert len(report["dropped"]) == 3


@pytest.mark.torch
@pytest.mark.slow
def test_no_time_budget_uses_every_prompt(smollm2_gguf, tmp_path):
    """'none' scores every offered prompt. Five of them, one over the minimum a budget may
    cut to (the 32 built-in ones took minutes; the test above offers those)."""
    pytest.importorskip("torch")
    calib = tmp_path / "calib.txt"
    calib.write_text("What is the capital of France?\nWrite a haiku about rain.\n"
                     "Explain recursion briefly.\nGive me a tip for better sleep.\n"
                     "Name three colours.\n")
    out = tmp_path / "out"
    result = _export(str(smollm2_gguf), "-o", str(out), "--prune", "0.1", "--method", "bi",
                     "--calib", str(calib), "--time-budget", "none", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "no time budget: all 5 calibration prompts" in " ".join(result.output.split())
    report = json.loads((out / f"{SMOLLM2_NAME}.layers.json").read_text())
    assert (report["calib_prompts"], report["heldout_prompts"]) == (4, 1)  # the whole split
    assert report["prompts_offered"] == 5 and report["time_budget_s"] is None
