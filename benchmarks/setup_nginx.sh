#!/usr/bin/env bash
# nginx for benchmarks/remote.py (a static file server with a per-connection rate limit).
set -euo pipefail
if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then
    echo "nginx is installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "run as root (or install nginx yourself)" >&2
    exit 1
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light || \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx
