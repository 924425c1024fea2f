#!/usr/bin/env bash
# Create .venv and install layerstream into it; `scripts/install.sh dev` adds the test tools.
#
# torch: without an NVIDIA GPU, take a CPU-only build (a plain `pip install torch` pulls
# several GB of CUDA libraries). `torch==X+cpu` resolves where pip is configured with a CPU
# wheel (find-links or the PyTorch CPU index); otherwise try the PyTorch CPU index, then
# fall back to the default build. Set LAYERSTREAM_TORCH="torch==..." to choose yourself.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CPU_TORCH_VERSION=${CPU_TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install --quiet --upgrade pip

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if [ -n "${LAYERSTREAM_TORCH:-}" ]; then
        pip install --quiet "$LAYERSTREAM_TORCH"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        pip install --quiet torch
    elif pip install --quiet "torch==${CPU_TORCH_VERSION}+cpu" 2>/dev/null; then
        :
    elif pip install --quiet --index-url https://download.pytorch.org/whl/cpu torch 2>/dev/null; then
        :
    else
        echo "install.sh: no CPU-only torch build found; installing the default torch" >&2
        pip install --quiet torch
    fi
fi

if [ "${1:-}" = "dev" ]; then
    pip install --quiet -e ".[dev]"
else
    pip install --quiet -e .
fi
"$VENV/bin/python" -c "import torch, transformers, mlserver; print(f'torch {torch.__version__}, transformers {transformers.__version__}, mlserver {mlserver.__version__}')"
