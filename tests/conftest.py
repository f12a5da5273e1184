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


@pytest.fixture(scope="session")
def smollm2():
    pytest.importorskip("transformers")
    from decoquant.integrations.models import load_model

    try:
        return load_model("smollm2-135m")
    except ValueError as err:  # package not installed
        pytest.skip(str(err))


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
    pytest.importorskip("transformers")
    from decoquant.integrations.models import load_model

    try:
        return load_model("gemma3-270m")
    except ValueError as err:
        pytest.skip(str(err))
