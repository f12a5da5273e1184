import json

import pytest

from decoquant.cli import main


def test_bad_method_and_bits_are_one_line_errors(capsys):
    with pytest.raises(SystemExit, match="not allowed"):
        main(["perplexity", "--methods", "gptq"])
    with pytest.raises(SystemExit, match="not allowed"):
        main(["reconstruct", "--bits", "5"])


def test_missing_data_folder_is_a_clear_error(capsys, tmp_path):
    pytest.importorskip("transformers")
    assert main(["eval", "--data-dir", str(tmp_path), "--max-windows", "1"]) == 2
    assert "wikitext2/wiki.test.raw" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_writes_a_report(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "run"
    assert main(["eval", "--methods", "fp16,decoquant,rtn", "--bits", "4", "--window", "512",
                 "--max-windows", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| decoquant-paper-4b |" in printed and "| rtn-4b |" in printed
    data = json.loads((out / "eval.json").read_text())
    assert [r["label"] for r in data["perplexity"]] == ["fp16", "decoquant-paper-4b", "decoquant-channel64-token-4b",
                                                        "rtn-4b"]  # default presets: the paper's and the frontier's
    assert (out / "eval.md").read_text().startswith("# decoquant eval")
    assert not list(out.glob("*.tmp"))
    assert all(r["kl_mean"] > 0 for r in data["perplexity"][1:]) and data["perplexity"][0]["kl_mean"] == 0


def test_eval_and_perplexity_read_the_cache_options_alike():
    from decoquant.cli import build_parser
    from decoquant.cli.common import _configs

    argv = ["--methods", "fp16,kivi,turboquant", "--bits", "2", "--kivi-groups", "32,64", "--kivi-clip",
            "--turboquant-outliers", "16"]
    labels = {cmd: [c.label() if c is not None else "fp16" for c in _configs(build_parser().parse_args([cmd, *argv]))]
              for cmd in ("eval", "perplexity")}
    assert labels["eval"] == labels["perplexity"]
    assert {"kivi-g64-clip-2b", "kivi-g32-2b"} <= set(labels["eval"]) and len(labels["eval"]) == 7


@pytest.mark.slow
def test_eval_retrieval_tasks_write_tables_and_heatmaps(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "run"
    assert main(["eval", "--tasks", "needle,multikey,passkey", "--methods", "fp16,kivi", "--bits", "2",
                 "--lengths", "200,300",
                 "--depths", "0,1", "--prefill-chunk", "64", "--block-size", "32", "--residual-length", "16",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## Needle in a haystack" in printed and "## Passkey retrieval" in printed and "| kivi-g32-2b |" in printed
    assert "## Multi-key needle in a haystack" in printed
    data = json.loads((out / "eval.json").read_text())
    # caches x lengths x depths
    assert len(data["needle"]) == len(data["multikey"]) == len(data["passkey"]) == 2 * 2 * 2
    assert {p.name for p in out.glob("*.png")} == {f"{t}_{c}.png" for t in ("needle", "multikey", "passkey")
                                                   for c in ("fp16", "kivi-g32-2b")}
    assert main(["eval", "--tasks", "needle", "--depths", "1.5", "--out", str(out)]) == 2


def test_generate_prints_text_and_the_memory_report(capsys, monkeypatch):
    pytest.importorskip("transformers")
    texts = {}
    for method in ("fp16", "none"):
        assert main(["generate", "The capital of France is", "--method", method, "--max-new-tokens", "12"]) == 0
        out = capsys.readouterr()
        texts[method] = out.out
        assert "tokens/s" in out.err
    assert texts["fp16"] == texts["none"] and texts["fp16"].strip()  # method none: DynamicCache's tokens
    # blocks small enough that the prompt and 90 new tokens fill compressed blocks; the prompt from stdin
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("The history of the city of Paris begins with"))
    assert main(["generate", "--bits", "2", "--max-new-tokens", "90", "--block-size", "64", "--residual-length",
                 "8", "--sink-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "decoquant-channel64-token-2b" in out.err
    assert "compressed blocks 0.00 MiB" not in out.err and "DynamicCache would hold" in out.err
    assert main(["generate", "  ", "--max-new-tokens", "4"]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_bfloat16_on_a_cpu_without_its_instructions_says_so(monkeypatch, capsys):
    """bfloat16 runs emulated on a CPU without AVX512-BF16 / AMX (about half the speed of float32 there): the
    commands say so on stderr, and stay silent where the CPU has them or the dtype is float32."""
    import argparse

    import torch

    from decoquant.cli import common
    from decoquant.integrations import models

    monkeypatch.setattr(models, "load_model", lambda name, dtype: (name, dtype))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for has, dtype, noted in ((False, "bfloat16", True), (True, "bfloat16", False), (False, "float32", False)):
        monkeypatch.setattr(common, "_cpu_has_bf16", lambda has=has: has)
        assert common._load_model(argparse.Namespace(model="m", dtype=dtype)) == ("m", getattr(torch, dtype))
        assert ("no bfloat16 instructions" in capsys.readouterr().err) == noted
