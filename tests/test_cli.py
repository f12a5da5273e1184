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
    assert main(["eval", "--methods", "fp16,decoquant,rtn", "--bits", "4", "--window", "256",
                 "--max-windows", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| decoquant-paper-4b |" in printed and "| rtn-4b |" in printed
    data = json.loads((out / "eval.json").read_text())
    assert [r["label"] for r in data["perplexity"]] == ["fp16", "decoquant-paper-4b", "decoquant-channel64-token-4b",
                                                        "rtn-4b"]  # default presets: the paper's and the frontier's
    assert (out / "eval.md").read_text().startswith("# decoquant eval")
    assert not list(out.glob("*.tmp"))
