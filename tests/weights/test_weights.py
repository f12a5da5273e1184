"""Weight quantization: codec error per bit width, the packed QuantLinear, quantize_weights on real models."""

import json

import pytest
import torch
import torch.nn.functional as F

from decoquant.weights import QuantLinear, decode_weight, encode_weight, quantize_weights, weight_memory

# max relative Frobenius error of a reconstructed weight with outlier input channels, per bit width
# (measured: rtn 0.021/0.30/0.40/0.48, decoquant 0.011/0.18/0.31/0.47 at 8/4/3/2 bits)
MAX_REL_ERROR = {"rtn": {8: 0.025, 4: 0.33, 3: 0.45, 2: 0.55}, "decoquant": {8: 0.012, 4: 0.2, 3: 0.35, 2: 0.5}}


def outlier_weight(out_f=96, in_f=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    w[:, 5] *= 20  # input channels with large weights
    w[:, 77] *= 12
    return w


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("method", ["rtn", "decoquant"])
def test_codec_error_per_bit_width(method, bits):
    w = outlier_weight()
    q, t_s = encode_weight(w, method, bits)
    rel = float((decode_weight(q, t_s) - w).norm() / w.norm())
    assert 0 < rel < MAX_REL_ERROR[method][bits]
    assert (t_s is None) == (method == "rtn") and q.scale.shape == (w.shape[0], 1)


@pytest.mark.parametrize("bits", [4, 3])
def test_decoquant_beats_per_channel_rtn_on_outlier_channels(bits):
    w = outlier_weight(seed=3)
    err = {m: float((decode_weight(*encode_weight(w, m, bits)) - w).norm() / w.norm()) for m in ("rtn", "decoquant")}
    assert err["decoquant"] < 0.8 * err["rtn"]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["rtn", "decoquant"])
def test_quant_linear_matches_reference(method, symmetric):
    lin = torch.nn.Linear(128, 72, bias=True)
    with torch.no_grad():
        lin.weight.copy_(outlier_weight(72, 128, seed=1))
    ql = QuantLinear(lin, method, 4, symmetric=symmetric)
    q, t_s = encode_weight(lin.weight.detach(), method, 4, symmetric=symmetric)
    x = torch.randn(3, 7, 128)[:, ::2]  # non-contiguous input
    torch.testing.assert_close(ql(x), F.linear(x, decode_weight(q, t_s), lin.bias))
    assert ql.codes.dtype == torch.uint8 and ql.codes.shape == (72, 64)  # packed: two 4-bit codes a byte
    dense = 2 * 72 * 128
    assert 0.25 < ql.nbytes / dense < 0.27 + (0.02 if method == "decoquant" else 0) + (0.01 if not symmetric else 0)


@pytest.mark.slow
def test_quantize_weights_on_smollm2():
    from decoquant.integrations.models import load_model

    model, tok = load_model("smollm2-135m")
    ids = tok("The quick brown fox jumps over the lazy dog because it wanted to see", return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(input_ids=ids).logits
    for pattern, message in ((["o_projection"], "matches no Linear module"), (["lm_head"], "tie_word_embeddings")):
        with pytest.raises(ValueError, match=message):
            quantize_weights(model, "rtn", 8, modules=pattern)
    with pytest.raises(ValueError, match="cannot be factorized"):
        quantize_weights(model, "decoquant", 4, modules=["k_proj"], group_size=7)
    with pytest.raises(ValueError, match="allowed values"):
        quantize_weights(model, "gptq", 4)
    mem = quantize_weights(model, "decoquant", 8)
    assert mem["quantized_modules"] == 30 * 7 and 8.0 < mem["bits_per_weight"] < 8.2
    with torch.no_grad():
        q8 = model(input_ids=ids).logits
    assert float((q8 - base).norm() / base.norm()) < 0.05
    assert (q8[0, -1].argmax() == base[0, -1].argmax())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_weights(model, "rtn", 4)
    assert weight_memory(model)["ratio"] < 0.52


@pytest.mark.slow
def test_quantize_weights_on_gemma3(gemma3):
    import copy

    model, tok = gemma3
    model = copy.deepcopy(model)
    ids = tok("Paris is the capital of", return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(input_ids=ids).logits
        quantize_weights(model, "decoquant", 8, modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        q8 = model(input_ids=ids).logits
    assert float((q8 - base).norm() / base.norm()) < 0.05


@pytest.mark.slow
def test_weights_command_labels_quantizer_variants(tmp_path):
    pytest.importorskip("transformers")
    from decoquant.cli import main

    from conftest import real_model

    real_model("smollm2-135m")
    assert main(["weights", "--model", "smollm2-135m", "--methods", "rtn,decoquant-sym", "--bits", "8",
                 "--window", "256", "--chunk", "256", "--max-windows", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "weights.json").read_text())["rows"]
    assert [r["weights"] for r in rows] == ["fp16", "rtn-sym-8b", "decoquant-sym-8b"]
    assert all(abs(r["delta_pct"]) < 5 for r in rows)
    with pytest.raises(SystemExit, match="'gptq'.*rtn-asym"):
        main(["weights", "--methods", "gptq"])
