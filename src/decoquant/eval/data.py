"""Evaluation data from a folder laid out like the project's shared data folder.

    lambada/lambada_development_plain_text.txt   LAMBADA validation, one passage per line (the paper's set)
    lambada/lambada_test.jsonl                   LAMBADA OpenAI test, {"text"} (lm-eval's lambada_openai)
    <icl dataset>/<split>.jsonl                  ICL sets with the Hugging Face fields and label ids

Every loader checks the layout and raises a ValueError that names the file it expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


def _require(data_dir: str | Path | None, relative: str) -> Path:
    if data_dir is None:
        raise ValueError(f"this task needs --data-dir: a folder holding {relative}")
    path = Path(data_dir) / relative
    if not path.is_file():
        raise ValueError(f"expected {relative} under the data folder {data_dir} (missing: {path})")
    return path


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{i} is not valid JSON ({err.msg})") from None
    if not rows:
        raise ValueError(f"{path} holds no records")
    return rows


# ----------------------------------------------------------------------------------- LAMBADA
LAMBADA_VARIANTS = ("paper", "openai")


def lambada_passages(data_dir: str | Path | None, variant: str = "paper") -> list[str]:
    """variant "paper": the validation passages (4,869; lower-cased, tokenized) the paper scored by
    last-token accuracy; "openai": the OpenAI test passages (5,153) scored by last-word accuracy."""
    if variant == "paper":
        path = _require(data_dir, "lambada/lambada_development_plain_text.txt")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if variant == "openai":
        rows = _jsonl(_require(data_dir, "lambada/lambada_test.jsonl"))
        if "text" not in rows[0]:
            raise ValueError("lambada/lambada_test.jsonl records must have a 'text' field")
        return [r["text"] for r in rows]
    raise ValueError(f"variant={variant!r} is not supported; allowed values: {LAMBADA_VARIANTS}")


# --------------------------------------------------------------------------------------- ICL
@dataclass(frozen=True)
class IclTask:
    """One classification set: files, the prompt template and the label words."""

    name: str
    train: str  # file under <data_dir>/<name>/
    test: str
    template: str  # format string over the record's fields; the answer follows it after a space
    fields: tuple[str, ...]
    options: tuple[str, ...]  # label id -> verbaliser

    def prompt(self, record: dict) -> str:
        return self.template.format(**{f: str(record[f]).strip() for f in self.fields})


# Verbalisers are the paper's; templates follow Zhao et al. (2021), whose contextual calibration
# the paper uses.
ICL_TASKS = {
    "ag_news": IclTask("ag_news", "train_sample.jsonl", "test.jsonl", "Article: {text}\nAnswer:", ("text",),
                       ("World", "Sports", "Business", "Sci/Tech")),
    "subj": IclTask("subj", "train.jsonl", "test.jsonl", "Input: {text}\nType:", ("text",),
                    ("objective", "subjective")),
    "mr": IclTask("mr", "train.jsonl", "test.jsonl", "Review: {text}\nSentiment:", ("text",),
                  ("negative", "positive")),
    "boolq": IclTask("boolq", "train_sample.jsonl", "validation.jsonl",
                     "{passage}\nquestion: {question}?\nanswer:", ("passage", "question"), ("incorrect", "correct")),
    "rte": IclTask("rte", "train.jsonl", "validation.jsonl",
                   "{premise}\nquestion: {hypothesis} True or False?\nanswer:", ("premise", "hypothesis"),
                   ("True", "False")),
    "sst2": IclTask("sst2", "train.jsonl", "validation.jsonl", "Review: {sentence}\nSentiment:", ("sentence",),
                    ("negative", "positive")),
}
PAPER_ICL_TASKS = ("ag_news", "subj", "mr", "boolq", "rte")


def icl_task(name: str) -> IclTask:
    if name not in ICL_TASKS:
        raise ValueError(f"unknown ICL dataset {name!r}; allowed values: {sorted(ICL_TASKS)}")
    return ICL_TASKS[name]


def icl_split(data_dir: str | Path | None, task: IclTask, split: str) -> list[dict]:
    """The train or test records of an ICL task, checked for its fields and label ids."""
    rows = _jsonl(_require(data_dir, f"{task.name}/{task.train if split == 'train' else task.test}"))
    need = set(task.fields) | {"label"}
    for i, r in enumerate(rows):
        if not need <= r.keys():
            raise ValueError(f"{task.name}/{split} record {i} lacks fields {sorted(need - r.keys())}")
        if r["label"] not in range(len(task.options)):
            raise ValueError(f"{task.name}/{split} record {i} has label {r['label']!r}; "
                             f"expected 0..{len(task.options) - 1}")
    return rows
