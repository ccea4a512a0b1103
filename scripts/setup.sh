#!/usr/bin/env bash
# Creates .venv with bridge and its extras (default: export,dev,serve). Idempotent: when nothing
# changed since the last successful run, it checks the venv and exits in seconds.
#
#   BRIDGE_EXTRAS=""        runtime only (no torch): enough for `bridge chat`
#   BRIDGE_EXTRAS=serve     runtime and `bridge serve` (still no torch)
#   BRIDGE_TORCH=...        override the torch requirement (default: CPU build on Linux
#                           without CUDA, pinned to the local wheel torch==2.13.0)
#   BRIDGE_ACCEL=...        cuda | metal | cpu (default: cuda when nvcc and a GPU are present,
#                           metal on macOS, else cpu)
#   BRIDGE_RPC=0|1          0: build llama.cpp without its RPC backend (default: with it);
#                           1: also build ggml-rpc-server, the worker `--rpc` talks to
#   CMAKE_ARGS=...          passed to the llama-cpp-python build; -DGGML_CUDA=on is added for
#                           cuda, Metal is llama.cpp's default on macOS
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
EXTRAS="${BRIDGE_EXTRAS-export,dev,serve}"
VENV=.venv
die() { echo "setup: $*" >&2; exit 1; }

command -v "$PY" >/dev/null 2>&1 || die "no '$PY' on PATH; install Python 3.10 or newer (or set PYTHON=...)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "bridge needs Python 3.10 or newer, '$PY' is $("$PY" -V 2>&1)"

# Which llama.cpp backend to build (BRIDGE_ACCEL=cuda|metal|cpu overrides). CUDA needs both
# the toolkit (nvcc) and a visible GPU: a toolkit alone (as on CPU-only CI images) would
# build a CUDA library that cannot run here.
has_gpu() { { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; } || [ -e /dev/nvidia0 ]; }
accel="${BRIDGE_ACCEL:-}"
if [ -z "$accel" ]; then
  if command -v nvcc >/dev/null 2>&1 && has_gpu; then accel=cuda
  elif [ "$(uname -s)" = Darwin ]; then accel=metal
  else accel=cpu
  fi
fi
# llama.cpp's RPC backend (--rpc HOST:PORT: the target's layers on rpc-server workers) is one
# small source file, so it is built by default; BRIDGE_RPC=0 leaves it out.
if [ "${BRIDGE_RPC:-1}" != 0 ]; then
  case " ${CMAKE_ARGS:-} " in *GGML_RPC*) ;; *) export CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_RPC=ON";; esac
fi
case "$accel" in
  cuda) command -v nvcc >/dev/null 2>&1 || die "BRIDGE_ACCEL=cuda but nvcc is not on PATH; install the CUDA toolkit"
        case " ${CMAKE_ARGS:-} " in *GGML_CUDA*) ;; *) export CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_CUDA=on";; esac ;;
  metal|cpu) ;;
  *) die "BRIDGE_ACCEL must be cuda, metal or cpu, got '$accel'" ;;
esac
if [ -z "${BRIDGE_TORCH:-}" ]; then
  if [ "$accel" = cpu ] && [ "$(uname -s)" = Linux ]; then
    BRIDGE_TORCH="torch==2.13.0"  # CPU build; an unpinned torch pulls GBs of CUDA packages
  else
    BRIDGE_TORCH="torch"
  fi
fi

stamp_file="$VENV/.bridge-setup"
stamp="$(cat pyproject.toml scripts/constraints.txt scripts/setup.sh | cksum) extras=$EXTRAS accel=$accel torch=$BRIDGE_TORCH cmake=${CMAKE_ARGS:-} rpc=${BRIDGE_RPC:-}"
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] \
   && "$VENV/bin/python" -c 'import llama_cpp, bridge' >/dev/null 2>&1; then
  echo "setup: $VENV is up to date ($accel build of llama.cpp)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" 2>/dev/null \
    || die "could not create $VENV; install the venv module (e.g. apt-get install python3-venv)"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install --quiet --upgrade pip >/dev/null 2>&1 || true

# llama-cpp-python compiles llama.cpp from source, which needs a C++ compiler and cmake
# (cmake comes from PyPI when missing).
if ! "$VENV/bin/python" -c 'import llama_cpp' >/dev/null 2>&1; then
  command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 \
    || die "no C++ compiler found; llama-cpp-python builds llama.cpp from source: install one (Debian/Ubuntu: apt-get install build-essential; macOS: xcode-select --install)"
  echo "setup: building llama-cpp-python ($accel; about 10 minutes on 2 cores, cached by pip afterwards)"
fi
llama_flags=()
if [ "$accel" = cuda ]; then
  # pip's wheel cache is keyed by version, not CMAKE_ARGS: never reuse a CPU-only wheel.
  "$VENV/bin/python" -c 'import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())' \
    >/dev/null 2>&1 || llama_flags=(--no-cache-dir --force-reinstall --no-deps)
fi
pip install ${llama_flags[@]+"${llama_flags[@]}"} -c scripts/constraints.txt llama-cpp-python \
  || die "could not install llama-cpp-python; check network access to the package index (PIP_INDEX_URL) and the compiler output above"
if [ "${BRIDGE_RPC:-1}" != 0 ] \
   && ! "$VENV/bin/python" -c 'import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_rpc())' >/dev/null 2>&1; then
  echo "setup: this llama-cpp-python was built without llama.cpp's RPC backend; rebuilding it with -DGGML_RPC=ON"
  pip install --no-cache-dir --force-reinstall --no-deps -c scripts/constraints.txt llama-cpp-python \
    || die "could not rebuild llama-cpp-python with -DGGML_RPC=ON; see the compiler output above (BRIDGE_RPC=0 skips RPC)"
fi

if [[ ",$EXTRAS," == *",export,"* ]]; then
  pip install --quiet "$BRIDGE_TORCH" \
    || die "could not install $BRIDGE_TORCH; check network access to the package index (or set BRIDGE_TORCH=...)"
fi
spec="."
[ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
pip install --quiet -c scripts/constraints.txt -e "$spec" \
  || die "could not install bridge$([ -n "$EXTRAS" ] && echo "[$EXTRAS]"); check network access to the package index and the output above"

"$VENV/bin/python" -c 'import llama_cpp, bridge' || die "the install finished but 'import llama_cpp, bridge' fails; see above"
if [ "${BRIDGE_RPC:-}" = 1 ]; then
  # asked for RPC workers: rpc-server from the same llama.cpp sources, so that client and
  # workers speak one protocol version (cached under ~/.cache/bridge; about 5 minutes once)
  "$VENV/bin/python" -m exporters.llamacpp_tools ggml-rpc-server \
    || die "could not build ggml-rpc-server; see the build log named above"
fi
echo "$stamp" > "$stamp_file"
echo "setup: ready ($accel build of llama.cpp, extras: ${EXTRAS:-none}); activate with: source $VENV/bin/activate"
