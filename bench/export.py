"""Wall time and peak RSS of ``bridge export`` on the bundled SmolLM2.

(a) the HF fixture (float32 safetensors) -> Q8_0 full GGUF + draft: convert, quantize, cut
    (layers given with --drop-layers: the conversion alone, no scoring);
(b) the bundled Q4_1 GGUF -> full (a copy) + draft, likewise;
(c) as (a), with the layers chosen by scoring (--method, default bi): the model is then
    also loaded in PyTorch (float32 on a CPU), which dominates the peak.

Peak RSS is compared with the model's F16 size: the target is under about 2x. At 135M
parameters the ~400 MiB that Python, torch and transformers occupy before any tensor is
read dominates, so ``--synthetic 1`` repeats (a) and (c) on a randomly initialised
bfloat16 llama of about 1 B parameters (built once under bench/work/), where the ratio
reflects the streaming itself; (c) then scores in bfloat16 (``--score-dtype``), as a CPU
does for a model whose float32 weights would not fit in RAM (an 8B model on 24 GiB).

Each export runs as its own ``bridge export`` process, so every peak RSS is that run's
alone (read with os.wait4); its anonymous part (memory that must fit in RAM, as opposed to
file pages of mapped model files) is sampled from /proc (Linux).

    python -m bench.export [--synthetic 1]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import BRIDGE, ROOT, arg_parser, checkout_env, rss_mib
from exporters import testmodels


def measure_export(label: str, args: list[str], out_dir: Path, f16_mib: float,
                   log: Path | None = None) -> None:
    """Run one export; with ``log``, its stderr (the exporter's log) is kept there."""
    cmd = [*BRIDGE, "export", *args, "-o", str(out_dir), "--force"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=checkout_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    anon = [0]
    watcher = threading.Thread(target=_watch_anon, args=(proc.pid, anon), daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    watcher.join()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if log is not None:
        log.write_text(err)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{label}: export failed:\n{err}")
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.0f} MiB"
                      for p in sorted(out_dir.glob("*.gguf")))
    # ru_maxrss is in KiB on Linux
    rss = usage.ru_maxrss / 1024
    print(f"{label:36s} wall {wall:6.1f} s   peak RSS {rss:6.0f} MiB = {rss / f16_mib:.2f}x F16"
          f", anonymous {anon[0]:6.0f} MiB = {anon[0] / f16_mib:.2f}x   ({sizes})")


def _watch_anon(pid: int, peak: list[float]) -> None:
    """Peak anonymous resident memory (MiB) of ``pid``, sampled every 50 ms.

    RSS also counts file pages mapped from the model files (safetensors, the GGUF being
    quantized); the kernel drops those under pressure, so anonymous memory is what must
    fit in RAM.
    """
    while (mib := rss_mib(pid, "RssAnon")) is not None:  # None: gone, or a zombie
        peak[0] = max(peak[0], mib)
        time.sleep(0.05)


def synthetic_model(billions: float, tokenizer_from: Path) -> Path:
    """A random bfloat16 llama of about ``billions`` x 1e9 parameters (SmolLM2's tokenizer)."""
    import torch
    import transformers

    hidden, ffn, vocab = 2048, 5632, 49152
    kv = hidden // 4  # 8 of 32 heads for keys and values
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn  # q, o; k, v; MLP
    n_layers = max(2, round((billions * 1e9 - 2 * vocab * hidden) / per_layer))
    folder = ROOT / "bench" / "work" / f"synthetic-{n_layers}L"
    if (folder / "model.safetensors.index.json").is_file() or \
            (folder / "model.safetensors").is_file():
        return folder
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=n_layers,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: never a float32 copy
    model = transformers.LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, max_shard_size="1GB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = arg_parser(__spec__.name, __doc__)
    parser.add_argument("--drop-layers", default="13,14,17", help="layers for (a), (b)")
    parser.add_argument("--prune", default="0.1", help="--prune for (c)")
    parser.add_argument("--method", default="bi", help="--method for (c)")
    parser.add_argument("--synthetic", type=float, metavar="B",
                        help="also run (a) and (c) on a random llama of about B billion "
                             "parameters")
    args = parser.parse_args(argv)
    gguf_path = testmodels.fetch_gguf(testmodels.SMOLLM2)
    hf = testmodels.build_hf_fixture(gguf_path, gguf_path.parent / testmodels.HF_FIXTURE_DIRNAME)
    f16_mib = (hf / "model.safetensors").stat().st_size / 2**20 / 2
    print(f"SmolLM2-135M: F16 size {f16_mib:.0f} MiB (HF fixture: float32); "
          f"{os.cpu_count()} CPU cores")
    drop = ["--drop-layers", args.drop_layers]
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        measure_export("(a) HF fixture -> Q8_0 + draft", [str(hf), "--quant", "Q8_0", *drop],
                       Path(tmp, "a"), f16_mib)
        measure_export("(b) Q4_1 GGUF -> copy + draft", [str(gguf_path), *drop],
                       Path(tmp, "b"), f16_mib)
        measure_export(f"(c) as (a), scored by {args.method}",
                       [str(hf), "--quant", "Q8_0", "--prune", args.prune, "--method",
                        args.method], Path(tmp, "c"), f16_mib)
        if args.synthetic:
            syn = synthetic_model(args.synthetic, hf)
            syn_mib = sum(f.stat().st_size for f in syn.glob("*.safetensors")) / 2**20
            print(f"{syn.name}: bfloat16 checkpoint {syn_mib:.0f} MiB (= its F16 size)")
            measure_export("(d) synthetic -> Q8_0 + draft",
                           [str(syn), "--quant", "Q8_0", "--drop-layers", "1"],
                           Path(tmp, "d"), syn_mib)
            shutil.rmtree(Path(tmp, "d"))
            measure_export(f"(e) as (d), scored by {args.method} in bf16",
                           [str(syn), "--quant", "Q8_0", "--prune", args.prune, "--method",
                            args.method, "--score-dtype", "bfloat16"], Path(tmp, "e"), syn_mib)


if __name__ == "__main__":
    main()
