"""The ggml libraries llama-cpp-python loaded, for the calls it does not bind, and what
they and the CPU say about this machine's devices. A leaf: ``runtime.context``,
``runtime.rpc``, the exporters and the benchmarks import it; it imports no module of the
project.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import re
import subprocess
import threading
from collections.abc import Callable
from typing import TypeVar

import llama_cpp

T = TypeVar("T")

_GGML_DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL"}  # enum ggml_backend_dev_type
# the CPU flags that choose llama.cpp's kernels (and, for AMX, whether its extra buffer
# types are safe): what a results file must name for its figures to be compared
_SIMD_FLAGS = re.compile(r"avx2$|avx512|amx")
ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)  # ggml_abort_callback_t


@functools.cache
def ggml_library(name: str) -> ctypes.CDLL:
    """One of the ggml libraries llama-cpp-python loaded (``"ggml"``, ``"ggml-base"``),
    the very copy libllama uses, for calls llama-cpp-python does not bind.

    A wheel holds libggml-base.so, .so.0 and .so.0.25.3 as three copies, not links, and
    libllama resolves the soname (.so.0): a callback set in another copy never fires.
    """
    from llama_cpp._ctypes_extensions import load_shared_library

    lib_dir = llama_cpp.llama_cpp._base_path
    for soname in (f"lib{name}.so.0", f"lib{name}.0.dylib"):
        if (lib_dir / soname).is_file():
            return ctypes.CDLL(str(lib_dir / soname))
    return load_shared_library(name, lib_dir)


def gpu_offload_supported() -> bool:
    """True when llama.cpp has a GPU of this machine to offload to (CUDA, Metal, ...).

    ``llama_supports_gpu_offload()`` alone is not that: it is also true for every build
    with the RPC backend (setup.sh's default), whose devices are other machines' workers,
    so a CPU-only machine would take the GPU profiles. The devices themselves say.
    """
    if not llama_cpp.llama_supports_gpu_offload():
        return False
    return bool(local_accelerators())


@functools.cache
def ggml_libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml (the registry) and libggml-base (devices, the abort callback), the very
    libraries llama-cpp-python loaded, with the signatures used here (from ggml-backend.h)."""
    ggml, base = ggml_library("ggml"), ggml_library("ggml-base")
    vp, sz, s = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
    for lib, name, args, res in (
            (ggml, "ggml_backend_reg_by_name", [s], vp),
            (ggml, "ggml_backend_dev_count", [], sz),
            (ggml, "ggml_backend_dev_get", [sz], vp),
            (base, "ggml_backend_reg_get_proc_address", [vp, s], vp),
            (base, "ggml_backend_reg_dev_count", [vp], sz),
            (base, "ggml_backend_reg_dev_get", [vp, sz], vp),
            (base, "ggml_backend_dev_type", [vp], ctypes.c_int),
            (base, "ggml_backend_dev_name", [vp], s),
            (base, "ggml_set_abort_callback", [ABORT_CALLBACK], vp)):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return ggml, base



def local_accelerators() -> list[int]:
    """This machine's GPUs (ggml devices of type GPU or IGPU), which llama.cpp's
    ``--rpc`` keeps beside the workers."""
    ggml, base = ggml_libs()
    devs = (ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count()))
    return [d for d in devs if _GGML_DEVICE_TYPES.get(base.ggml_backend_dev_type(d))
            in ("GPU", "IGPU")]


def usable_cores() -> int:
    """How many CPUs this process may run on: its affinity mask where the OS has one (a
    container's cpuset, `taskset`, a test worker pinned to its share), else every CPU.
    llama.cpp's threads spin at each barrier, so one thread more than the CPUs it may
    use stalls every op until the scheduler comes back to it."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows: no affinity masks
        return os.cpu_count() or 1


@functools.cache
def cpu_facts() -> tuple[str, tuple[str, ...]]:
    """This machine's CPU: its model name and its SIMD flags (AVX2, AVX-512, AMX), sorted.

    Read from /proc/cpuinfo; ``lscpu`` where that names no model (ARM's cpuinfo has no
    "model name" line); ``platform`` elsewhere (macOS), with no flags.
    """
    text = ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        pass
    if not re.search(r"^model name", text, re.M):
        try:
            text += subprocess.run(["lscpu"], capture_output=True, text=True,
                                   timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            pass
    name = re.search(r"^(?:model name|Model name)\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^(?:flags|Flags)\s*:\s*(.+)$", text, re.M)
    simd = sorted({f for f in (flags.group(1).split() if flags else ()) if _SIMD_FLAGS.match(f)})
    model = name.group(1).strip() if name else platform.processor() or platform.machine()
    return model or "unknown CPU", tuple(simd)


def on_passing_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a thread that ends when it returns: for llama.cpp computations a
    long-lived process does once (calibrations, probes) on a thread other than the one
    that will compute from then on.

    Why: with OpenMP (llama-cpp-python's Linux builds), every thread that runs a graph
    keeps a pool of worker threads for the rest of its life, and libgomp counts them all.
    Once they outnumber the cores it stops spinning at barriers (its "throttled" spin of
    100 turns), so at each of the ~450 barriers of a graph (ggml's ``ggml_barrier`` is an
    ``omp barrier``) a thread that arrives first sleeps and must be woken. A server that
    calibrated on its main thread and decodes on its model thread paid that on every
    round: 2-3 ms of a 24 ms round of four SmolLM2 rows on a 2-core Xeon. A passing
    thread's pool is freed when it ends (libgomp's thread destructor), so the thread that
    decodes is left with the only pool. Exceptions propagate to the caller.
    """
    out: list = []

    def run() -> None:
        try:
            out.append((True, fn()))
        except BaseException as e:  # handed to the caller's thread below
            out.append((False, e))

    t = threading.Thread(target=run, name="bridge-once")
    t.start()
    t.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value
