"""`decoquant lm-eval ...`: lm-evaluation-harness's own command line with the `decoquant` model registered.

Two additions: `pretrained=<built-in alias>` in --model_args is resolved to the alias's local folder for any
model (so `--model hf` reads the same weights), and `--data-dir DIR` adds offline task definitions over a data
folder laid out like the project's shared data (`lambada_openai_local`: lm-eval's lambada_openai on
`DIR/lambada/lambada_test.jsonl`)."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

LOCAL_TASKS = {
    "lambada_openai_local": ("lambada/lambada_test.jsonl", """task: lambada_openai_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""),
}


def write_local_tasks(data_dir: str | Path, folder: Path) -> list[str]:
    """Write the task definitions whose data the folder has; returns their names."""
    names = []
    for name, (relative, template) in LOCAL_TASKS.items():
        path = Path(data_dir) / relative
        if path.exists():
            (folder / f"{name}.yaml").write_text(template.format(path=path.resolve()), encoding="utf-8")
            names.append(name)
    if not names:
        raise ValueError(f"--data-dir {data_dir} has none of {[r for r, _ in LOCAL_TASKS.values()]}")
    return names


def _resolve_aliases(model_args: str) -> str:
    from ..integrations.models import BUILTIN_MODELS, resolve_model_path

    return re.sub(r"(^|,)pretrained=([^,]+)", lambda m: m.group(1) + "pretrained=" + (
        resolve_model_path(m.group(2)) if m.group(2) in BUILTIN_MODELS else m.group(2)), model_args)


def run_lm_eval(argv: list[str]) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate

        from ..integrations import lm_eval as _registers  # noqa: F401
    except ImportError as err:
        raise ValueError(f"decoquant lm-eval needs lm-evaluation-harness: pip install 'decoquant[lm-eval]' ({err})")
    argv = list(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="decoquant-tasks-") as tmp:
        if "--data-dir" in argv:
            i = argv.index("--data-dir")
            if i + 1 >= len(argv):
                raise ValueError("--data-dir needs a folder")
            write_local_tasks(argv[i + 1], Path(tmp))
            argv[i:i + 2] = ["--include_path", tmp]
        for i, arg in enumerate(argv[:-1]):
            if arg == "--model_args":
                argv[i + 1] = _resolve_aliases(argv[i + 1])
        old, sys.argv = sys.argv, ["lm-eval", *argv]
        try:
            cli_evaluate()
        except SystemExit as done:
            return int(done.code or 0)
        finally:
            sys.argv = old
    return 0
