#!/usr/bin/env bash
# Creates benchmarks/.venv-peers: the peer systems (accelerate disk offload, AirLLM) that
# benchmarks/peers.py probes, and llama.cpp (benchmarks/llamacpp.py), kept out of
# layerstream's own environment and pyproject.toml.
# Idempotent: re-running reuses the venv and leaves pinned packages as they are.
#
#     bash benchmarks/setup_peers.sh          # then: benchmarks/.venv-peers/bin/python ...
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-peers"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet)

# The same torch/transformers/safetensors as layerstream's .venv, so the runs compare like with like.
"${PIP[@]}" "torch==2.13.0+cpu" "transformers==5.23.0" "safetensors==0.8.0" "tokenizers==0.23.3"
"${PIP[@]}" "accelerate==1.15.0" "airllm==4.0.0"
# llama.cpp, built here from llama-cpp-python's source distribution (its vendored llama.cpp,
# CPU only), and that distribution kept for llama.cpp's HF-to-GGUF converter
# (benchmarks/llamacpp.py). The build compiles llama.cpp: minutes on a few cores.
LLAMA_CPP_PYTHON=0.3.36
SRC="$VENV/src"
if [ ! -d "$SRC/llama_cpp_python-$LLAMA_CPP_PYTHON" ]; then
    mkdir -p "$SRC"
    "$VENV/bin/python" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$SRC"
    tar xzf "$SRC/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$SRC"
fi
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "${PIP[@]}" "$SRC/llama_cpp_python-$LLAMA_CPP_PYTHON"
fi
"${PIP[@]}" numpy sentencepiece  # the converter's own needs (its gguf package is vendored)
# Not layerstream itself: even layerstream.chunker.presets imports mlserver (via layerstream.errors), which
# this venv leaves out. Make the test checkpoint with layerstream's own venv, e.g.
#   .venv/bin/python -c 'from layerstream.chunker.presets import write_random_checkpoint as w; \
#       w("llama-300m", "/tmp/llama300-source")'

"$VENV/bin/python" - <<'PY'
import accelerate, airllm, llama_cpp, torch, transformers  # noqa: F401
from importlib.metadata import version
packages = ("torch", "transformers", "accelerate", "airllm", "llama-cpp-python")
print("peers venv:", {p: version(p) for p in packages})
PY
