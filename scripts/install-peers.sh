#!/usr/bin/env bash
# Install the peer routers that benchmarks compare against (vllm-router, sglang-router),
# each into its own virtualenv under .cache/peers/<name> (or $SAGE_LLM_PEERS_DIR/<name>).
# Idempotent: an install that is complete and starts is kept as it is.
#
#   scripts/install-peers.sh                 # all peers
#   scripts/install-peers.sh vllm-router     # just one
#
# PYTHON names the interpreter that has sage-llm installed (default: .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
    echo "error: $PYTHON not found; run 'make install' first or set PYTHON" >&2
    exit 1
fi
exec "$PYTHON" -m sage_llm.bench.peers "$@"
