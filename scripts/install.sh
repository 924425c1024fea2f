#!/usr/bin/env bash
# Create .venv and install layerstream with its server into it (the package's `server` extra:
# MLServer); `scripts/install.sh dev` adds the test tools. The library and the chunker alone
# are `pip install .` (docs/library.md).
#
# torch: without an NVIDIA GPU, take a CPU-only build (a plain `pip install torch` pulls
# several GB of CUDA libraries). `torch==X+cpu` resolves where pip is configured with a CPU
# wheel (find-links or the PyTorch CPU index); otherwise try the PyTorch CPU index, then
# fall back to the default build. Set LAYERSTREAM_TORCH="torch==..." to choose yourself.
#
# A re-run takes a fraction of a second: the install is editable (code changes need no
# reinstall), so pip runs again only when pyproject.toml changed or `dev` asks for more
# than was installed. $VENV/.layerstream-install records both; delete it to force a reinstall.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CPU_TORCH_VERSION=${CPU_TORCH_VERSION:-2.13.0}
MODE=${1:-plain}
case "$MODE" in
    plain | dev) ;;
    *)
        echo "usage: scripts/install.sh [dev]" >&2
        exit 2
        ;;
esac
STAMP="$VENV/.layerstream-install"

pyproject_hash() {
    "$VENV/bin/python" -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())'
}

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ]; then
    # the stamp reads "<sha256 of pyproject.toml> <plain|dev>"; a dev install covers a plain one
    read -r stamp_hash stamp_mode <"$STAMP" || true
    if [ "$stamp_hash" = "$(pyproject_hash)" ] && { [ "$MODE" = plain ] || [ "$stamp_mode" = dev ]; } &&
        "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("layerstream")' 2>/dev/null; then
        echo "install.sh: $VENV is up to date (a $stamp_mode install of this pyproject.toml)"
        exit 0
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP" # written again only once this install has succeeded
hash=$(pyproject_hash)
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

if [ "$MODE" = dev ]; then
    pip install --quiet -e ".[server,dev]"
else
    pip install --quiet -e ".[server]"
fi
"$VENV/bin/python" -c "import torch, transformers, mlserver; print(f'torch {torch.__version__}, transformers {transformers.__version__}, mlserver {mlserver.__version__}')"
echo "$hash $MODE" >"$STAMP"
