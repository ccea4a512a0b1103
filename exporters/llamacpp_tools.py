"""llama.cpp's own programs (``llama-server``, ``ggml-rpc-server``), built from the very sources
that bridge's llama-cpp-python bundles.

The pinned llama-cpp-python sdist (``scripts/constraints.txt``) vendors llama.cpp. Building a
tool from it, rather than taking whatever llama.cpp is installed, matters twice: a benchmark
then compares the same kernels, and an RPC worker then speaks the same RPC protocol version
as bridge's client (ggml-rpc refuses any other major version). Each tool gets its own build
folder under ``~/.cache/bridge/llama.cpp-<version>/``, so building one never reconfigures
another, and a finished build is reused.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "bridge"

# flags every build shares: the host's own SIMD (the wheel pip builds is native too), no
# tests, examples, web UI or TLS
_COMMON = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
           "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_OPENSSL=OFF",
           "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF")


@dataclass(frozen=True)
class Tool:
    """One cmake target of llama.cpp and the flags it needs beyond ``_COMMON``.

    Args:
        target: the cmake target, which is also the binary's name under ``build-*/bin``.
        flags: extra configure flags.
        minutes: a rough build time on 2 cores, for the log line users wait on.
    """

    target: str
    flags: tuple[str, ...] = ()
    minutes: int = 10


LLAMA_SERVER = Tool("llama-server", ("-DLLAMA_BUILD_SERVER=ON",), minutes=10)
# the RPC worker links ggml only (ggml-base, ggml-cpu, ggml-rpc), no libllama
RPC_SERVER = Tool("ggml-rpc-server", ("-DGGML_RPC=ON", "-DLLAMA_BUILD_SERVER=OFF"), minutes=4)


def pinned_version() -> str:
    """The llama-cpp-python version setup installs (``scripts/constraints.txt``)."""
    text = (ROOT / "scripts" / "constraints.txt").read_text()
    m = re.search(r"^llama-cpp-python==(\S+)", text, re.M)
    if not m:
        raise ValueError("scripts/constraints.txt pins no llama-cpp-python version")
    return m.group(1)


def source_dir(version: str) -> Path:
    """Where the sdist's vendored llama.cpp is (or will be) unpacked."""
    return CACHE / f"llama.cpp-{version}" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def fetch_sources(version: str) -> Path:
    """The vendored llama.cpp of llama-cpp-python ``version``, downloaded (with pip, from the
    configured index) and unpacked once."""
    root = CACHE / f"llama.cpp-{version}"
    src = source_dir(version)
    if src.is_dir():
        return src
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        log.info("downloading the llama-cpp-python %s sdist into %s", version, root)
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}",
                        "--no-binary", ":all:", "--no-deps", "-d", str(root)], check=True,
                       timeout=1800)
    with tarfile.open(sdist) as tar:
        tar.extractall(root, filter="data")
    return src


def build_tool(tool: Tool, version: str | None = None, skip_build: bool = False,
               jobs: int = 2) -> tuple[Path, dict]:
    """The cached binary of ``tool``, built first if absent, and how it was built.

    Raises:
        FileNotFoundError: ``skip_build`` and no cached build, or cmake / a compiler missing.
        RuntimeError: the build failed (the message names its log).
    """
    version = version or pinned_version()
    build_dir = f"build-{tool.target}"
    root = CACHE / f"llama.cpp-{version}"
    binary = source_dir(version) / build_dir / "bin" / tool.target
    info_file = root / f"build-info-{tool.target}.json"
    configure = ["cmake", "-B", build_dir, *_COMMON, *tool.flags]
    build = ["cmake", "--build", build_dir, "--target", tool.target, f"-j{jobs}"]
    info = {"configure": shlex.join(configure), "build": shlex.join(build),
            "src": str(source_dir(version))}
    if info_file.is_file():
        info |= json.loads(info_file.read_text())
    if binary.is_file():
        log.debug("reusing the cached build: %s", binary)
        return binary, info
    if skip_build:
        raise FileNotFoundError(f"no build of {tool.target} at {binary} (and building was "
                                "not allowed)")
    missing = [t for t in ("cmake",) if not shutil.which(t)]
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler (g++ or clang++)")
    if missing:
        raise FileNotFoundError(f"building {tool.target} needs {' and '.join(missing)}; "
                                "install them (e.g. apt-get install cmake g++)")
    src = fetch_sources(version)
    log.info("building %s in %s (about %d minutes on 2 cores, once)", tool.target,
             src / build_dir, tool.minutes)
    t0 = time.perf_counter()
    log_path = root / f"build-{tool.target}.log"
    with open(log_path, "w") as out:
        for cmd in (configure, build):
            # nice: the build shares the machine with whatever the user is running
            rc = subprocess.run(["nice", "-n", "10", *cmd], cwd=src, stdout=out,
                                stderr=subprocess.STDOUT).returncode
            if rc:
                raise RuntimeError(f"`{shlex.join(cmd)}` failed ({rc}); see {log_path}")
    info["build_seconds"] = round(time.perf_counter() - t0, 1)
    info_file.write_text(json.dumps(info, indent=1))
    return binary, info


def main(argv: list[str] | None = None) -> int:
    """``python -m exporters.llamacpp_tools TARGET``: build (or find) a tool, print its path."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tools = {t.target: t for t in (LLAMA_SERVER, RPC_SERVER)}
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in tools:
        print(f"usage: python -m exporters.llamacpp_tools {{{','.join(tools)}}}",
              file=sys.stderr)
        return 2
    try:
        binary, _ = build_tool(tools[args[0]])
    except (FileNotFoundError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(binary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
