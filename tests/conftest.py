import importlib
import os

import pytest
import torch

# Triton kernels run through Triton's interpreter where there is no GPU (must be set before triton
# is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def outlier_kv(batch=2, heads=4, tokens=256, head_dim=64, seed=0, dtype=torch.float32):
    """Gaussian KV with a few injected outlier channels (as real keys have)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, tokens, head_dim, generator=gen)
    x[..., 3] *= 25.0
    x[..., head_dim // 2 + 1] += 12.0
    x[:, 0, :, 7] *= 8.0
    return x.to(dtype)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every tensor made by torch.empty / empty_like during the test starts poisoned: NaN for floats, the
    largest value for integers. An output element a kernel does not write then fails the comparison with
    the reference instead of passing with whatever the memory held."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).max)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


if os.environ.get("CI"):  # under CI a missing dependency fails the run: a test that skips cannot fail
    def _import_or_fail(modname, *args, **kwargs):
        try:
            return importlib.import_module(modname)
        except ImportError as err:
            pytest.fail(f"{modname} is needed under CI and failed to import: {err}")

    pytest.importorskip = _import_or_fail


def real_model(name: str):
    """A built-in real model; where it cannot load, skip, except under CI (`CI` set), where a test that cannot
    run must fail the run instead of passing green."""
    try:
        from decoquant.integrations.models import load_model

        return load_model(name)
    except Exception as err:  # package missing, or a transformers release that cannot load it
        if os.environ.get("CI"):
            pytest.fail(f"real model {name!r} failed to load under CI: {type(err).__name__}: {err}")
        pytest.skip(f"{name}: {err}")


@pytest.fixture(scope="session")
def smollm2():
    return real_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_kv(smollm2):
    from decoquant.eval.capture import capture_kv
    from decoquant.eval.text import load_text

    model, tok = smollm2
    ids = tok(load_text("gensim-wiki")[:20000], return_tensors="pt").input_ids[:, :1024]
    assert ids.shape[1] == 1024
    return capture_kv(model, ids)


@pytest.fixture(scope="session")
def gemma3():
    return real_model("gemma3-270m")


def tiny_llama(kv_heads: int, device="cpu", dtype=torch.float32, layers: int = 2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=512,
                                   max_position_embeddings=1024)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # larger weights than the default init: logits with clear winners
        for p in model.parameters():
            p.mul_(8.0 if p.dim() == 2 else 1.0)
    return model
