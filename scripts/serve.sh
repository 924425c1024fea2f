#!/usr/bin/env bash
# The quick start: install, chunk a demo model into model-repo/, serve it with mlserver.
#
# The demo is a random-init Llama (offline; no Hub needed) served at a 25% memory budget so
# that its blocks really stream. Pass a Hub id or a local checkpoint directory to serve that
# instead:  scripts/serve.sh Qwen/Qwen2.5-0.5B
set -euo pipefail
cd "$(dirname "$0")/.."

SOURCE=${1:-}
if [ -n "$SOURCE" ]; then
    # a Hub id or a folder names the model unless NAME says otherwise: Qwen/Qwen2.5-0.5B -> qwen2.5-0.5b
    DEFAULT_NAME=$(basename "$SOURCE" | tr '[:upper:]' '[:lower:]')
else
    DEFAULT_NAME=demo
fi
NAME=${NAME:-$DEFAULT_NAME}
BUDGET=${BUDGET:-25%}

scripts/install.sh
if [ -f "model-repo/$NAME/chunks/manifest.json" ]; then
    echo "model-repo/$NAME is chunked already: serving it (remove it, or set NAME=..., to chunk again)"
else
    # the quick start streams: a quarter of the weights held in memory, the rest read per token
    if [ -n "$SOURCE" ]; then
        .venv/bin/layerstream chunk "$SOURCE" "model-repo/$NAME/chunks" --name "$NAME" \
            --memory-budget "$BUDGET" --force
    else
        .venv/bin/layerstream chunk --random-init llama-demo "model-repo/$NAME/chunks" \
            --name "$NAME" --memory-budget "$BUDGET" --force
    fi
fi
HTTP_PORT=${MLSERVER_HTTP_PORT:-8080}
GRPC_PORT=${MLSERVER_GRPC_PORT:-8081}
echo "serving model-repo/ (REST :$HTTP_PORT, gRPC :$GRPC_PORT, metrics :${MLSERVER_METRICS_PORT:-8082}); try:"
echo "  .venv/bin/layerstream-client generate --url http://127.0.0.1:$HTTP_PORT --model $NAME \"Once upon a time\""
echo "  .venv/bin/layerstream-client generate --grpc 127.0.0.1:$GRPC_PORT --model $NAME \"Once upon a time\""
exec .venv/bin/mlserver start model-repo
