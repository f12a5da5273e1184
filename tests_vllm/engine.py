"""Run one vLLM engine (CPU, offline) in this process and print what the tests compare, as one JSON line.

    python tests_vllm/engine.py '{"model": DIR, "decoquant": {...} | null, "dtype": "float32", "prompts": [...],
                                  "max_tokens": 40, "blocks": null, "max_model_len": 1024, "prefix_caching": true,
                                  "max_batched_tokens": null, "max_num_seqs": 4}'

"decoquant": null runs stock vLLM (the plugin installed but off); a dict runs the plugin with those options.
"blocks" overrides the number of pages vLLM allocates. Prints `RESULT {"tokens": [[...]], "logprobs": [[...]],
"texts": [...], "capacity_tokens": N, "preemptions": N, "filling_pages": N, "spills": N, "decoded": N}` (the last
three: the plugin's filling pages at the end, most over layers, its spills, and the decode tokens it attended through
the pages in place, each summed over layers).
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: it can be counted


def main(args: dict) -> dict:
    if args.get("decoquant") is None:
        os.environ["DECOQUANT_VLLM_DISABLE"] = "1"
    from vllm import LLM, SamplingParams
    from vllm.v1.core.sched.scheduler import Scheduler

    preemptions = []
    original = Scheduler._preempt_request

    def counted(self, request, *a, **k):
        preemptions.append(request.request_id)
        return original(self, request, *a, **k)

    Scheduler._preempt_request = counted
    extra = {} if args.get("decoquant") is None else {"decoquant": args["decoquant"]}
    llm = LLM(args["model"], enforce_eager=True, dtype=args.get("dtype", "float32"),
              max_model_len=args.get("max_model_len", 1024), max_num_seqs=args.get("max_num_seqs", 4),
              block_size=128, additional_config=extra, seed=0, enable_prefix_caching=args.get("prefix_caching", True),
              num_gpu_blocks_override=args.get("blocks"), max_num_batched_tokens=args.get("max_batched_tokens"))
    config = llm.llm_engine.vllm_config.cache_config
    params = SamplingParams(temperature=0, max_tokens=args.get("max_tokens", 40), logprobs=1, ignore_eos=True)
    outs = llm.generate(args["prompts"], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    layers = [getattr(a.impl, "layer", None) for a in llm.llm_engine.vllm_config.compilation_config
              .static_forward_context.values()]
    layers = [p for p in layers if p is not None]  # the plugin's per-layer state (paged.PagedLayer)
    return {"tokens": tokens, "logprobs": logprobs, "texts": [o.outputs[0].text for o in outs],
            "capacity_tokens": config.num_gpu_blocks * config.block_size, "preemptions": len(preemptions),
            "filling_pages": max((len(p.filling) for p in layers), default=0),
            "spills": sum(p.spills for p in layers), "decoded": sum(p.decoded for p in layers)}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
