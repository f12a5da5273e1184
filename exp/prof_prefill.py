import time, sys, collections
import torch
import decoquant as dq
from decoquant.bench.e2e_decode import random_model, decoquant_config
from transformers import DynamicCache
dev = torch.device("cuda")
model = random_model(32, dev)
ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
ids = torch.randint(0, 32000, (1, ctx), device=dev)

def make(name):
    if name == "fp16":
        return DynamicCache(config=model.config)
    preset, overlap = name.split("/")
    return dq.DecoQuantCache(decoquant_config(f"decoquant:{preset}", 4), model.config, fused=True, overlap=overlap == "o")

names = ["fp16", "paper/o", "paper/s", "channel64-token/o", "channel64-token/s"]
with torch.no_grad():
    for name in names:
        host, tot = [], []
        for r in range(4):
            cache = make(name)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            host.append((t1 - t0) * 1e3); tot.append((t2 - t0) * 1e3)
        print(f"{name:22s} host-return {sorted(host[1:])[1]:7.1f} ms  total {sorted(tot[1:])[1]:7.1f} ms", flush=True)
    from torch.profiler import profile, ProfilerActivity
    for name in ["fp16", "paper/o", "channel64-token/o"]:
        cache = make(name)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
            torch.cuda.synchronize()
        agg = collections.Counter()
        total = 0.0
        for e in prof.events():
            if e.device_type.name == "CUDA":
                k = e.name[:60]
                agg[k] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        total = sum(agg.values())
        print(f"## {name}: total kernel time {total/1e3:.1f} ms")
        for k, v in agg.most_common(14):
            print(f"   {v/1e3:8.2f} ms  {k}")
