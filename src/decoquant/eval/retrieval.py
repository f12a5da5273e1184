"""Long-context retrieval through the compressed cache: needle in a haystack (plain and multi-key) and passkey
retrieval.

A prompt is a context (haystack or filler with the fact hidden at some depth) and a question. The context
is prefilled in chunks, as serving engines do, so everything older than the exact window is compressed
before the question arrives; the question is then fed through the cache and the answer generated greedily
(each new token reads the compressed context). Scored by exact match: the first number in the answer must be
the hidden one.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..integrations.transformers import cache_kwargs

PASSKEY_FILE = Path("longctx") / "passkey_examples.jsonl"
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
MULTIKEY_NEEDLES = 4  # needles in a multi-key prompt, one asked for (RULER's niah_multikey_1 has 1 + distractors)
NEEDLE_KEYS = ("Lisbon", "Kyoto", "Nairobi", "Oslo", "Quito", "Hanoi", "Perth", "Tallinn", "Accra", "Lima")


@dataclass
class Prompt:
    task: str  # "needle", "multikey", "passkey" (generated) or "passkey-file"
    context: list[int]  # token ids, the fact inside
    question: list[int]
    target: str  # the number to retrieve
    depth: float  # where the fact sits in the context, 0 = start, 1 = end
    length: int  # prompt tokens (context + question)


@dataclass
class RetrievalResult:
    task: str
    label: str  # the cache
    length: int
    depth: float
    target: str
    answer: str
    correct: bool


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def _prefix(tok) -> list[int]:
    """The special tokens the tokenizer puts before a text (a BOS), if any."""
    return tok("").input_ids


def _insert_at_boundary(tok, ids: list[int], at: int) -> int:
    """The position at or before `at` just after a token ending a sentence or line (so no word is split)."""
    for i in range(min(at, len(ids)), 0, -1):
        if re.search(r"[.!?\n]\s*$", tok.decode(ids[i - 1:i])):
            return i
    return 0


def _place(tok, filler: list[int], facts: list[tuple[list[int], float]], question: list[int], length: int,
           task: str, target: str, head: list[int] = ()) -> Prompt:
    """A prompt of `length` tokens: the filler with each (fact, depth) inserted at a sentence boundary; the
    prompt's depth is the first fact's (the one asked for)."""
    room = length - len(question) - sum(len(f) for f, _ in facts) - len(head) - len(_prefix(tok))
    if room < 1:
        raise ValueError(f"a prompt of {length} tokens cannot hold the facts and the question; use longer lengths")
    if len(filler) < room:
        raise ValueError(f"the haystack has {len(filler)} tokens, fewer than the {room} a {length}-token prompt needs")
    body = filler[:room]
    cuts = sorted(((_insert_at_boundary(tok, body, round(d * room)), i) for i, (_, d) in enumerate(facts)))
    context, last = _prefix(tok) + list(head), 0
    for at, i in cuts:
        context += body[last:at] + facts[i][0]
        last = at
    context += body[last:]
    return Prompt(task, context, question, target, facts[0][1], len(context) + len(question))


def _needle(key: str, value: str) -> str:
    return f"\nThe special magic number for {key} is {value}.\n"


def needle_prompts(tok, haystack: str, lengths, depths, seed: int = 0, keys: int = 1) -> list[Prompt]:
    """Needle in a haystack over real text: "The special magic number for <city> is <7 digits>." at each depth of
    each length (tokens), asked for at the end. With `keys` > 1 (RULER's multi-key variant) as many needles for
    other cities sit at random depths, and only the one at the given depth is asked for."""
    if not 1 <= keys <= len(NEEDLE_KEYS):
        raise ValueError(f"keys={keys} is not supported; allowed values: 1 to {len(NEEDLE_KEYS)}")
    rng = random.Random(seed)
    filler = _ids(tok, haystack)
    out = []
    for length in lengths:
        for depth in depths:
            names = [rng.choice(NEEDLE_KEYS)] if keys == 1 else rng.sample(NEEDLE_KEYS, keys)
            values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in names]  # keys == 1: draws as before
            facts = [(_ids(tok, _needle(k, v)), depth if i == 0 else rng.random())
                     for i, (k, v) in enumerate(zip(names, values))]
            question = _ids(tok, f"\nWhat is the special magic number for {names[0]}? The special magic number for "
                                 f"{names[0]} is")
            out.append(_place(tok, filler, facts, question, length, "needle" if keys == 1 else "multikey", values[0]))
    return out


def passkey_prompts(tok, lengths, depths, seed: int = 0) -> list[Prompt]:
    """KIVI's passkey prompt generated at each length and depth: its intro, its filler lines, the pass key line,
    and the question."""
    rng = random.Random(seed)
    filler = _ids(tok, PASSKEY_FILLER * (max(lengths) // 8 + 8))
    head, question = _ids(tok, PASSKEY_INTRO), _ids(tok, PASSKEY_QUESTION)
    out = []
    for length in lengths:
        for depth in depths:
            key = str(rng.randrange(10_000, 100_000))
            fact = _ids(tok, f"The pass key is {key}. Remember it. {key} is the pass key.\n")
            out.append(_place(tok, filler, [(fact, depth)], question, length, "passkey", key, head))
    return out


def passkey_file_prompts(tok, data_dir: str | Path, max_tokens: int) -> list[Prompt]:
    """KIVI's passkey prompts from the data folder. Longer than `max_tokens`, a prompt loses filler lines before
    and after the pass key line in proportion, so the key keeps its relative depth."""
    path = Path(data_dir) / PASSKEY_FILE
    if not path.exists():
        raise ValueError(f"expected KIVI's passkey prompts at {path} (a data folder with {PASSKEY_FILE})")
    out, question = [], _ids(tok, PASSKEY_QUESTION)
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        lines = row["input"].split("\n")
        at = next(i for i, s in enumerate(lines) if "pass key is" in s)
        head, before, key_line, after = lines[0], lines[1:at], lines[at], lines[at + 1:]
        per_line = len(_ids(tok, PASSKEY_FILLER))
        while True:
            text = "\n".join([head, *before, key_line, *after])
            context = _prefix(tok) + _ids(tok, text)
            excess = len(context) + len(question) - max_tokens
            if excess <= 0 or not (before or after):
                break
            drop = -(-excess // per_line)  # filler lines to drop, shared in proportion to where they are
            cut_b = min(len(before), round(drop * len(before) / (len(before) + len(after))))
            before, after = before[cut_b:], after[: max(0, len(after) - (drop - cut_b))]
        depth = len("\n".join([head, *before])) / max(1, len(text))
        out.append(Prompt("passkey-file", context, question, str(row["target"]), depth, len(context) + len(question)))
    return out


@torch.no_grad()
def answer(model, tok, prompt: Prompt, cache, chunk: int = 512, max_new_tokens: int = 12) -> str:
    """Prefill the context in chunks through `cache`, feed the question, and decode greedily."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.context], device=device)
    for start in range(0, ids.shape[1], chunk):
        # the prefill only fills the cache: one position's logits instead of a chunk's (a 262k vocabulary costs
        # as much as the rest of a small model)
        model(input_ids=ids[:, start:start + chunk], use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
    step = torch.tensor([prompt.question], device=device)
    new = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=step, use_cache=True, logits_to_keep=1, **cache_kwargs(cache)).logits[:, -1]
        token = int(logits.argmax(-1))
        if token == tok.eos_token_id:
            break
        new.append(token)
        step = torch.tensor([[token]], device=device)
    return tok.decode(new, skip_special_tokens=True)


def score(target: str, text: str) -> bool:
    """Exact match: the first number in the answer is the target."""
    found = re.search(r"\d+", text)
    return found is not None and found.group() == target


def run_retrieval(model, tok, prompts: list[Prompt], configs: list, chunk: int = 512, progress=None,
                  max_new_tokens: int = 12) -> list[RetrievalResult]:
    """Every prompt through a fresh cache of every config (None = transformers' DynamicCache)."""
    from .perplexity import make_cache

    steps = [(c, p) for c in configs for p in prompts]
    out = []
    for config, prompt in (steps if progress is None else progress(steps)):
        text = answer(model, tok, prompt, make_cache(model, config), chunk, max_new_tokens)
        out.append(RetrievalResult(prompt.task, "fp16" if config is None else config.label(), prompt.length,
                                   prompt.depth, prompt.target, text, score(prompt.target, text)))
    return out


def context_limit(model, max_new_tokens: int = 12) -> int:
    """The longest prompt the model's positions allow with room for the answer (None-safe)."""
    from ..integrations.model_config import text_config

    limit = getattr(text_config(model.config), "max_position_embeddings", None) or 1 << 20
    return limit - max_new_tokens


def task_prompts(tok, task: str, lengths, depths, haystack: str | None, data_dir, max_tokens: int,
                 seed: int = 0) -> list[Prompt]:
    """The prompts of a task: "needle" over `haystack`; "passkey" generated at every length and depth, plus
    KIVI's own prompts (fitted to `max_tokens`) when `data_dir` has them. Lengths past `max_tokens` are
    clipped to it."""
    lengths = sorted({min(n, max_tokens) for n in lengths})
    if task in ("needle", "multikey"):
        return needle_prompts(tok, haystack, lengths, depths, seed, 1 if task == "needle" else MULTIKEY_NEEDLES)
    if task == "passkey":
        prompts = passkey_prompts(tok, lengths, depths, seed)
        if data_dir is not None and (Path(data_dir) / PASSKEY_FILE).exists():
            prompts += passkey_file_prompts(tok, data_dir, max_tokens)
        return prompts
    raise ValueError(f"task={task!r} is not supported; allowed values: 'needle', 'multikey', 'passkey'")
