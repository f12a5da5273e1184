"""The plugin in real vLLM engines on CPU: method "none" equals stock vLLM token for token (batched requests of
different lengths, page boundaries, preemption), compressed pages raise vLLM's KV capacity by the format's ratio,
and SmolLM2 served from compressed pages keeps its greedy continuations."""

import pytest

from conftest import run_engine
from decoquant import DecoQuantConfig
from decoquant.integrations.vllm.pages import PageFormat

WORDS = "the old fisherman rowed his boat out past the rocks before dawn and cast his nets into the grey sea".split()


def _prompt(n_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


PROMPTS = [_prompt(3), _prompt(150), _prompt(260), _prompt(40)]  # under one page, across one and two boundaries


def _same(a: dict, b: dict, atol: float) -> None:
    assert a["tokens"] == b["tokens"]
    for x, y in zip(a["logprobs"], b["logprobs"]):
        assert max(abs(p - q) for p, q in zip(x, y)) <= atol


def test_method_none_equals_stock_vllm(tiny_llama):
    stock = run_engine(model=tiny_llama, decoquant=None, prompts=PROMPTS, max_tokens=80)
    none = run_engine(model=tiny_llama, decoquant={"method": "none"}, prompts=PROMPTS, max_tokens=80)
    _same(stock, none, atol=1e-4)
    assert none["capacity_tokens"] == stock["capacity_tokens"]  # the stock page size


def test_chunked_prefill_equals_stock_vllm(tiny_llama):
    # at most 96 tokens per step: the long prompts arrive in chunks that end inside pages
    args = dict(model=tiny_llama, prompts=PROMPTS, max_tokens=20, max_batched_tokens=96, prefix_caching=False)
    _same(run_engine(decoquant=None, **args), run_engine(decoquant={"method": "none"}, **args), atol=1e-4)
    packed = run_engine(decoquant={}, **args)
    assert [len(t) for t in packed["tokens"]] == [20] * len(PROMPTS)


def test_preemption_recomputes_into_fresh_pages(tiny_llama):
    # 3 usable pages for 3 requests that each grow to 2-3 pages: vLLM must preempt and recompute
    args = dict(model=tiny_llama, prompts=[_prompt(60), _prompt(70), _prompt(5)], max_tokens=150, blocks=4,
                max_model_len=384)
    stock = run_engine(decoquant=None, **args)
    none = run_engine(decoquant={"method": "none"}, **args)
    packed = run_engine(decoquant={}, **args)
    assert stock["preemptions"] >= 1 and none["preemptions"] >= 1 and packed["preemptions"] >= 1
    _same(stock, none, atol=1e-4)
    assert [len(t) for t in packed["tokens"]] == [150, 150, 150]


def test_many_requests_through_few_slots(tiny_llama):
    # 10 requests, 2 at a time: finished requests leave partly filled pages behind until vLLM hands them out again;
    # the backend keeps at most 2 per schedulable request (paged.PagedLayer's max_filling)
    prompts = [_prompt(100 + 13 * i) for i in range(10)]
    args = dict(model=tiny_llama, prompts=prompts, max_tokens=30, max_num_seqs=2)
    _same(run_engine(decoquant=None, **args), run_engine(decoquant={"method": "none"}, **args), atol=1e-4)
    packed = run_engine(decoquant={}, **args)
    assert [len(t) for t in packed["tokens"]] == [30] * len(prompts)
    assert 1 <= packed["filling_pages"] <= 4
    assert packed["decoded"] > 0  # decode steps read the pages in place (PagedLayer.decode)


@pytest.mark.parametrize("dtype,elem", [("float32", 4), ("bfloat16", 2)])
def test_compressed_pages_raise_kv_capacity(tiny_llama, dtype, elem):
    stock = run_engine(model=tiny_llama, decoquant=None, dtype=dtype, prompts=PROMPTS[:1], max_tokens=4)
    packed = run_engine(model=tiny_llama, decoquant={}, dtype=dtype, prompts=PROMPTS[:1], max_tokens=4)
    import torch

    fmt = PageFormat(DecoQuantConfig(preset="channel64-token", sink_tokens=4), 2, 32, getattr(torch, dtype))
    ratio = packed["capacity_tokens"] / stock["capacity_tokens"]
    want = 2 * 32 * elem / fmt.cell_bytes  # stock cell: a key and a value of head_dim elements
    print(f"{dtype}: stock {stock['capacity_tokens']} tokens, decoquant {packed['capacity_tokens']} "
          f"({ratio:.2f}x; the page format gives {want:.2f}x)")
    assert ratio == pytest.approx(want, rel=0.01)
    assert 2 * 32 * 2 / fmt.cell_bytes >= 3.0  # >= 3x the tokens of 16-bit pages


def test_smollm2_keeps_its_greedy_continuations(smollm2_dir):
    prompts = ["The capital of France is", "def fibonacci(n):",
               "Once upon a time, in a small village by the sea, there lived an old fisherman named Tom. " * 6
               + "One day, Tom"]
    stock = run_engine(model=smollm2_dir, decoquant=None, prompts=prompts, max_tokens=24)
    packed = run_engine(model=smollm2_dir, decoquant={}, prompts=prompts, max_tokens=24)
    for s, p, text in zip(stock["tokens"], packed["tokens"], packed["texts"]):
        print(repr(text))
    agree = [next((i for i, (a, b) in enumerate(zip(s, p)) if a != b), len(s)) for s, p in
             zip(stock["tokens"], packed["tokens"])]
    print("greedy tokens equal to stock vLLM before the first difference:", agree)
    assert sum(a >= 8 for a in agree) >= 2  # 4-bit pages: the first 8 greedy tokens match on most prompts
    assert packed["capacity_tokens"] >= 3 * stock["capacity_tokens"]  # fp32 pages here: ~7x
    assert packed["decoded"] >= 30 * 23 * 3  # every layer's decode steps read the pages in place
