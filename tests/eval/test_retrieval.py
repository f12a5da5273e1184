"""Needle, multi-key needle and passkey prompts: lengths, depths and KIVI's prompts fitted to a context;
scoring; SmolLM2 retrieves a pass key at 1k tokens through the uncompressed cache, and the compressed cache
really compresses the prompt."""

import json
import re

import pytest

pytest.importorskip("transformers")

from decoquant import DecoQuantConfig
from decoquant.eval.perplexity import make_cache
from decoquant.eval.retrieval import (MULTIKEY_NEEDLES, PASSKEY_FILLER, PASSKEY_INTRO, answer,
                                      needle_prompts, passkey_file_prompts, passkey_prompts, run_retrieval, score,
                                      task_prompts)
from decoquant.eval.text import load_text


def test_score_is_exact_match_on_the_first_number():
    assert score("1234567", " 1234567.\nThe") and score("42", "is 42")
    assert not score("1234567", " 12345678") and not score("1234567", " 123 4567") and not score("5", "none")


def test_prompts_have_their_length_and_the_fact_at_its_depth(smollm2):
    _, tok = smollm2
    needles = needle_prompts(tok, load_text("gensim-wiki")[:200_000], [512, 1500], [0.0, 0.5, 1.0], seed=1)
    keys = passkey_prompts(tok, [700], [0.0, 1.0])
    for p in needles + keys:
        assert p.length == len(p.context) + len(p.question) and p.length <= (512 if p in needles[:3] else 1500)
        assert p.length >= 0.97 * (512 if p in needles[:3] else 1500 if p in needles else 700)
        text = tok.decode(p.context)
        at = text.find(p.target)
        assert at >= 0, p
        assert abs(at / len(text) - p.depth) < 0.1, (p.depth, at / len(text))
    assert tok.decode(keys[0].context).lstrip().startswith(PASSKEY_INTRO.strip())
    with pytest.raises(ValueError, match="cannot hold"):
        needle_prompts(tok, "short text. " * 50, [20], [0.5])
    with pytest.raises(ValueError, match="haystack has"):
        needle_prompts(tok, "short text. " * 50, [4000], [0.5])
    with pytest.raises(ValueError, match="task="):
        task_prompts(tok, "ruler", [512], [0.5], "", None, 8000)


def test_multikey_prompts_hold_distinct_needles_and_ask_for_the_one_at_the_depth(smollm2):
    _, tok = smollm2
    haystack = load_text("gensim-wiki")[:200_000]
    plain = needle_prompts(tok, haystack, [1024], [0.0, 0.5, 1.0], seed=3)
    multi = task_prompts(tok, "multikey", [1024], [0.0, 0.5, 1.0], haystack, None, 8000, seed=3)
    assert [p.task for p in multi] == ["multikey"] * 3 and [p.depth for p in multi] == [0.0, 0.5, 1.0]
    for p in multi:
        assert 0.97 * 1024 <= p.length <= 1024
        text, question = tok.decode(p.context), tok.decode(p.question)
        found = re.findall(r"The special magic number for (\w+) is (\d+)\.", text)
        assert len(found) == MULTIKEY_NEEDLES and len({k for k, _ in found}) == MULTIKEY_NEEDLES, found
        asked = re.search(r"number for (\w+)\?", question).group(1)
        assert dict(found)[asked] == p.target
        assert abs(text.find(p.target) / len(text) - p.depth) < 0.1
    assert [p.target for p in plain] != [p.target for p in multi]  # the plain needle's draws are its own
    with pytest.raises(ValueError, match="keys="):
        needle_prompts(tok, haystack, [1024], [0.5], keys=0)


def test_kivi_prompts_are_fitted_to_the_context(smollm2, tmp_path):
    _, tok = smollm2
    lines = [PASSKEY_INTRO.strip()] + [PASSKEY_FILLER.strip()] * 150 + [
        "The pass key is 31337. Remember it. 31337 is the pass key."] + [PASSKEY_FILLER.strip()] * 450
    (tmp_path / "longctx").mkdir()
    (tmp_path / "longctx" / "passkey_examples.jsonl").write_text(
        json.dumps({"input": "\n".join(lines), "target": 31337, "passkey_position": 150}))
    full = passkey_file_prompts(tok, tmp_path, 100_000)[0]
    fit = passkey_file_prompts(tok, tmp_path, 4000)[0]
    assert full.length > 12_000 and 3900 <= fit.length <= 4000 and fit.target == "31337"
    assert abs(fit.depth - full.depth) < 0.02 and abs(full.depth - 0.25) < 0.02
    with pytest.raises(ValueError, match="passkey prompts"):
        passkey_file_prompts(tok, tmp_path / "missing", 4000)


def test_smollm2_retrieves_a_pass_key_and_the_prompt_is_compressed(smollm2):
    model, tok = smollm2
    prompts = passkey_prompts(tok, [1024], [0.0, 0.5], seed=0)
    results = run_retrieval(model, tok, prompts, [None], chunk=256)
    assert all(r.correct for r in results), [r.answer for r in results]
    cfg = DecoQuantConfig(method="kivi", bits=4, sink_tokens=4)
    cache = make_cache(model, cfg)
    text = answer(model, tok, prompts[0], cache, chunk=256, max_new_tokens=4)
    mem = cache.memory_report()
    assert mem["compressed_elements"] > 0.7 * (mem["compressed_elements"] + mem["exact_elements"])
    assert isinstance(text, str)
