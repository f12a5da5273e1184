"""lm-evaluation-harness: the `decoquant` model with method none scores what lm-eval's `hf` model scores on an
offline LAMBADA task; a compressed cache changes the scores; `decoquant lm-eval` runs lm-eval's CLI."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from decoquant.cli import main  # noqa: E402
from decoquant.cli.lm_eval import write_local_tasks  # noqa: E402
from decoquant.eval.text import load_text  # noqa: E402
from decoquant.integrations.lm_eval import cache_config  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Eight passages of real text (60 words each) as a lambada_openai-style test file, and the task folder."""
    root = tmp_path_factory.mktemp("lmeval")
    words = load_text("gensim-wiki").split()
    (root / "lambada").mkdir()
    with (root / "lambada" / "lambada_test.jsonl").open("w") as f:
        for i in range(8):
            f.write(json.dumps({"text": " ".join(words[1000 + 60 * i: 1060 + 60 * i])}) + "\n")
    folder = root / "tasks"
    folder.mkdir()
    assert write_local_tasks(root, folder) == ["lambada_openai_local"]
    return root, folder


def _score(model: str, model_args: str, folder) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=["lambada_openai_local"],
                          task_manager=TaskManager(include_path=str(folder)), batch_size=4, device="cpu")
    return out["results"]["lambada_openai_local"]


def test_method_none_equals_the_hf_model_and_compression_moves_the_scores(smollm2, tasks):
    from decoquant.integrations.models import resolve_model_path

    _, folder = tasks
    path = resolve_model_path("smollm2-135m")
    hf = _score("hf", f"pretrained={path}", folder)
    none = _score("decoquant", "pretrained=smollm2-135m,method=none", folder)
    assert none["acc,none"] == hf["acc,none"]
    assert none["perplexity,none"] == pytest.approx(hf["perplexity,none"], rel=1e-6)
    small = "block_size=16,residual_length=16,sink_tokens=0,chunk=16"
    exact = _score("decoquant", f"pretrained=smollm2-135m,method=none,{small}", folder)
    assert exact["perplexity,none"] == pytest.approx(hf["perplexity,none"], rel=1e-4)  # chunked, nothing lost
    kivi = _score("decoquant", f"pretrained=smollm2-135m,method=kivi,bits=2,{small}", folder)
    assert kivi["perplexity,none"] > 1.01 * hf["perplexity,none"]


def test_the_command_runs_lm_eval_with_the_model_registered(smollm2, tasks, capsys):
    root, _ = tasks
    assert main(["lm-eval", "--model", "decoquant", "--model_args", "pretrained=smollm2-135m,method=kivi,bits=4",
                 "--tasks", "lambada_openai_local", "--data-dir", str(root), "--limit", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "lambada_openai_local" in out and "acc" in out
    assert main(["lm-eval", "--tasks", "x", "--data-dir", str(root / "nowhere")]) == 2


def test_cache_options_parse_like_from_model():
    assert cache_config().label() == cache_config(method="decoquant").label()
    assert cache_config().preset == "channel64-token" and cache_config().sink_tokens == 4
    assert cache_config(method=None).method == "none"  # lm-eval reads "none" as None
    assert cache_config(method="kivi", bits="2").bits == 2
    assert cache_config(preset=None).preset is None
    with pytest.raises(ValueError, match="unknown cache options"):
        cache_config(bitz=2)
