"""Evaluation harness: data loaders, the projection protocol, LAMBADA scoring, ICL scoring, tables."""

import json

import pytest
import torch
import torch.nn.functional as F

from decoquant import DecoQuantConfig
from decoquant.api import fake_quantize
from decoquant.cli import main
from decoquant.eval.data import ICL_TASKS, icl_split, icl_task, lambada_passages

LAMBADA_LINES = [
    "she opened the door and saw her old friend standing in the rain , soaked to the bone . "
    "come in , she said to her friend",
    "the cat sat on the mat and looked at the dog . the dog barked at the cat",
    "he wanted to buy a new car but he had no money",
]


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "lambada").mkdir()
    (tmp_path / "lambada" / "lambada_development_plain_text.txt").write_text("\n".join(LAMBADA_LINES) + "\n")
    with (tmp_path / "lambada" / "lambada_test.jsonl").open("w") as f:
        for line in LAMBADA_LINES:
            f.write(json.dumps({"text": line.replace(" ,", ",").replace(" .", ".")}) + "\n")
    (tmp_path / "rte").mkdir()
    rows = [{"premise": f"The box holds {n} red balls.", "hypothesis": f"The box holds {n + k} balls.",
             "label": int(k != 0), "idx": i}
            for i, (n, k) in enumerate([(3, 0), (5, 2), (7, 0), (2, 1), (4, 0), (6, 3)])]
    for split in ("train", "validation"):
        (tmp_path / "rte" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


# ------------------------------------------------------------------------------------- data
def test_data_loaders_check_the_layout(data_dir, tmp_path_factory):
    assert lambada_passages(data_dir, "paper") == LAMBADA_LINES
    assert len(lambada_passages(data_dir, "openai")) == 3
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ValueError, match="lambada/lambada_development_plain_text.txt"):
        lambada_passages(empty, "paper")
    with pytest.raises(ValueError, match="allowed values"):
        lambada_passages(data_dir, "cloze")
    with pytest.raises(ValueError, match="needs --data-dir"):
        lambada_passages(None, "paper")
    with pytest.raises(ValueError, match="unknown ICL dataset 'cola'"):
        icl_task("cola")
    bad = data_dir / "rte" / "validation.jsonl"
    bad.write_text(json.dumps({"premise": "x", "label": 0}) + "\n")
    with pytest.raises(ValueError, match=r"lacks fields \['hypothesis'\]"):
        icl_split(data_dir, ICL_TASKS["rte"], "test")
    bad.write_text(json.dumps({"premise": "x", "hypothesis": "y", "label": 7}) + "\n")
    with pytest.raises(ValueError, match="expected 0..1"):
        icl_split(data_dir, ICL_TASKS["rte"], "test")
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        icl_split(data_dir, ICL_TASKS["rte"], "test")


# ------------------------------------------------------------------------------- projection
def test_projection_output_is_quantized_per_row():
    from decoquant.eval.projection import quantize_projection_output

    gen = torch.Generator().manual_seed(0)
    y = torch.randn(3, 40, 2 * 32, generator=gen)
    y[..., 5] *= 30
    cfg = DecoQuantConfig(method="decoquant", bits=4, preset="paper")
    out = quantize_projection_output(y, cfg, "key", head_dim=32)
    ref = fake_quantize(y.view(3, 40, 2, 32).transpose(1, 2), cfg, "key").transpose(1, 2).reshape(3, 40, 64)
    torch.testing.assert_close(out, ref)
    alone = quantize_projection_output(y[1:2], cfg, "key", head_dim=32)  # rows never share a scale or a T_S
    torch.testing.assert_close(out[1:2], alone)
    rel = float((out - y).norm() / y.norm())
    assert 0 < rel < 0.2


@pytest.mark.slow
def test_projection_hooks_change_outputs_and_restore_weights(smollm2):
    from decoquant.eval.projection import kv_projections, quantized_projections

    model, tok = smollm2
    ids = tok(LAMBADA_LINES[0], return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(input_ids=ids).logits
        before = {n: m.weight.clone() for n, m, _ in kv_projections(model)[:2]}
        with quantized_projections(model, None):
            assert torch.equal(model(input_ids=ids).logits, base)
        with quantized_projections(model, DecoQuantConfig(method="rtn", bits=8), weight_bits=8):
            q8 = model(input_ids=ids).logits
            name, module, _ = kv_projections(model)[0]
            assert not torch.equal(module.weight, before[name])
        with quantized_projections(model, DecoQuantConfig(method="rtn", bits=2)):
            q2 = model(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, base)  # hooks removed
    for name, module, _ in kv_projections(model)[:2]:
        assert torch.equal(module.weight, before[name])
    err8 = float((q8 - base).norm() / base.norm())
    err2 = float((q2 - base).norm() / base.norm())
    assert 0 < err8 < 0.05 < err2


@pytest.mark.slow
def test_smoothquant_scales_balance_and_reduce_error(smollm2):
    """Calibrated channel divisors: positive, tied across rotary pairs for keys, and SmoothQuant's
    per-token RTN of y / s beats plain per-token RTN on a key projection with outlier channels."""
    from decoquant.eval.projection import kv_projections, quantize_projection_output
    from decoquant.eval.smoothquant import smoothing_scales
    from decoquant.eval.text import load_text

    model, tok = smollm2
    ids = tok(load_text("gensim-wiki")[:8000], return_tensors="pt").input_ids[:, :1024]
    scales = smoothing_scales(model, ids, alpha=0.5, window=256, max_windows=2)
    projections = kv_projections(model)
    assert set(scales) == {n for n, _, _ in projections}
    name, module, _ = projections[0]  # layer 0 k_proj
    s = scales[name]
    assert s.shape == (module.out_features,) and bool((s > 0).all())
    pairs = s.reshape(-1, 2, 32)
    torch.testing.assert_close(pairs[:, 0], pairs[:, 1])
    with torch.no_grad():
        y = module(model.model.embed_tokens(ids[:, 256:512]))  # held-out tokens
    cfg = DecoQuantConfig(method="rtn", bits=4)
    plain = quantize_projection_output(y, cfg, "key", 64)
    smooth = quantize_projection_output(y, cfg, "key", 64, s)
    assert float((smooth - y).norm()) < float((plain - y).norm())
    with pytest.raises(ValueError, match="alpha=1.5"):
        smoothing_scales(model, ids, alpha=1.5)


# ---------------------------------------------------------------------------------- LAMBADA
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["paper", "openai"])
def test_lambada_accuracy_matches_one_by_one_scoring(smollm2, data_dir, variant):
    """Batched-by-length scoring with logits_to_keep equals scoring each passage alone."""
    from decoquant.eval.lambada import lambada, lambada_items

    model, tok = smollm2
    passages = lambada_passages(data_dir, variant) * 2  # equal lengths -> batches of 2
    items = lambada_items(tok, passages, variant)
    expected = []
    with torch.no_grad():
        for ids, n in items:
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            pred = logits[:-1].argmax(-1)
            expected.append(bool(torch.equal(pred[-n:], torch.tensor(ids[-n:]))))
    if variant == "openai":
        assert tok.decode(items[0][0][-items[0][1]:]) == " friend"
    (res,) = lambada(model, tok, data_dir, variant, [None], batch_size=4)
    assert res.total == 3 and res.correct == sum(expected[:3])
    from decoquant.eval.lambada import lambada_accuracy

    assert lambada_accuracy(model, items, None, batch_size=2).correct == sum(expected)


# -------------------------------------------------------------------------------------- ICL
def _full_forward_probs(model, tok, prefix, query, options):
    """Option probabilities from one uncached forward per option (the reference for the scorer)."""
    scores = []
    for opt in options:
        p_ids = tok(prefix).input_ids if prefix else []
        q_ids = tok(query, add_special_tokens=not prefix).input_ids
        ids = torch.tensor([p_ids + q_ids + opt])
        logp = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        start = len(p_ids) + len(q_ids)
        scores.append(torch.stack([logp[start - 1 + i, t] for i, t in enumerate(opt)]).mean())
    return torch.softmax(torch.stack(scores), 0)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_icl_scorer_matches_full_forward_and_rolls_back(request, fixture):
    """Exact demonstrations: the cached scorer (forwards cropped back to the prefix) gives the
    probabilities of a fresh full forward. Gemma-3's sliding window is 512 tokens: one prefix
    overflows it, the other is shorter but the query pushes past it; the crops must restore the
    sliding layers in both."""
    from decoquant.eval.icl import _Scorer, demonstration_prompt

    model, tok = request.getfixturevalue(fixture)
    task = ICL_TASKS["ag_news"]
    options = [tok(" " + o, add_special_tokens=False).input_ids for o in task.options]
    assert any(len(o) > 1 for o in options)  # multi-token options exercise the crop
    for repeats in ((64, 55) if fixture == "gemma3" else (3,)):  # Gemma-3: ~540 and ~466 tokens
        demos = [{"text": "Stocks rose on Monday as markets rallied. " * repeats, "label": 2},
                 {"text": "The team won the final in extra time.", "label": 1}]
        prefix = demonstration_prompt(task, demos)
        scorer = _Scorer(model, tok, prefix, None)
        with torch.no_grad():
            for text in ("Oil prices fell sharply. " * 12, "A new phone was released.", "Rain in Spain."):
                query = task.prompt({"text": text})
                got = scorer.option_probs(query, options)
                torch.testing.assert_close(got, _full_forward_probs(model, tok, prefix, query, options),
                                           atol=2e-4, rtol=1e-3)
        assert scorer.cache.get_seq_length() == scorer.prefix_len


@pytest.mark.slow
def test_icl_compressed_demonstrations(smollm2, data_dir):
    from decoquant.eval.icl import icl_accuracy

    model, tok = smollm2
    cfgs = [None, DecoQuantConfig(method="decoquant", bits=4, preset="paper"), DecoQuantConfig(method="rtn", bits=2)]
    res = icl_accuracy(model, tok, data_dir, ICL_TASKS["rte"], 2, cfgs, seeds=(0, 1), limit=4)
    assert [r.label for r in res] == ["fp16", "decoquant-paper-4b", "rtn-2b"]
    assert res[0].demo_bits == 16.0 and 4.0 < res[1].demo_bits < 4.6 and 2.0 < res[2].demo_bits < 2.3
    for r in res:
        assert r.total == 4 and len(r.per_seed) == 2 and 0 <= r.accuracy <= 1 and r.demo_tokens > 20


def test_compress_cache_replaces_layers_with_decoded_values():
    from transformers import DynamicCache

    from decoquant.eval.icl import compress_cache_

    gen = torch.Generator().manual_seed(0)
    cache = DynamicCache()
    k, v = torch.randn(1, 2, 50, 32, generator=gen), torch.randn(1, 2, 50, 32, generator=gen)
    cache.update(k.clone(), v.clone(), 0)
    cfg = DecoQuantConfig(method="rtn", bits=4)
    nbytes, numel = compress_cache_(cache, cfg)
    assert numel == 2 * k.numel() and 4.0 < 8 * nbytes / numel < 4.5
    torch.testing.assert_close(cache.layers[0].keys, fake_quantize(k, cfg, "key"))
    torch.testing.assert_close(cache.layers[0].values, fake_quantize(v, cfg, "value"))


# ---------------------------------------------------------------------------- CLI and report
def test_eval_task_errors_are_one_line(capsys, tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(SystemExit, match="not allowed"):
        main(["eval", "--tasks", "mmlu"])
    assert main(["eval", "--tasks", "lambada"]) == 2
    assert "need --data-dir" in capsys.readouterr().err
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text("text " * 100)
    assert main(["eval", "--tasks", "icl", "--data-dir", str(tmp_path), "--icl-datasets", "rte"]) == 2
    assert "rte/train.jsonl" in capsys.readouterr().err


def test_tables_have_the_paper_shapes():
    from decoquant.eval.icl import IclResult
    from decoquant.eval.lambada import AccuracyResult
    from decoquant.eval.report import icl_table, lambada_table

    lam = lambada_table([AccuracyResult("lambada-paper", "fp16", None, 0.5, 5, 10),
                         AccuracyResult("lambada-paper", "decoquant-paper-channel-4b", 4, 0.4, 4, 10)])
    assert "| 16-16 | FP16 | 50.0 | 5 / 10 |" in lam
    assert "| 4-4 | DecoQuant (decoquant-paper-channel-4b) | 40.0 |" in lam
    rows = [IclResult(t, lab, 2, 0, acc, acc - 0.1, 10, 100, bits) for t in ("rte", "mr")
            for lab, acc, bits in (("fp16", 0.6, 16.0), ("rtn-4b", 0.5, 4.08))]
    table = icl_table(rows)
    assert "| shots | #Bits | method | rte | mr | Avg |" in table
    assert "| 2 | 4 | RTN | 50.0 | 50.0 | 50.0 | 40.0 | 4.08 |" in table


def test_range_stats_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from decoquant.eval.analysis import two_site_tensors, value_ranges
    from decoquant.eval.plots import plot_densities, plot_error_vs

    from conftest import outlier_kv

    kv = [(outlier_kv(1, 2, 64, 32, seed=s), outlier_kv(1, 2, 64, 32, seed=s + 9)) for s in range(2)]
    m, t_l, t_s = two_site_tensors(kv[0][0])
    torch.testing.assert_close(t_l @ t_s, m)  # exact two-site MPO
    stats = value_ranges(kv)
    assert len(stats) == 2 * 2 * 3
    key0 = {s.tensor: s for s in stats if s.layer == 0 and s.kind == "key"}
    # the paper's claim on outlier data: T_L is far narrower than the matrix, relative to its bulk
    assert key0["T_L"].absmax_over_iqr < key0["matrix"].absmax_over_iqr
    rows = [{"method": m_, "bits": b, "key_error": 1 / b, "value_error": 2 / b} for m_ in ("a", "b") for b in (2, 4)]
    for path in (plot_densities(m, t_l, t_s, tmp_path / "d.png", "t"),
                 plot_error_vs(rows, "bits", tmp_path / "e.png", "t")):
        assert path.read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("*.tmp.png"))


@pytest.mark.slow
def test_icl_scorer_keeps_no_autograd_graph(smollm2):
    """The scorer runs without autograd: cached K/V must not hold a graph (memory grew without bound)."""
    from decoquant.eval.icl import _Scorer

    model, tok = smollm2
    scorer = _Scorer(model, tok, "Review: good film\nSentiment: positive\n\n", None)
    scorer.option_probs("Review: bad\nSentiment:", [tok(" negative", add_special_tokens=False).input_ids])
    assert not scorer.cache.layers[0].keys.requires_grad
