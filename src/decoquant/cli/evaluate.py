"""`decoquant eval`, the main job: the selected tasks on one model, one report (the tasks: `eval.job`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import BITS
from ..eval.job import RETRIEVAL_TASKS, TASKS
from .common import _args_dict, _cache_fields, _configs, _load_model, _parse_list, _parse_widths, _presets, _text

ACCURACY_METHODS = ("fp16", "rtn", "kivi", "rotation", "decoquant", "smoothquant")


def cmd_eval(args: argparse.Namespace) -> int:
    """The main job: the selected tasks on one model, one report."""
    import torch

    from ..eval import job
    from ..eval.report import write_report

    tasks = _parse_list(args.tasks, TASKS)
    widths = _parse_widths(args.bits)
    bits = [b for b in widths if not isinstance(b, tuple)]
    if len(bits) < len(widths) and any(t in tasks for t in ("lambada", "lambada-openai", "icl")):
        raise SystemExit("error: key:value widths in --bits apply to the perplexity and reconstruction tasks; "
                         "give the lambada and icl tasks plain widths")
    acc_methods = _parse_list(args.accuracy_methods, ACCURACY_METHODS)
    weight_bits = _parse_list(args.weight_bits, BITS, int)
    presets = _presets(args)
    shots = [int(s) for s in args.shots.split(",") if s]
    fields = _cache_fields(args)
    configs = _configs(args)  # with --kivi-groups, --kivi-clip and --turboquant-outliers, as `perplexity` reads them
    if any(t in tasks for t in ("lambada", "lambada-openai", "icl")) and args.data_dir is None:
        raise ValueError("the lambada and icl tasks need --data-dir (a folder with lambada/ and the ICL sets)")
    source, text = _text(args)  # checked before the model loads
    datasets = []
    if "icl" in tasks:
        from ..eval.data import icl_split, icl_task

        datasets = [icl_task(d) for d in args.icl_datasets.split(",") if d]
        for d in datasets:  # check the files before the model loads
            for split in ("train", "test"):
                icl_split(args.data_dir, d, split)
    out = Path(args.out or "decoquant-results")
    plots = out if args.plots else None
    model, tok = _load_model(args)
    ids = tok(text, return_tensors="pt").input_ids
    sections = [f"# decoquant eval: {args.model} ({args.dtype})"]
    payload: dict = {"args": _args_dict(args), "torch": torch.__version__}

    def add(part: tuple[list[str], dict]) -> None:
        sections.extend(part[0])
        payload.update(part[1])

    if "perplexity" in tasks:
        add(job.perplexity_section(model, ids, configs, source, args.window, args.chunk, args.max_windows,
                                   args.dtype, presets, fields))
    for variant, task in (("paper", "lambada"), ("openai", "lambada-openai")):
        if task in tasks:
            add(job.lambada_section(model, tok, args.data_dir, variant, acc_methods, bits, presets, weight_bits,
                                    args.lambada_limit))
    if "icl" in tasks:
        add(job.icl_section(model, tok, args.data_dir, datasets, shots, acc_methods, bits, presets,
                            tuple(int(s) for s in args.seeds.split(",")), args.icl_limit))
    if any(t in RETRIEVAL_TASKS for t in tasks):
        add(job.retrieval_sections(model, tok, configs, text, args.data_dir, tasks,
                                   [int(n) for n in args.lengths.split(",") if n],
                                   [float(d) for d in args.depths.split(",") if d], args.prefill_chunk, plots,
                                   args.model))
    if "reconstruction" in tasks:
        add(job.reconstruction_sections(model, ids, configs, args.window, plots, args.model))
    sections.append(f"Command: `decoquant eval {' '.join(args.argv)}`".rstrip())
    markdown = "\n\n".join(sections) + "\n"
    print(markdown)
    write_report(out, "eval", markdown, payload)
    print(f"report: {out / 'eval.md'} (and eval.json)", file=sys.stderr)
    return 0
